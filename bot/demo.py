"""``make demo``: the whole product, offline, on the bundled sample forum and the tiny model.

Each step is the real command an operator runs (real HTTP to a loopback copy
of the forum, the real crawler, dataset builder and QLoRA trainer), and the
answers at the end come through the bot's engine, the same path as ``/compare``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from finetune.errors import UserError, cli_entry

QUESTIONS = (
    "What skis should I get for park and powder?",
    "How do I learn to land switch?",
    "Is a season pass worth it?",
)
ROOT = Path(__file__).resolve().parent.parent


def _step(number: int, title: str) -> float:
    print(f"\n[{number}/5] {title}", flush=True)
    return time.perf_counter()


def _done(started: float) -> None:
    print(f"      done in {time.perf_counter() - started:.1f} s", flush=True)


def _run(*args: str) -> None:
    """Run one of the product's own commands, as an operator would type it."""
    # Paths inside the checkout are shown (and passed) relative to it, as a user would type them.
    args = tuple(os.path.relpath(a, ROOT) if a.startswith(f"{ROOT}{os.sep}") else a for a in args)
    command = [sys.executable, "-m", *args]
    print("      $ python -m " + " ".join(args), flush=True)
    result = subprocess.run(command, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise UserError(f"demo step failed: python -m {' '.join(args)} exited {result.returncode}")


def _start_sample_forum() -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "crawl", "serve-sample", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline().strip()
    url = line.rsplit(" ", 1)[-1]
    if not url.startswith("http://127.0.0.1"):
        server.terminate()
        raise UserError(f"the sample forum did not start: {line or 'no output'}")
    return server, url


def _write_corpus(dataset: Path, out: Path) -> Path:
    """The crawled forum's own text, so the tiny model's tokenizer speaks its language."""
    with out.open("w", encoding="utf-8") as corpus:
        for split in ("train.jsonl", "test.jsonl"):
            for line in (dataset / split).read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                for message in (*row["prompt"], *row["completion"]):
                    corpus.write(message["content"] + "\n")
    return out


async def _compare(model_dir: Path, adapter_dir: Path) -> None:
    from bot.serving.local_engine import LocalEngine
    from bot.serving.settings import EngineSettings

    settings = EngineSettings(
        base_model=str(model_dir),
        adapter_path=adapter_dir,
        load_in_4bit=True,
        max_new_tokens=40,
        temperature=0.0,
    )
    engine = LocalEngine(settings)
    await engine.start()
    try:
        for question in QUESTIONS:
            base, tuned = await engine.compare([{"role": "user", "content": question}])
            print(f"\n      Q: {question}")
            for label, answer in (("base", base), ("finetuned", tuned)):
                text = textwrap.shorten(answer.text or "(empty)", width=200, placeholder=" …")
                print(f"      {label:>9}: {text}")
    finally:
        await engine.close()


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot.demo", description=__doc__)
    parser.add_argument("--workdir", default=".demo", help="where the demo writes (default: .demo)")
    parser.add_argument(
        "--keep", action="store_true", help="reuse the workdir instead of starting over"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = (ROOT / args.workdir).resolve()
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    db, dataset, model, run = (
        (work / "forum.sqlite"),
        (work / "dataset"),
        (work / "tiny-model"),
        (work / "run"),
    )
    total = time.perf_counter()
    print("Freeski bot demo: the whole pipeline, offline, on a sample forum and a tiny model.")

    started = _step(1, "Crawl the bundled sample forum over HTTP (loopback) into SQLite")
    server, url = _start_sample_forum()
    try:
        print(f"      sample forum at {url}")
        _run("crawl", "fetch", "--forum-url", url, "--db", str(db), "--delay", "0")
    finally:
        server.terminate()
        server.wait(timeout=10)
    _done(started)

    started = _step(2, "Build the question/answer dataset (clean, dedupe, split by thread)")
    _run("crawl", "dataset", "--db", str(db), "--out", str(dataset))
    _done(started)

    started = _step(
        3, "Build a tiny Mistral-architecture model (random weights, BPE on the forum text)"
    )
    corpus = _write_corpus(dataset, work / "corpus.txt")
    _run(
        "finetune",
        "tiny-model",
        "--out",
        str(model),
        "--corpus",
        str(corpus),
        "--hidden-size",
        "128",
        "--intermediate-size",
        "256",
    )
    _done(started)

    started = _step(4, "QLoRA-finetune it: 4-bit NF4 base, LoRA adapter, trl's SFTTrainer")
    _run(
        "finetune",
        "--config",
        "configs/tiny-cpu.yaml",
        "--model",
        str(model),
        "--dataset",
        str(dataset),
        "--output-dir",
        str(run),
    )
    _done(started)

    started = _step(
        5, "Ask through the bot's engine, base vs finetuned (one mixed batch, like /compare)"
    )
    asyncio.run(_compare(model, run / "adapter"))
    _done(started)

    rel = run.relative_to(ROOT) if run.is_relative_to(ROOT) else run
    print(
        f"\nAll done in {time.perf_counter() - total:.0f} s. Look at {rel}/loss.png and {rel}/samples.md."
        "\nThe tiny model's answers are nonsense by design. To do it for real (GPU, Mistral-7B,"
        "\nDiscord): README.md, 'Doing it for real'."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
