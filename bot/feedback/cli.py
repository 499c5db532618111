"""``python -m bot feedback``: the votes as trl preference datasets, or as a leaderboard.

python -m bot feedback export --db data/feedback.sqlite --out data/preferences \\
    [--adapter-hash H] [--min-votes N] [--test-fraction F] [--seed S]
python -m bot feedback leaderboard --db data/feedback.sqlite [--json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bot.feedback.export import ExportOptions, export_feedback
from bot.feedback.leaderboard import read_leaderboard
from bot.feedback.store import DEFAULT_FEEDBACK_DB, FeedbackStore
from freeski_common.cli import ArgumentParser
from freeski_common.errors import UserError, cli_entry

# The leaderboard reads; it never hashes a voter, so it needs (and creates) no salt file.
_READ_ONLY_SALT = b"the leaderboard does not hash voters"


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
    board = commands.add_parser(
        "leaderboard",
        help="per model: answers and 👍/👎, head-to-head win rates, a Bradley-Terry ranking",
        description="Which model the community prefers: every served model (name and weights) "
        "with its 👍/👎 rate, each pair of models with wins, losses, ties and 'both bad' "
        "(win rate: a tie counts half, 'both bad' left out; 95%% Wilson intervals), and a "
        "Bradley-Terry ranking over all pairs.",
    )
    board.add_argument("--db", default=DEFAULT_FEEDBACK_DB, help="the feedback store")
    board.add_argument("--json", action="store_true", help="print JSON for machines")
    return root


@cli_entry
def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    if args.command == "leaderboard":
        return _leaderboard(args.db, as_json=args.json)
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


def _leaderboard(db: str, *, as_json: bool) -> int:
    path = Path(db).expanduser()
    if not path.is_file():
        raise UserError(f"--db {path}: no such file (the bot creates it at FEEDBACK_DB)")
    with FeedbackStore(path, salt=_READ_ONLY_SALT) as store:
        board = read_leaderboard(store)
    if as_json:
        print(json.dumps(board.to_json(), indent=2, ensure_ascii=False))
    else:
        print(board.to_text(), end="")
    return 0


def _dropped(section: dict[str, Any]) -> str:
    return ", ".join(f"{why} {n}" for why, n in section["dropped"].items()) or "none"
