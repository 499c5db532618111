"""The identity of an adapter: a hash of its weights, the same wherever it is computed.

A run's manifest records it, the bot stamps it on every answer it records,
and ``python -m bot feedback export --adapter-hash`` selects by it, so votes
on one set of weights never mix with votes on another saved at the same path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_weights_hash(adapter_dir: str | os.PathLike[str]) -> str | None:
    """First 16 hex digits of the SHA-256 of the adapter's weights file, None if there is none."""
    directory = Path(adapter_dir)
    for name in WEIGHT_FILES:
        weights = directory / name
        if weights.is_file():
            digest = hashlib.sha256()
            with weights.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            return digest.hexdigest()[:16]
    return None
