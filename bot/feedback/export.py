"""Votes → trl datasets: preference pairs from ``/compare``, unpaired ratings from 👍/👎.

``preferences.jsonl`` rows are trl's conversational preference format
(``prompt`` / ``chosen`` / ``rejected``) for ``DPOTrainer``; ``ratings.jsonl``
rows are its unpaired format (``prompt`` / ``completion`` / ``label``) for
KTO-style trainers. The prompt is the conversation exactly as the model saw
it, system prompt included. A pair may be any two served models (base vs an
adapter, or two adapters): the side its majority voted for is ``chosen``, the
other ``rejected``. Split or "tie" majorities, "both bad" majorities and
pairs with fewer than ``min_votes`` votes are left out and counted in
``stats.json``, like everything else that is dropped.

The split is by thread, as for the crawl dataset: a conversation's rows all
land on the same side, in both files, decided by a seeded hash of its thread
key, so the same database and seed always give the same files.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bot.feedback.records import CHOICES, StoredAnswer, StoredPair
from bot.feedback.store import FeedbackStore
from crawl.dataset import _write_atomically, split_threads
from finetune.dpo_data import PREFERENCES_FILE, SPLITS
from freeski_common.errors import UserError

RATINGS_FILE = "ratings.jsonl"
STATS_FILE = "stats.json"
# Export reads; it never hashes a voter, so it needs (and creates) no salt file.
_READ_ONLY_SALT = b"feedback export does not hash voters"


@dataclass(frozen=True)
class ExportOptions:
    adapter_hash: str | None = None  # only answers of this adapter; None: every adapter
    min_votes: int = 1
    test_fraction: float = 0.1
    seed: int = 0


def preference_row(pair: StoredPair, min_votes: int) -> tuple[dict[str, Any] | None, str | None]:
    """The pair as a trl preference row (the majority's side chosen), or None and why it was dropped."""
    counts = {choice: pair.counts.of(choice) for choice in CHOICES}
    total = sum(counts.values())
    if total == 0:
        return None, "no_votes"
    if total < min_votes:
        return None, "too_few_votes"
    top = max(counts.values())
    leaders = [choice for choice in CHOICES if counts[choice] == top]
    if len(leaders) > 1 or leaders == ["tie"]:
        return None, "tie"
    (winner,) = leaders
    if winner == "both_bad":
        return None, "both_bad"
    if pair.a.conversation != pair.b.conversation:
        return None, "prompt_mismatch"  # e.g. a web page that kept two separate histories
    chosen, rejected = (pair.a, pair.b) if winner == "a" else (pair.b, pair.a)
    if not chosen.text.strip() or not rejected.text.strip():
        return None, "empty_answer"
    if chosen.text.strip() == rejected.text.strip():
        return None, "identical_answers"
    return {
        "prompt": pair.a.conversation,
        "chosen": [{"role": "assistant", "content": chosen.text}],
        "rejected": [{"role": "assistant", "content": rejected.text}],
        "winner": chosen.variant,
        "votes": counts,
        "sides": {
            side: {"model": answer.variant, "adapter_hash": answer.adapter.hash}
            for side, answer in (("a", pair.a), ("b", pair.b))
        },
        "pair_id": pair.pair_id,
        "thread_key": pair.b.thread_key,
    }, None


def rating_row(answer: StoredAnswer, min_votes: int) -> tuple[dict[str, Any] | None, str | None]:
    """The answer as a trl unpaired row (label true = 👍 majority), or None and why not."""
    up, down = answer.counts.up, answer.counts.down
    if up + down == 0:
        return None, "no_votes"
    if up + down < min_votes:
        return None, "too_few_votes"
    if up == down:
        return None, "tie"
    if not answer.text.strip():
        return None, "empty_answer"
    return {
        "prompt": answer.conversation,
        "completion": [{"role": "assistant", "content": answer.text}],
        "label": up > down,
        "votes": {"up": up, "down": down},
        "answer_id": answer.answer_id,
        "variant": answer.variant,
        "thread_key": answer.thread_key,
        "adapter_hash": answer.adapter.hash,
    }, None


def export_feedback(db: str | Path, out_dir: str | Path, options: ExportOptions) -> dict[str, Any]:
    """Write ``{train,test}/preferences.jsonl``, ``{train,test}/ratings.jsonl`` and ``stats.json``."""
    if options.min_votes < 1:
        raise UserError(f"--min-votes {options.min_votes}: give at least 1")
    if not 0 <= options.test_fraction < 1:
        raise UserError(f"--test-fraction {options.test_fraction}: give a number in [0, 1)")
    db_path = Path(db).expanduser()
    if not db_path.is_file():
        raise UserError(f"--db {db_path}: no such file (the bot creates it at FEEDBACK_DB)")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a directory")

    with FeedbackStore(db_path, salt=_READ_ONLY_SALT) as store:
        pairs = store.pairs(adapter_hash=options.adapter_hash)
        answers = store.answers(adapter_hash=options.adapter_hash)
        adapters = Counter(a.adapter.hash or "none" for a in store.answers())

    kept: dict[str, list[dict[str, Any]]] = {"preferences": [], "ratings": []}
    dropped: dict[str, Counter[str]] = {"preferences": Counter(), "ratings": Counter()}
    for pair in pairs:
        row, why = preference_row(pair, options.min_votes)
        _keep(row, why, kept["preferences"], dropped["preferences"])
    for answer in answers:
        row, why = rating_row(answer, options.min_votes)
        _keep(row, why, kept["ratings"], dropped["ratings"])
    if not kept["preferences"] and not kept["ratings"]:
        reasons = ", ".join(
            f"{kind} {why} {n}" for kind, counts in dropped.items() for why, n in counts.items()
        )
        raise UserError(
            f"no usable votes in {db_path}"
            + (f" for adapter {options.adapter_hash}" if options.adapter_hash else "")
            + (f" ({reasons})" if reasons else " (no answers were voted on)")
        )

    threads = {row["thread_key"] for rows in kept.values() for row in rows}
    test_threads = split_threads(threads, options.test_fraction, options.seed)
    files: dict[Path, str] = {}
    stats: dict[str, Any] = {
        "db": str(db_path),
        "pairs": len(pairs),
        "answers": len(answers),
        "threads": {
            "train": len(threads - test_threads),
            "test": len(test_threads),
        },
        "adapters_in_db": dict(sorted(adapters.items())),
        "options": asdict(options),
    }
    for kind, filename in (("preferences", PREFERENCES_FILE), ("ratings", RATINGS_FILE)):
        split_rows = {
            "train": [r for r in kept[kind] if r["thread_key"] not in test_threads],
            "test": [r for r in kept[kind] if r["thread_key"] in test_threads],
        }
        for split, rows in split_rows.items():
            files[out / split / filename] = "".join(_jsonl(r) for r in rows)
        stats[kind] = {
            "kept": len(kept[kind]),
            "splits": {split: len(rows) for split, rows in split_rows.items()},
            "dropped": dict(sorted(dropped[kind].items())),
        }
    stats["preferences"]["winners"] = dict(
        sorted(Counter(r["winner"] for r in kept["preferences"]).items())
    )
    stats["ratings"]["labels"] = {
        "up": sum(r["label"] for r in kept["ratings"]),
        "down": sum(not r["label"] for r in kept["ratings"]),
    }
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    files[out / STATS_FILE] = _json(stats)
    _write_atomically(files)
    return stats


def _keep(
    row: dict[str, Any] | None, why: str | None, rows: list[dict[str, Any]], dropped: Counter[str]
) -> None:
    if row is not None:
        rows.append(row)
    elif why is not None:
        dropped[why] += 1


def _jsonl(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
