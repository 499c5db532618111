"""How much the batched inference worker gains over answering one question at a time.

Builds a tiny Mistral big enough that a forward pass is real work (hidden 256,
4 layers) with a random LoRA adapter, loads it the way the bot does (4-bit
NF4, adapter unmerged) and measures, through :class:`bot.serving.local_engine.LocalEngine`:

* 16 concurrent questions of 64 new tokens vs the same 16 one at a time
  (generated tokens per second);
* one ``/compare`` as a mixed base+finetuned batch vs two separate passes.

Prints a table and, as its last line, JSON with the ratios. Not a test: it
asserts nothing about timing. ``--device cuda`` measures on a GPU.

    python benchmarks/worker_throughput.py [--requests 16] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.serving.local_engine import LocalEngine
from bot.serving.settings import EngineSettings
from finetune.modeling import load_for_inference
from finetune.tiny_model import TinyModelSpec, build_tiny_model

SPECS = {
    "bench": TinyModelSpec(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}

QUESTIONS = [
    "What length skis should I get for park if I'm 180 cm?",
    "Is it worth waxing my skis myself?",
    "How do I stop my tips crossing in powder?",
    "Which bindings are best for a first touring setup, and how heavy should they be?",
    "Are twin tips okay for carving on groomers?",
    "How often should I sharpen my edges?",
    "What's the difference between rocker and camber?",
    "Any tips for skiing moguls without burning my legs?",
]


def build_model(workdir: Path, spec: TinyModelSpec) -> tuple[Path, Path]:
    """The benchmark model and a random, non-zero LoRA adapter saved like a run's adapter/."""
    import torch
    from peft import LoraConfig

    from finetune.modeling import (
        QuantOptions,
        attach_new_adapter,
        load_base_model,
        load_tokenizer,
        save_adapter,
    )

    model_dir = build_tiny_model(workdir / "model", seed=0, spec=spec)
    torch.manual_seed(0)
    model = load_base_model(model_dir, quant=QuantOptions(load_in_4bit=False), device="cpu")
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    adapter_dir = save_adapter(
        attach_new_adapter(model, lora), workdir / "adapter", load_tokenizer(model_dir)
    )
    return model_dir, adapter_dir


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


async def timed(coro) -> tuple[float, object]:
    started = time.perf_counter()
    result = await coro
    return time.perf_counter() - started, result


async def measure(engine: LocalEngine, requests: int, repeats: int) -> dict[str, float]:
    async def batched():
        return await asyncio.gather(
            *(engine.generate(question(i), variant="finetuned") for i in range(requests))
        )

    async def sequential():
        return [await engine.generate(question(i), variant="finetuned") for i in range(requests)]

    async def two_pass():
        return [
            await engine.generate(question(0), variant="base"),
            await engine.generate(question(0), variant="finetuned"),
        ]

    await engine.generate(question(0), variant="finetuned")  # warm up kernels and caches
    runs: dict[str, list[tuple[float, int]]] = {}
    for _ in range(repeats):
        for name, run in (
            ("sequential", sequential),
            ("batched", batched),
            ("two_pass", two_pass),
            ("mixed", lambda: engine.compare(question(0))),
        ):
            seconds, answers = await timed(run())
            runs.setdefault(name, []).append((seconds, sum(a.completion_tokens for a in answers)))
    result: dict[str, float] = {}
    for name, samples in runs.items():
        result[f"{name}_s"] = statistics.median(s for s, _ in samples)
        result[f"{name}_tokens_per_s"] = statistics.median(t / s for s, t in samples)
    return result


async def latency_by_concurrency(
    engine: LocalEngine, levels: list[int]
) -> dict[str, dict[str, float]]:
    """Tokens/s and p50/p95 answer latency with ``users`` questions in flight at once."""
    table: dict[str, dict[str, float]] = {}
    for users in levels:
        started = time.perf_counter()
        answers = await asyncio.gather(
            *(engine.generate(question(i), variant="finetuned") for i in range(users))
        )
        wall = time.perf_counter() - started
        latencies = sorted(a.total_s for a in answers)
        table[str(users)] = {
            "tokens_per_s": round(sum(a.completion_tokens for a in answers) / wall, 1),
            "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
        }
    return table


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapter_dir = build_model(Path(tmp), SPECS[args.spec])
        settings = EngineSettings(
            base_model=str(model_dir),
            adapter_path=adapter_dir,
            load_in_4bit=not args.no_4bit,
            max_batch=args.requests,
            queue_size=4 * args.requests,
            max_new_tokens=args.new_tokens,
            temperature=0.0,
        )
        model, tokenizer = load_for_inference(
            model_dir, adapter_dir, load_in_4bit=not args.no_4bit, device=args.device
        )
        # Every answer runs its full length, so the ratios measure the worker rather
        # than where a random model happens to emit end-of-sequence.
        model.get_base_model().generation_config.min_new_tokens = args.new_tokens
        engine = LocalEngine(settings, model_and_tokenizer=(model, tokenizer))
        await engine.start()
        try:
            result = await measure(engine, args.requests, args.repeats)
            latency = await latency_by_concurrency(engine, [1, 4, args.requests])
        finally:
            await engine.close()
    return {
        "batched_vs_sequential": result["batched_tokens_per_s"] / result["sequential_tokens_per_s"],
        "compare_mixed_vs_two_pass": result["two_pass_s"] / result["mixed_s"],
        **{k: round(v, 4) for k, v in result.items()},
        "latency_by_users": latency,
        "device": args.device or "auto",
        "spec": args.spec,
        "load_in_4bit": not args.no_4bit,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spec", choices=sorted(SPECS), default="bench")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the best there is)")
    parser.add_argument("--no-4bit", action="store_true", help="plain weights instead of NF4")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    for key in ("sequential", "batched", "two_pass", "mixed"):
        print(
            f"{key:>10}: {report[f'{key}_s']:.2f} s, {report[f'{key}_tokens_per_s']:.0f} tokens/s"
        )
    for users, row in report["latency_by_users"].items():
        print(
            f"{users:>3} users: {row['tokens_per_s']:.0f} tokens/s, p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s"
        )
    report["batched_vs_sequential"] = round(report["batched_vs_sequential"], 2)
    report["compare_mixed_vs_two_pass"] = round(report["compare_mixed_vs_two_pass"], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
