"""Time to first token and throughput of ``python -m bot api`` under staggered load, beside ``transformers serve``.

Starts this project's HTTP API on loopback over a model directory (by
default a tiny Mistral built here — hidden 256, 4 layers, 4-bit, with a
random LoRA adapter; ``--model DIR`` for SmolLM2 or a real model) and,
when the ``bench`` extra is installed, ``transformers serve
--continuous-batching`` over the same model, and sends both the same
streamed, greedy load, one server after the other, scenario by scenario:

* ``alone`` — a short question on an idle server;
* ``into_long`` — the same short question sent ``--into-s`` seconds into a
  256-token answer (continuous batching: it should not wait for that answer);
* ``concurrent`` — 16 questions at once, 64 tokens each;
* ``poisson`` — questions arriving as a Poisson process at a few rates;
* ``mixed`` (this project only, with an adapter) — ``concurrent`` with base
  and finetuned rows alternating, which ``transformers serve`` cannot do.

For each: p50/p95 time to first token, p50/p95 total latency, tokens/s
(completion tokens as each server reports them, over the scenario's wall
time). Prints a table and, as its last line, JSON with the targets. Not a
test: it asserts nothing about time. The machine's other load moves the
numbers; the two servers run in alternation so it moves both alike.

    python benchmarks/serving_latency.py [--model DIR] [--adapter DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHORT = [{"role": "user", "content": "Is it worth waxing my skis myself?"}]
LONG = [
    {
        "role": "user",
        "content": "Write a long, detailed guide to choosing, mounting, tuning and waxing a "
        "first pair of freeride skis, section by section.",
    }
]
QUESTIONS = [
    "What length skis should I get for park if I'm 180 cm?",
    "How do I stop my tips crossing in powder?",
    "Which bindings are best for a first touring setup, and how heavy should they be?",
    "Are twin tips okay for carving on groomers?",
    "How often should I sharpen my edges?",
    "What's the difference between rocker and camber?",
    "Any tips for skiing moguls without burning my legs?",
    "How should ski boots fit when I try them on?",
]
STARTUP_TIMEOUT_S = 600
PEER_BLOCK_TOKENS = 256  # transformers' continuous batching: tokens per cache block (page_size)


@dataclass
class Result:
    ttft_s: float | None = None
    total_s: float = 0.0
    tokens: int = 0
    error: str | None = None


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    models: dict[str, str]  # variant → the "model" field this server answers to
    log: Path
    notes: list[str] = field(default_factory=list)
    into_long_ratios: list[float] = field(default_factory=list)  # paired, round by round

    async def ask(
        self,
        session: aiohttp.ClientSession,
        messages: list[dict[str, str]],
        max_tokens: int,
        variant: str = "base",
    ) -> Result:
        """One streamed chat completion, timed from sending it to its first text and its end."""
        body = {
            "model": self.models[variant],
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        result = Result()
        started = time.perf_counter()
        try:
            async with session.post(f"{self.url}/v1/chat/completions", json=body) as response:
                if response.status != 200:
                    result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                    return result
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data:") :])
                    if "error" in chunk:
                        result.error = str(chunk["error"])[:200]
                    for choice in chunk.get("choices") or []:
                        if (choice.get("delta") or {}).get("content") and result.ttft_s is None:
                            result.ttft_s = time.perf_counter() - started
                    usage = chunk.get("usage")
                    if usage:
                        result.tokens = int(usage.get("completion_tokens") or 0)
        except aiohttp.ClientError as error:
            result.error = f"{type(error).__name__}: {error}"
        result.total_s = time.perf_counter() - started
        return result

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# ---- the two servers ---------------------------------------------------------------------------


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``url`` until it answers 200 (the bot's API answers 503 while its model loads)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited; its log:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise SystemExit(f"{url} does not exist on this server") from None
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"{url} did not come up in {STARTUP_TIMEOUT_S} s")


def thread_env(args: argparse.Namespace) -> dict[str, str]:
    """The same CPU thread count for both servers (``--threads``), or torch's own choice."""
    if args.threads is None:
        return {}
    return {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}


