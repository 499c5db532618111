"""What serving several adapters from one base costs: throughput by mix, memory, the load pause.

Saves five random rank-16 all-linear LoRA adapters (A and B both random and
non-zero, so every adapter answers its own way) for the chosen base, serves
them through :class:`bot.serving.local_engine.LocalEngine` (4-bit NF4 base,
adapters unmerged, loaded at runtime one by one) and measures, in one run:

* 16 concurrent questions × 64 new tokens all on one adapter, then spread
  over base + 1, 2 and 4 adapters: tokens/s and its ratio to the
  single-adapter throughput, with batched LoRA and with peft's own routing
  (:meth:`ModelRunner.use_batched_lora` switches between them);
* memory per extra adapter: the process's RSS, peft's LoRA tensors and the
  batched-LoRA stacks, after each of the first four is loaded and used;
* the fifth adapter loaded while 8 answers stream: the longest gap between
  two consecutive streamed deltas of those answers during the load, against
  the longest before it.

Every answer runs its full length (end-of-sequence is held back), so the
ratios measure the routing rather than where a random model stops. Prints a
table; ``--json FILE`` writes the figures. Not a test: nothing is asserted
about timing, and on a shared CPU only ratios within one run mean much.

    python benchmarks/multi_adapter.py [--model tiny|smollm2] [--requests 16] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker_throughput import QUESTIONS, SPECS  # the same model and questions

from bot.serving.local_engine import LocalEngine
from bot.serving.settings import EngineSettings
from finetune.tiny_model import build_tiny_model

TINY = SPECS["bench"]  # worker_throughput.py's model: big enough that a pass is real work
ADAPTERS = ["a1", "a2", "a3", "a4"]  # served for the mixes; a fifth is loaded mid-stream
LOADED_LATE = "a5"
# How the rows are spread: row i runs on mix[i % len(mix)].
MIXES: dict[str, list[str]] = {
    "one adapter": ["a1"],
    "base + one adapter": ["base", "a1"],
    "two adapters": ["a1", "a2"],
    "four adapters": ADAPTERS,
    "base + four adapters": ["base", *ADAPTERS],
}


def base_model(name: str, workdir: Path) -> Path:
    """The base to serve: the tiny bench model, built here, or SmolLM2 from the checkout's cache."""
    if name == "tiny":
        return build_tiny_model(workdir / "model", seed=0, spec=TINY)
    from bot.demo import MODEL_CACHE, MODEL_NAME
    from finetune.get_model import get_model

    path, _ = get_model(MODEL_NAME, MODEL_CACHE)
    return Path(path)


def save_adapters(base: Path, workdir: Path, names: list[str]) -> dict[str, Path]:
    """One random rank-16 all-linear adapter per name, each from its own seed, saved as runs save."""
    from finetune.tiny_model import save_random_adapter

    return {
        name: save_random_adapter(
            base, workdir / name, seed=seed, r=16, lora_alpha=32, target_modules="all-linear"
        )
        for seed, name in enumerate(names, start=1)
    }


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def lora_bytes(model: Any, name: str) -> int:
    """Bytes of adapter ``name``'s tensors in peft's layers."""
    return sum(
        p.nbytes
        for key, p in model.named_parameters()
        if f".{name}." in key and (".lora_" in key or "modules_to_save" in key)
    )


async def throughput(engine: LocalEngine, requests: int, new_tokens: int, repeats: int) -> dict:
    """Tokens/s of ``requests`` questions at once, for every mix."""
    result: dict[str, float] = {}
    for mix_name, mix in MIXES.items():
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            answers = await asyncio.gather(
                *(engine.generate(question(i), variant=mix[i % len(mix)]) for i in range(requests))
            )
            wall = time.perf_counter() - started
            samples.append(sum(a.completion_tokens for a in answers) / wall)
        result[mix_name] = statistics.median(samples)
    return result


async def memory(engine: LocalEngine, paths: dict[str, Path]) -> list[dict[str, float]]:
    """Load each adapter, answer once with it (which builds the stacks), and see what grew."""
    runner = engine.worker.runner
    await engine.generate(question(0), variant="base")
    gc.collect()
    rss, stacks = rss_bytes(), runner.stacked_bytes
    rows = []
    for name in ADAPTERS:
        await engine.load_adapter(name, paths[name])
        await engine.generate(question(0), variant=name)
        gc.collect()
        now_rss, now_stacks = rss_bytes(), runner.stacked_bytes
        rows.append(
            {
                "adapter": name,
                "file_mb": (paths[name] / "adapter_model.safetensors").stat().st_size / 1e6,
                "peft_tensors_mb": lora_bytes(runner.model, name) / 1e6,
                "stacks_delta_mb": (now_stacks - stacks) / 1e6,
                "rss_delta_mb": (now_rss - rss) / 1e6,
            }
        )
        rss, stacks = now_rss, now_stacks
    return rows


