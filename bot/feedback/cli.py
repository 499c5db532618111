"""``python -m bot feedback export``: the feedback store as trl preference datasets.

python -m bot feedback export --db data/feedback.sqlite --out data/preferences \\
    [--adapter-hash H] [--min-votes N] [--test-fraction F] [--seed S]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from bot.feedback.export import ExportOptions, export_feedback
from bot.feedback.store import DEFAULT_FEEDBACK_DB
from freeski_common.cli import ArgumentParser
from freeski_common.errors import cli_entry


def parser() -> argparse.ArgumentParser:
    root = ArgumentParser(
        prog="python -m bot feedback",
        description="Work with the votes the bot collected (FEEDBACK_DB).",
    )
    commands = root.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export",
        help="write preferences.jsonl / ratings.jsonl (train and test) and stats.json",
        description="Turn votes into trl datasets: /compare votes into preference pairs "
        "(majority per pair; ties and 'both bad' left out), 👍/👎 into unpaired ratings; "
        "split train/test by conversation.",
    )
    defaults = ExportOptions()
    export.add_argument("--db", default=DEFAULT_FEEDBACK_DB, help="the feedback store")
    export.add_argument("--out", required=True, help="directory to write the dataset to")
    export.add_argument(
        "--adapter-hash",
        help="only votes on answers of this adapter (its weights hash, shown in stats.json "
        "under adapters_in_db); default: every adapter",
    )
    export.add_argument(
        "--min-votes",
        type=int,
        default=defaults.min_votes,
        help="votes a pair or an answer needs to be kept (default: %(default)s)",
    )
    export.add_argument(
        "--test-fraction",
        type=float,
        default=defaults.test_fraction,
        help="share of conversations held out for test (default: %(default)s)",
    )
    export.add_argument(
        "--seed", type=int, default=defaults.seed, help="split seed (default: %(default)s)"
    )
    return root


@cli_entry
def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    options = ExportOptions(
        adapter_hash=args.adapter_hash,
        min_votes=args.min_votes,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    stats = export_feedback(args.db, args.out, options)
    prefs, ratings = stats["preferences"], stats["ratings"]
    print(
        f"{prefs['kept']} preference pairs (train {prefs['splits']['train']}, "
        f"test {prefs['splits']['test']}; dropped {_dropped(prefs)}), "
        f"{ratings['kept']} ratings (train {ratings['splits']['train']}, "
        f"test {ratings['splits']['test']}; dropped {_dropped(ratings)}) written to {args.out}"
    )
    return 0


def _dropped(section: dict[str, Any]) -> str:
    return ", ".join(f"{why} {n}" for why, n in section["dropped"].items()) or "none"
