"""Reading the dataset directory that ``python -m crawl dataset`` writes.

Rows are trl's conversational prompt/completion format (docs/architecture.md), which
makes trl take the loss on the completion only and train its end-of-sequence
token. Every row is checked here, before any model is loaded, so a broken
file is reported as ``file:line`` and not as a stack trace from inside trl.
Rows longer than ``max_length`` are dropped and counted rather than truncated:
a truncated completion loses its EOS, and a model that never sees the EOS is
a model that does not stop.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.chat import TEMPLATE_KWARGS, encode_conversation
from finetune.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

SPLIT_FILES = ("train.jsonl", "test.jsonl")
PROMPT_ROLES = {"system", "user", "assistant"}

Row = dict[str, Any]


def check_messages(value: Any, key: str, where: str) -> None:
    """A non-empty list of chat messages; a prompt ends with the user, a completion is the assistant's."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: {key!r} must be a non-empty list of chat messages")
    for message in value:
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise UserError(f"{where}: every {key!r} message needs a 'role' and a 'content' string")
        if not message["content"].strip():
            raise UserError(f"{where}: a {key!r} message has empty content")
    roles = [m["role"] for m in value]
    if key == "prompt" and (set(roles) - PROMPT_ROLES or roles[-1] != "user"):
        raise UserError(f"{where}: the prompt must end with a user message (roles were {roles})")
    if key == "completion" and set(roles) != {"assistant"}:
        raise UserError(f"{where}: the completion must be assistant messages (roles were {roles})")


def read_jsonl(path: Path, check: Callable[[Any, str], None]) -> list[Row]:
    """The rows of one JSONL file, each passed to ``check(row, "file:line")`` before it is kept.

    Both trainers' data goes through here, so a broken line is reported the
    same way whichever set it is in.
    """
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
            check(row, where)
            rows.append(row)
    return rows


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict) or "prompt" not in row or "completion" not in row:
        raise UserError(f"{where}: each row needs 'prompt' and 'completion' message lists")
    check_messages(row["prompt"], "prompt", where)
    check_messages(row["completion"], "completion", where)


def read_rows(path: Path) -> list[Row]:
    """The prompt/completion rows of one JSONL file, each checked; other columns are kept."""
    if not path.is_file():
        raise UserError(
            f"{path} not found: point --dataset at a directory written by `python -m crawl dataset`"
        )
    rows = read_jsonl(path, _check_row)
    if not rows:
        raise UserError(
            f"{path} has no rows: build the dataset again with `python -m crawl dataset`"
        )
    return rows


@dataclass(frozen=True)
class DatasetSplits:
    train: list[Row]
    test: list[Row]
    sha256: str  # of train.jsonl + test.jsonl, recorded in the manifest


def load_dataset_dir(directory: str | Path) -> DatasetSplits:
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset directory {root} not found: pass --dataset DIR")
    train, test = (read_rows(root / name) for name in SPLIT_FILES)
    return DatasetSplits(train=train, test=test, sha256=dataset_hash(root))


def content_hash(files: Iterable[tuple[str, Path]]) -> str:
    """One sha256 over labelled files, so a run names exactly the data it saw."""
    digest = hashlib.sha256()
    for label, path in files:
        digest.update(label.encode())
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def dataset_hash(directory: str | Path) -> str:
    """Both split files of a dataset directory, as the run's manifest and pin record it."""
    return content_hash((name, Path(directory) / name) for name in SPLIT_FILES)


def conversation(row: Row) -> list[dict[str, str]]:
    return [*row["prompt"], *row["completion"]]


def token_length(tokenizer: PreTrainedTokenizerBase, row: Row) -> int:
    """Tokens of the templated prompt + completion, as trl will tokenize it."""
    return len(encode_conversation(tokenizer, conversation(row)))


@dataclass(frozen=True)
class LengthFilter:
    kept: list[Row]
    dropped: int
    longest: int


def drop_long_rows(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[Row], max_length: int
) -> LengthFilter:
    lengths = [token_length(tokenizer, row) for row in rows]
    kept = [row for row, n in zip(rows, lengths, strict=True) if n <= max_length]
    return LengthFilter(kept=kept, dropped=len(rows) - len(kept), longest=max(lengths, default=0))


def to_hf_dataset(rows: Sequence[Row]) -> Dataset:
    """The two columns trl trains on, and how to tokenize them; ids and URLs stay in the JSONL.

    trl passes each row's ``chat_template_kwargs`` to ``apply_chat_template``:
    a forum post that quotes ``</s>`` or ``<|im_end|>`` is trained on as text,
    not as the end of a turn.
    """
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": r["prompt"],
                "completion": r["completion"],
                "chat_template_kwargs": dict(TEMPLATE_KWARGS),
            }
            for r in rows
        ]
    )