async def load_pause(engine: LocalEngine, path: Path, streams: int, tokens: int) -> dict:
    """Load one adapter while ``streams`` answers stream; the longest delta gap before and during."""
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    flowing = asyncio.Event()

    def on_text(i: int) -> Any:
        def arrived(_: str) -> None:
            arrivals[i].append(time.perf_counter())
            if all(len(a) >= 4 for a in arrivals):
                flowing.set()

        return arrived

    answers = [
        asyncio.ensure_future(
            engine.generate(
                question(i),
                variant=ADAPTERS[i % len(ADAPTERS)],
                max_new_tokens=tokens,
                on_text=on_text(i),
            )
        )
        for i in range(streams)
    ]
    await flowing.wait()
    await asyncio.sleep(0.05)  # a few steady steps before the load, for the baseline
    load_from = time.perf_counter()
    await engine.load_adapter(LOADED_LATE, path)
    load_until = time.perf_counter()
    await asyncio.gather(*answers)
    before: list[float] = []
    during: list[float] = []
    outlasted = True
    for times in arrivals:
        gaps = list(itertools.pairwise(times[1:]))  # the first gap holds the prefill
        before += [b - a for a, b in gaps if b < load_from]
        # Every gap overlapping the load: the attach's step, the swap's, any between.
        during += [b - a for a, b in gaps if a <= load_until and b >= load_from]
        outlasted &= times[-1] > load_until
    return {
        "load_s": load_until - load_from,
        "longest_gap_before_s": max(before, default=0.0),
        "longest_gap_during_s": max(during, default=0.0),
        "streams_outlasted_load": outlasted,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        base = base_model(args.model, Path(tmp))
        paths = save_adapters(base, Path(tmp) / "adapters", [*ADAPTERS, LOADED_LATE])
        stream_tokens = args.stream_tokens or (256 if args.model == "tiny" else 64)
        settings = EngineSettings(
            base_model=str(base),
            load_in_4bit=True,
            max_batch=args.requests,
            queue_size=4 * args.requests,
            max_new_tokens=max(args.new_tokens, stream_tokens),
            temperature=0.0,
            repetition_penalty=1.0,
        )
        engine = LocalEngine(settings, device=args.device)
        await engine.start()
        try:
            runner = engine.worker.runner
            memory_rows = await memory(engine, paths)
            runner.min_new_tokens = max(args.new_tokens, stream_tokens)  # every answer runs full
            by_routing: dict[str, dict[str, float]] = {}
            for routing, batched in (("peft", False), ("batched", True)):
                runner.use_batched_lora(batched)
                await engine.generate(question(0), variant="a1", max_new_tokens=4)  # warm up
                by_routing[routing] = await throughput(
                    engine, args.requests, args.new_tokens, args.repeats
                )
            pause = await load_pause(engine, paths[LOADED_LATE], args.streams, stream_tokens)
        finally:
            await engine.close()
    single = {routing: tps["one adapter"] for routing, tps in by_routing.items()}
    return {
        "model": args.model,
        "device": args.device or "auto",
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "tokens_per_s": {r: {m: round(v, 1) for m, v in t.items()} for r, t in by_routing.items()},
        "ratio_to_one_adapter": {
            r: {m: round(v / single[r], 2) for m, v in t.items()} for r, t in by_routing.items()
        },
        "batched_vs_peft_one_adapter": {
            m: round(v / single["peft"], 2) for m, v in by_routing["batched"].items()
        },
        "memory_per_adapter": [
            {k: v if isinstance(v, str) else round(v, 2) for k, v in row.items()}
            for row in memory_rows
        ],
        "load_while_streaming": {
            "streams": args.streams,
            "stream_tokens": stream_tokens,
            **{k: v if isinstance(v, bool) else round(v, 3) for k, v in pause.items()},
        },
    }


def print_report(report: dict[str, Any]) -> None:
    ratios = report["ratio_to_one_adapter"]
    print(
        f"{report['model']}: {report['requests']} questions x {report['new_tokens']} tokens, "
        f"{report['repeats']} repetition(s); tokens/s (ratio to one adapter)"
    )
    print(f"{'rows spread over':<22}{'peft routing':>20}{'batched LoRA':>20}")
    for mix in MIXES:
        cells = [
            f"{report['tokens_per_s'][r][mix]:.0f} ({ratios[r][mix]:.2f})"
            for r in ("peft", "batched")
        ]
        print(f"{mix:<22}{cells[0]:>20}{cells[1]:>20}")
    print("memory per adapter (MB): file, peft tensors, stacks +, RSS +")
    for row in report["memory_per_adapter"]:
        print(
            f"  {row['adapter']}: {row['file_mb']:.1f}, {row['peft_tensors_mb']:.1f}, "
            f"{row['stacks_delta_mb']:.1f}, {row['rss_delta_mb']:.1f}"
        )
    pause = report["load_while_streaming"]
    print(
        f"loading one adapter while {pause['streams']} answers stream: {pause['load_s']:.3f} s; "
        f"longest gap {pause['longest_gap_during_s']:.3f} s during it, "
        f"{pause['longest_gap_before_s']:.3f} s before"
        + (
            ""
            if pause["streams_outlasted_load"]
            else " (the streams ended first: raise --stream-tokens)"
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--streams", type=int, default=8, help="answers streaming during the load")
    parser.add_argument(
        "--stream-tokens", type=int, default=None, help="their length (tiny: 256, smollm2: 64)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