def launch(
    command: list[str], log: Path, tmp: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A server with its output in ``log``, run from ``tmp`` so no ``.env`` of the repository is read."""
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=tmp, env=env, stdout=out, stderr=out)


def start_ours(args: argparse.Namespace, model: Path, adapter: Path | None, tmp: Path) -> Server:
    log = tmp / "bot-api.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "INFERENCE_BACKEND": "local",
        "BASE_MODEL": str(model),
        "LOAD_IN_4BIT": "true" if args.four_bit else "false",
        "TEMPERATURE": "0",
        "REPETITION_PENALTY": "1.0",
        "MAX_NEW_TOKENS": "256",
        "MAX_BATCH": str(args.max_batch),
        "MAX_BATCH_TOKENS": str(args.max_batch_tokens),
        "QUEUE_SIZE": "256",
        "LOG_LEVEL": "INFO",
        **thread_env(args),
    }
    env.pop("ADAPTER_PATH", None)
    env.pop("API_TOKEN", None)
    if adapter is not None:
        env["ADAPTER_PATH"] = str(adapter)
    command = [sys.executable, "-m", "bot", "api", "--host", "127.0.0.1", "--port", "0"]
    process = launch(command, log, tmp, env)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        url = None
        while url is None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
            for line in log.read_text(errors="replace").splitlines():
                if " at http://" in line:  # it names the /v1 root
                    url = line.split(" at ")[1].split()[0].removesuffix("/v1")
        if url is None:
            raise SystemExit(f"python -m bot api did not start; its log:\n{log_tail(log)}")
        wait_until_up(f"{url}/healthz", process, log)
    except BaseException:
        stop_process(process)
        raise
    models = {"base": "base", "finetuned": "finetuned" if adapter is not None else "base"}
    return Server("bot api", url, process, models, log)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peer_available() -> str | None:
    """Why ``transformers serve`` cannot run here, or None when it can."""
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError:
        return "transformers is too old to have `transformers serve`"
    if not is_serve_available():
        return "the serving extra is missing: pip install -e '.[bench]'"
    return None


def start_peer(args: argparse.Namespace, model: Path, tmp: Path) -> Server:
    log = tmp / "transformers-serve.log"
    port = free_port()
    command = [
        sys.executable,
        "-c",
        "from transformers.cli.transformers import main; main()",
        "serve",
        str(model),
        "--continuous-batching",
        "--device",
        args.device or "auto",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # the same key/value cache as this project's MAX_BATCH_TOKENS, not most of the RAM
        "--cb-num-blocks",
        str(math.ceil(args.max_batch_tokens / PEER_BLOCK_TOKENS)),
    ]
    if args.four_bit:
        command += ["--quantization", "bnb-4bit"]
    process = launch(command, log, tmp, {**os.environ, **thread_env(args)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/v1/models", process, log)
    except BaseException:
        stop_process(process)
        raise
    return Server("transformers serve", url, process, {"base": str(model)}, log)


# ---- the load ---------------------------------------------------------------------------------


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


Results = dict[str, list[Result]]  # scenario name → one result per request


async def alone_then_into_long(server: Server, session: aiohttp.ClientSession, args) -> Results:
    """The short question on the idle server, then the same question sent ``into_s`` into a
    long answer: measured moments apart, so the machine's other load moves both alike.

    The long answer is noted too, so a reader can check it was still being written.
    """
    alone = await server.ask(session, SHORT, args.short_tokens)
    long = asyncio.ensure_future(server.ask(session, LONG, 256))
    await asyncio.sleep(args.into_s)
    sent = time.perf_counter()
    short = await server.ask(session, SHORT, args.short_tokens)
    long_result = await long
    still_writing = (time.perf_counter() - sent) < long_result.total_s
    server.notes.append(f"long answer {long_result.tokens} tokens, still writing: {still_writing}")
    if alone.ttft_s and short.ttft_s:
        server.into_long_ratios.append(short.ttft_s / alone.ttft_s)
    return {"alone": [alone], "into_long": [short]}


async def concurrent(
    server: Server, session: aiohttp.ClientSession, args, *, mixed: bool = False
) -> Results:
    variants = ["base", "finetuned"] if mixed else ["base"]
    results = await asyncio.gather(
        *(
            server.ask(session, question(i), args.tokens, variants[i % len(variants)])
            for i in range(args.requests)
        )
    )
    return {"mixed" if mixed else "concurrent": list(results)}


def poisson_at(rate: float) -> Callable[..., Awaitable[Results]]:
    async def poisson(server: Server, session: aiohttp.ClientSession, args) -> Results:
        rng = random.Random(f"{rate}")  # the same arrivals for both servers
        offsets, at = [], 0.0
        for _ in range(args.poisson_requests):
            at += rng.expovariate(rate)
            offsets.append(at)

        async def arrive(i: int, offset: float) -> Result:
            await asyncio.sleep(offset)
            return await server.ask(session, question(i), args.tokens)

        results = await asyncio.gather(*(arrive(i, o) for i, o in enumerate(offsets)))
        return {f"poisson_{rate:g}_per_s": list(results)}

    return poisson


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarise(results: list[Result], wall_s: float | None) -> dict[str, float | int | None]:
    """Percentiles over the requests; tokens/s only where ``wall_s`` is the load's own time."""
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    total = [r.total_s for r in ok]
    tokens = sum(r.tokens for r in ok)

    def r3(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "ttft_p50_s": r3(statistics.median(ttft) if ttft else None),
        "ttft_p95_s": r3(percentile(ttft, 0.95)),
        "total_p50_s": r3(statistics.median(total) if total else None),
        "total_p95_s": r3(percentile(total, 0.95)),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s else None,
        "wall_s": None if wall_s is None else round(wall_s, 2),
    }


async def measure(
    servers: list[Server], scenario: Callable[..., Awaitable[Results]], rounds: int, args
) -> dict[str, dict[str, dict]]:
    """Run ``scenario`` ``rounds`` times per server, alternating which goes first;
    name → server → summary."""
    collected: dict[str, dict[str, list[Result]]] = {}
    walls: dict[str, float] = {s.name: 0.0 for s in servers}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        for round_ in range(rounds):
            order = servers if round_ % 2 == 0 else list(reversed(servers))
            for server in order:
                started = time.perf_counter()
                for name, results in (await scenario(server, session, args)).items():
                    collected.setdefault(name, {}).setdefault(server.name, []).extend(results)
                took = time.perf_counter() - started
                walls[server.name] += took
                print(f"  {scenario.__name__} on {server.name}: {took:.1f} s", file=sys.stderr)
    single = len(collected) == 1  # the scenario's wall time is its load's own
    return {
        name: {
            server: summarise(results, walls[server] if single else None)
            for server, results in by_server.items()
        }
        for name, by_server in collected.items()
    }


async def warm_up(servers: list[Server]) -> None:
    async with aiohttp.ClientSession() as session:
        for server in servers:
            for _ in range(2):
                result = await server.ask(session, SHORT, 8)
                if result.error:
                    raise SystemExit(f"{server.name} failed a warm-up request: {result.error}")


# ---- the run ----------------------------------------------------------------------------------


def prepare_model(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path | None]:
    if args.model:
        adapter = None if args.adapter in (None, "none") else Path(args.adapter)
        return Path(args.model), adapter
    from worker_throughput import SPECS, build_model

    model, adapter = build_model(tmp, SPECS["bench"])
    return model, None if args.adapter == "none" else adapter


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 2)


