"""What grounding adds to each answer: the search's latency, the prompt's tokens, the answer's time.

Every thread title of a forum store is asked as a question through the
serving core's :class:`~bot.serving.grounding.GroundedEngine` (the search runs
in a thread, as when serving); with ``--model`` the prompts are counted in that
model's tokens and, with ``--answers N``, N questions are answered greedily by
the local engine with and without grounding.

    python benchmarks/grounding_overhead.py --db data/forum.sqlite \\
        [--model .cache/smollm2-135m-instruct] [--k 3] [--answers 5]

The last line is JSON: search p50/p95 (ms), prompt tokens with and without
context (mean), and answer seconds with and without grounding (mean).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.serving.engine import Message
from bot.serving.grounding import GroundedEngine, grounded_messages
from bot.serving.settings import EngineSettings


def titles(db: Path) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        return [row[0] for row in connection.execute("SELECT DISTINCT title FROM passages")]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def measure(args: argparse.Namespace) -> dict[str, object]:
    questions = titles(args.db)
    local = None
    if args.model and args.answers:
        from bot.serving.local_engine import LocalEngine

        settings = EngineSettings(
            base_model=str(args.model), load_in_4bit=False, max_new_tokens=32, temperature=0.0
        )
        local = LocalEngine(settings, device="cpu")
    inner = local if local is not None else _NoModel()
    engine = GroundedEngine(inner, args.db, args.k)
    await engine.start()
    result: dict[str, object] = {"questions": len(questions), "k": args.k}
    try:
        searches, prompts = [], []
        for question in questions:
            asked: list[Message] = [{"role": "user", "content": question}]
            started = time.perf_counter()
            passages = await engine._passages(asked)
            searches.append((time.perf_counter() - started) * 1000)
            prompts.append((asked, grounded_messages(asked, passages)))
        result["search_ms_p50"] = round(percentile(searches, 0.5), 2)
        result["search_ms_p95"] = round(percentile(searches, 0.95), 2)
        if args.model:
            from finetune.generation import encode_chats
            from finetune.modeling import load_tokenizer

            tokenizer = load_tokenizer(args.model)

            def tokens(messages: list[Message]) -> int:
                return len(encode_chats(tokenizer, [messages])["input_ids"][0])

            result["prompt_tokens_without"] = round(statistics.mean(tokens(a) for a, _ in prompts))
            result["prompt_tokens_with"] = round(statistics.mean(tokens(g) for _, g in prompts))
        if local is not None:
            for grounding in (False, True):
                spent = []
                for question in questions[: args.answers]:
                    started = time.perf_counter()
                    await engine.generate(
                        [{"role": "user", "content": question}], variant="base", grounding=grounding
                    )
                    spent.append(time.perf_counter() - started)
                key = "answer_s_with" if grounding else "answer_s_without"
                result[key] = round(statistics.mean(spent), 2)
    finally:
        await engine.close()
    return result


class _NoModel:
    """An inner engine for search-only runs: never asked to answer."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True, help="an indexed forum store")
    parser.add_argument("--model", type=Path, help="a local model directory (tokens, answers)")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--answers", type=int, default=0, help="questions answered per mode")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args))))


if __name__ == "__main__":
    main()
