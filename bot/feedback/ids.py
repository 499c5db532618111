"""How answers, pairs, voters and adapters are named in the feedback store.

Voters are stored only as a keyed hash (HMAC-SHA256 with a per-installation
salt), so the database never holds a Discord user id in clear and a leaked
copy without the salt cannot be matched against known ids.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from bot.serving.engine import Message
from finetune.fingerprint import adapter_weights_hash

__all__ = [
    "adapter_weights_hash",
    "conversation_key",
    "derive_key",
    "hash_voter",
    "new_answer_id",
    "new_pair_id",
]

SALT_BYTES = 32


def new_answer_id() -> str:
    """A fresh random answer id (``a-`` + 20 hex digits)."""
    return f"a-{secrets.token_hex(10)}"


def new_pair_id() -> str:
    """A fresh random pair id (``p-`` + 20 hex digits)."""
    return f"p-{secrets.token_hex(10)}"


def hash_voter(voter: str, salt: bytes) -> str:
    """The stored form of a voter: 32 hex digits of HMAC-SHA256(salt, voter).

    ``voter`` should be namespaced by its platform (``discord:<user id>``,
    ``web:<session id>``) so ids from two platforms never collide.
    """
    if not voter:
        raise ValueError("a voter id must not be empty")
    return hmac.new(salt, voter.encode(), hashlib.sha256).hexdigest()[:32]


def derive_key(salt: bytes, purpose: str) -> bytes:
    """A secret for one ``purpose`` (signing web voter cookies), kept nowhere but in the salt.

    Derived rather than the salt itself, so a signature never helps anyone
    recompute a voter hash, and whoever keeps the salt keeps the key.
    """
    return hmac.new(salt, f"freeski-bot key for {purpose}".encode(), hashlib.sha256).digest()


def load_or_create_salt(path: Path) -> bytes:
    """The salt kept beside the database, created (mode 0600) by whichever process comes first.

    The bot and the API may start at the same moment on one database: the salt
    is written whole into a private file of its own, then hard-linked to its
    name, which fails if another process got there first. So the file appears
    complete or not at all, and every process ends with the one salt on disk.
    """
    if not path.exists():
        salt = secrets.token_bytes(SALT_BYTES)
        staged = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(salt.hex() + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.link(staged, path)
        except FileExistsError:
            pass  # another process created it meanwhile: its salt is the one
        else:
            return salt
        finally:
            staged.unlink(missing_ok=True)
    salt = bytes.fromhex(path.read_text().strip())
    if len(salt) < 16:
        raise ValueError(f"{path} holds a salt shorter than 16 bytes")
    return salt


def conversation_key(conversation: Sequence[Message]) -> str:
    """Default thread key: a hash of the first user message, the root of the conversation."""
    first = next((m["content"] for m in conversation if m["role"] == "user"), "")
    return hashlib.sha256(first.strip().encode()).hexdigest()[:16]