async def run_scenarios(servers: list[Server], adapter: bool, args) -> dict[str, dict]:
    await warm_up(servers)
    scenarios = await measure(servers, alone_then_into_long, args.repeats, args)
    scenarios |= await measure(servers, concurrent, args.concurrent_rounds, args)
    for rate in args.rates:
        scenarios |= await measure(servers, poisson_at(rate), 1, args)
    if adapter:

        async def mixed(server: Server, session: aiohttp.ClientSession, args) -> Results:
            return await concurrent(server, session, args, mixed=True)

        scenarios |= await measure(servers[:1], mixed, args.concurrent_rounds, args)
    return scenarios


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        tmp = Path(workdir)
        model, adapter = prepare_model(args, tmp)
        why_not = "skipped (--no-peer)" if args.no_peer else peer_available()
        servers: list[Server] = []
        try:
            servers.append(start_ours(args, model, adapter, tmp))
            if why_not is None:
                servers.append(start_peer(args, model, tmp))
            scenarios = asyncio.run(run_scenarios(servers, adapter is not None, args))
        finally:
            for server in servers:
                server.stop()
    ours, peer = "bot api", "transformers serve"
    paired = {s.name: s.into_long_ratios for s in servers}

    def median_ratio(name: str) -> float | None:
        return round(statistics.median(paired[name]), 2) if paired[name] else None

    targets: dict[str, dict] = {
        "into_long_vs_alone_ttft": {"value": median_ratio(ours), "target": "<= 2"}
    }
    if len(servers) > 1:
        targets["peer_into_long_vs_alone_ttft"] = {
            "value": median_ratio(peer),
            "target": "(for reference)",
        }
        targets["concurrent_tokens_per_s_vs_peer"] = {
            "value": ratio(
                scenarios["concurrent"][ours]["tokens_per_s"],
                scenarios["concurrent"][peer]["tokens_per_s"],
            ),
            "target": ">= 1.0",
        }
        targets["concurrent_median_ttft_vs_peer"] = {
            "value": ratio(
                scenarios["concurrent"][ours]["ttft_p50_s"],
                scenarios["concurrent"][peer]["ttft_p50_s"],
            ),
            "target": "<= 1.0",
        }
    return {
        "model": str(args.model or "tiny bench model (hidden 256, 4 layers)"),
        "adapter": adapter is not None,
        "load_in_4bit": args.four_bit,
        "device": args.device or "auto",
        "max_batch": args.max_batch,
        "max_batch_tokens": args.max_batch_tokens,
        "threads": args.threads,
        "peer": "transformers serve --continuous-batching" if len(servers) > 1 else why_not,
        "scenarios": scenarios,
        "notes": {s.name: s.notes for s in servers},
        "into_long_vs_alone_ttft_by_round": {
            name: [round(r, 2) for r in ratios] for name, ratios in paired.items()
        },
        "targets": targets,
    }


