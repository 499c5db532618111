"""Reading the preference set that ``python -m bot feedback export`` writes.

``train/preferences.jsonl`` and ``test/preferences.jsonl`` hold trl's
conversational preference rows (``prompt`` / ``chosen`` / ``rejected``). Every
row is checked before a model is loaded, and a set too small to train on or
to hold out a test split from is refused in one line: a DPO run on three
votes is noise, and one without a test split cannot say if it helped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.chat import TEMPLATE_KWARGS
from finetune.data import LengthFilter, check_messages, content_hash, read_jsonl, token_length
from finetune.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

# The preference set's layout, written by `bot feedback export` (which imports these).
PREFERENCES_FILE = "preferences.jsonl"
SPLITS = ("train", "test")
EXPORT_HINT = "export votes with `python -m bot feedback export --db FEEDBACK_DB --out DIR`"

Row = dict[str, Any]


def read_preferences(path: Path) -> list[Row]:
    """The preference rows of one JSONL file, each checked; other columns are kept."""
    if not path.is_file():
        raise UserError(f"{path} not found: {EXPORT_HINT}")
    return read_jsonl(path, _check_pair)


def _check_pair(row: object, where: str) -> None:
    if not isinstance(row, dict) or not {"prompt", "chosen", "rejected"} <= set(row):
        raise UserError(f"{where}: each row needs 'prompt', 'chosen' and 'rejected'")
    check_messages(row["prompt"], "prompt", where)
    for key in ("chosen", "rejected"):
        check_messages(row[key], "completion", where)


@dataclass(frozen=True)
class PreferenceSplits:
    train: list[Row]
    test: list[Row]
    sha256: str


def load_preference_dir(directory: str | Path, *, min_pairs: int = 2) -> PreferenceSplits:
    """Both splits, or one line saying why this set cannot be trained on."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise UserError(f"preference set {root} not found: {EXPORT_HINT}")
    train, test = (read_preferences(root / split / PREFERENCES_FILE) for split in SPLITS)
    if not train and not test:
        raise UserError(
            f"the preference set {root} is empty: collect /compare votes, then export again"
        )
    if len(train) < min_pairs or not test:
        raise UserError(
            f"the preference set {root} is too small to split: {len(train)} train and "
            f"{len(test)} test pairs (need at least {min_pairs} train pairs and 1 test pair); "
            "collect more /compare votes or export with a larger --test-fraction"
        )
    return PreferenceSplits(train=train, test=test, sha256=preference_hash(root))


def preference_hash(directory: str | Path) -> str:
    return content_hash((split, Path(directory) / split / PREFERENCES_FILE) for split in SPLITS)


def drop_long_pairs(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[Row], max_length: int
) -> LengthFilter:
    """Leave out pairs whose longer side does not fit: a cut answer loses its end of turn."""
    lengths = [
        max(
            token_length(tokenizer, {"prompt": row["prompt"], "completion": row[side]})
            for side in ("chosen", "rejected")
        )
        for row in rows
    ]
    kept = [row for row, n in zip(rows, lengths, strict=True) if n <= max_length]
    return LengthFilter(kept=kept, dropped=len(rows) - len(kept), longest=max(lengths, default=0))


def to_preference_dataset(rows: Sequence[Row]) -> Dataset:
    """The three columns trl trains on, and how to tokenize them; votes and ids stay in the JSONL.

    ``chat_template_kwargs`` makes trl encode control tokens typed into a chat
    (``<|im_end|>``, ``</s>``) as text: a voter cannot forge a turn in the prompt.
    """
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": r["prompt"],
                "chosen": r["chosen"],
                "rejected": r["rejected"],
                "chat_template_kwargs": dict(TEMPLATE_KWARGS),
            }
            for r in rows
        ]
    )
