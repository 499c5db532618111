"""Does a config generalise? Finetune SmolLM2 on a forum nothing in the project was tuned on.

``configs/smollm2-cpu.yaml`` was chosen on the bundled sample forum; this
renders a second forum (``benchmarks/unseen_forum/threads.yaml``: other
threads, other people), serves it on loopback, crawls it, builds its dataset
and runs the operator's commands on it:

    python -m finetune get-model smollm2-135m-instruct --out .cache/smollm2-135m-instruct
    python -m finetune --config configs/smollm2-cpu.yaml --model … --dataset … --output-dir … --max-steps 60
    python -m finetune evaluate --run … --knowledge benchmarks/unseen_forum/knowledge.jsonl --forum-db …

    python benchmarks/unseen_forum.py [--workdir DIR] [--max-steps 60]

The last line is JSON: {"base_loss": …, "finetuned_loss": …, "verdict": …, "knowledge": […]},
"knowledge" holding the knowledge check's shares (stated, reached, recall@k) per model and mode.
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
FORUM = REPO / "benchmarks" / "unseen_forum" / "threads.yaml"
KNOWLEDGE = FORUM.with_name("knowledge.jsonl")
MODEL = REPO / ".cache" / "smollm2-135m-instruct"

from forums import crawl_forum, run  # noqa: E402  (benchmarks/ is this script's folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to write (default: a temporary directory)")
    parser.add_argument("--max-steps", default="60")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch)
        dataset, run_dir = work / "dataset", work / "run"
        db = crawl_forum(FORUM, work)
        run("crawl", "dataset", "--db", str(db), "--out", str(dataset), "--context", "3")
        run("finetune", "get-model", "smollm2-135m-instruct", "--out", str(MODEL))
        run(
            "finetune",
            "--config",
            "configs/smollm2-cpu.yaml",
            "--model",
            str(MODEL),
            "--dataset",
            str(dataset),
            "--output-dir",
            str(run_dir),
            "--max-steps",
            args.max_steps,
        )
        run(
            "finetune",
            "evaluate",
            "--run",
            str(run_dir),
            "--max-new-tokens",
            "64",
            "--knowledge",
            str(KNOWLEDGE),
            "--forum-db",
            str(db),
        )
        result = json.loads((run_dir / "evaluation.json").read_text())
        knowledge = json.loads((run_dir / "knowledge.json").read_text())
        keys = ("base_loss", "finetuned_loss", "base_perplexity", "finetuned_perplexity")
        summary = {k: result[k] for k in keys}
        summary.update(verdict=result["verdict"], knowledge=knowledge["shares"])
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