def print_table(report: dict) -> None:
    columns = ("ttft_p50_s", "ttft_p95_s", "total_p50_s", "total_p95_s", "tokens_per_s", "errors")
    print(f"{'scenario':<20} {'server':<19}" + "".join(f"{c:>13}" for c in columns))
    for scenario, by_server in report["scenarios"].items():
        for server, row in by_server.items():
            cells = "".join(f"{'-' if row[c] is None else row[c]:>13}" for c in columns)
            print(f"{scenario:<20} {server:<19}{cells}")
    for name, target in report["targets"].items():
        print(f"{name}: {target['value']} (target {target['target']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory (default: build the tiny bench model)")
    parser.add_argument(
        "--adapter",
        help="a LoRA adapter directory, or 'none' (default: the bench model's random one)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the best there is)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--4bit", dest="four_bit", action="store_true", default=None)
    precision.add_argument("--no-4bit", dest="four_bit", action="store_false")
    parser.add_argument("--max-batch", type=int, default=16, help="MAX_BATCH for this project")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=16384,
        help="key/value cache of both servers, in tokens (MAX_BATCH_TOKENS; the peer's blocks)",
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads of each server (default: torch's choice)"
    )
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of each load request")
    parser.add_argument("--short-tokens", type=int, default=16)
    parser.add_argument("--into-s", type=float, default=0.5, help="delay into the long answer")
    parser.add_argument("--repeats", type=int, default=4, help="rounds of alone + into_long")
    parser.add_argument("--concurrent-rounds", type=int, default=2)
    parser.add_argument(
        "--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1.0, 2.0]
    )
    parser.add_argument("--poisson-requests", type=int, default=12)
    parser.add_argument("--no-peer", action="store_true", help="measure this project only")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop both servers on the way out
    if args.four_bit is None:  # 4-bit for the bot's own tiny model, full weights for a real one
        args.four_bit = args.model is None
    report = run(args)
    print_table(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
