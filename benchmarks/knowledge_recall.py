"""Does the forum search find what a knowledge check asks about? No model involved.

For each shipped forum (the bundled sample forum and the unseen one), render
it, serve it on loopback, crawl it into a store, index it, and retrieve the
top k passages for every question of its knowledge check:

- recall@k: the question's source thread is among the k passages' threads;
- facts in the excerpts: every fact is stated by the excerpts of the first 3
  passages, as the bot quotes them under an answer (what reaches the user
  even when the model garbles the answer);
- facts in the passages: every fact is stated somewhere in the k passages
  (what a grounded model could read).

    python benchmarks/knowledge_recall.py [--k 1 3 5] [--workdir DIR]

The last line is JSON: {"sample": {"3": {"recall": …, "excerpts": …, "passages": …}, …}, "unseen": …}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from forums import crawl_forum  # noqa: E402

from finetune.knowledge import SHOWN_SOURCES, load_knowledge, states  # noqa: E402

FORUMS = {
    "sample": REPO / "crawl" / "sample_forum",
    "unseen": REPO / "benchmarks" / "unseen_forum",
}


def measure(db: Path, knowledge: Path, ks: list[int]) -> dict[str, dict[str, float]]:
    from crawl.search import Retriever

    items = load_knowledge(knowledge)
    results: dict[str, dict[str, float]] = {}
    with Retriever.open(db) as retriever:
        for k in ks:
            recall = quoted = read = 0
            for item in items:
                passages = retriever.search(item.question, k)
                recall += item.thread_id in {p.thread_id for p in passages}
                excerpts = [p.excerpt for p in passages[:SHOWN_SOURCES]]
                texts = [p.text for p in passages]
                quoted += all(any(states(t, f) for t in excerpts) for f in item.facts)
                read += all(any(states(t, f) for t in texts) for f in item.facts)
            n = len(items)
            results[str(k)] = {"recall": recall / n, "excerpts": quoted / n, "passages": read / n}
            print(
                f"{knowledge.relative_to(REPO)} ({n} questions), k={k}: recall {recall}/{n}, "
                f"facts in the shown excerpts {quoted}/{n}, facts in the passages {read}/{n}"
            )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--workdir", help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    summary = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, folder in FORUMS.items():
            work = Path(args.workdir or scratch) / name
            db = crawl_forum(folder / "threads.yaml", work, quiet=True)
            summary[name] = measure(db, folder / "knowledge.jsonl", args.k)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
