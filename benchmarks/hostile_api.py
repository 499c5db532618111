"""Hostile clients against a real ``python -m bot api``: does one bad request hurt anyone else?

Starts the API on loopback over the tiny bench model (hidden 256, 4 layers,
4-bit, random LoRA adapter; ``--model DIR`` for another) and runs, one after
the other:

* ``bad_request_mid_stream`` — while another user's answer streams, a
  conversation ending with an assistant turn longer than the token budget,
  and one holding a lone UTF-16 surrogate. Measured: time to each 4xx, the
  other stream's longest gap between chunks, and whether it finished.
* ``malformed_bodies`` — deep nesting (``[`` × 60,000), a 5,000-digit integer,
  wrong types, not JSON, on ``/v1/chat/completions`` and ``/v1/feedback``.
  Measured: every status (none may be 5xx) and the slowest answer.
* ``long_conversation_beside_stream`` — a 1,000-turn, ~62 KB conversation
  (the server runs with ``API_MAX_MESSAGES`` raised so it reaches the
  worker's trimming) sent while another answer streams. Measured: the other
  stream's longest gap, and the long request's own result.
* ``too_many_messages`` — the same conversation at the default cap: a 400.
* ``queue_flood_with_cancels`` — more streamed requests than the queue holds,
  all cancelled by their clients after a moment. Measured: 429s and the
  queue depth (``/healthz``) right after the cancels, and whether a normal
  request is answered afterwards.

Per scenario it prints the figure and whether the server's log holds a
traceback, and ends with one line of JSON. Not a test: the figures depend on
the machine; nothing is asserted.

    python benchmarks/hostile_api.py [--model DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from serving_latency import launch, log_tail, stop_process, wait_until_up  # noqa: E402

STARTUP_TIMEOUT_S = 300.0
NORMAL = [{"role": "user", "content": "Is it worth waxing my skis myself?"}]
MAX_BATCH_TOKENS = 1024
QUEUE_SIZE = 8


def long_conversation(turns: int = 1000) -> list[dict[str, str]]:
    """``turns`` messages, about 62 bytes each as JSON (the issue's 62 KB body), ending with a question."""
    chat = []
    for i in range(turns - 1):
        role = "user" if i % 2 == 0 else "assistant"
        chat.append({"role": role, "content": f"t{i:04d}: wax and edges, ok?"})
    chat.append({"role": "user", "content": "So which wax should I buy?"})
    return chat


class Api:
    """One ``python -m bot api`` subprocess and its log."""

    def __init__(
        self, args: argparse.Namespace, model: Path, adapter: Path | None, tmp: Path, **env: str
    ):
        self.log = tmp / f"bot-api-{len(list(tmp.glob('bot-api-*.log')))}.log"
        environment = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "INFERENCE_BACKEND": "local",
            "BASE_MODEL": str(model),
            "LOAD_IN_4BIT": "true" if args.model is None else "false",
            "TEMPERATURE": "0",
            "REPETITION_PENALTY": "1.0",
            "MAX_NEW_TOKENS": "200",
            "MAX_BATCH": "8",
            "MAX_BATCH_TOKENS": str(MAX_BATCH_TOKENS),
            "QUEUE_SIZE": str(QUEUE_SIZE),
            "LOG_LEVEL": "INFO",
            "METRICS_PORT": "",
            "FEEDBACK_DB": str(tmp / "feedback.sqlite"),
            **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}),
            **env,
        }
        environment.pop("API_TOKEN", None)
        environment.pop("ADAPTER_PATH", None)
        if adapter is not None:
            environment["ADAPTER_PATH"] = str(adapter)
        command = [sys.executable, "-m", "bot", "api", "--host", "127.0.0.1", "--port", "0"]
        self.process = launch(command, self.log, tmp, environment)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        url = None
        while url is None and time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(0.5)
            for line in self.log.read_text(errors="replace").splitlines():
                if " at http://" in line:
                    url = line.split(" at ")[1].split()[0].removesuffix("/v1")
        if url is None:
            stop_process(self.process)
            raise SystemExit(f"python -m bot api did not start; its log:\n{log_tail(self.log)}")
        wait_until_up(f"{url}/healthz", self.process, self.log)
        self.url = url

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback (most recent call last)")

    def keep_log(self, folder: str | None) -> None:
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / self.log.name).write_bytes(self.log.read_bytes())

    def stop(self) -> None:
        stop_process(self.process)


async def stream(
    session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], max_tokens: int = 200
) -> dict[str, Any]:
    """One streamed answer: status, chunks, longest gap between chunks, whether it finished."""
    body = {"model": "finetuned", "messages": messages, "max_tokens": max_tokens, "stream": True}
    started = time.monotonic()
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            return {"status": response.status, "body": await response.text()}
        last, gaps, chunks, finished = None, [], 0, False
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now
            chunks += 1
            finished = finished or b'"finish_reason": "' in line
            if b'"error"' in line:
                return {"status": 200, "error": line.decode().strip(), "chunks": chunks}
        return {
            "status": 200,
            "chunks": chunks,
            "finished": finished,
            "longest_gap_s": round(max(gaps, default=0.0), 3),
            "total_s": round(time.monotonic() - started, 3),
        }


async def post(
    session: aiohttp.ClientSession, url: str, path: str, data: bytes
) -> tuple[int, float, str]:
    started = time.monotonic()
    async with session.post(
        f"{url}{path}", data=data, headers={"Content-Type": "application/json"}
    ) as response:
        text = await response.text()
        return response.status, round(time.monotonic() - started, 3), text[:160]


async def beside_a_stream(
    session: aiohttp.ClientSession, url: str, bodies: dict[str, bytes]
) -> dict[str, Any]:
    """Send ``bodies`` one by one once another answer is streaming; the stream's figures."""
    other = asyncio.create_task(stream(session, url, NORMAL))
    await asyncio.sleep(0.5)  # well into its answer on the tiny model
    results = {}
    for name, data in bodies.items():
        status, seconds, text = await post(session, url, "/v1/chat/completions", data)
        results[name] = {"status": status, "seconds": seconds, "answer": text}
    results["other stream"] = await other
    return results


async def queue_flood(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """4 × the queue of streamed requests at once, every client gone after 0.3 s."""
    body = {"model": "finetuned", "messages": NORMAL, "max_tokens": 200, "stream": True}

    async def one() -> int | str:
        try:
            async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                if response.status != 200:
                    return response.status
                await asyncio.sleep(10)
                return 200
        except asyncio.CancelledError:
            return "cancelled"

    tasks = [asyncio.create_task(one()) for _ in range(QUEUE_SIZE * 4)]
    await asyncio.sleep(0.5)
    statuses = [t.result() for t in tasks if t.done()]
    async with session.get(f"{url}/healthz") as response:
        depth_before = (await response.json())["engine"]["queue_depth"]
    for task in tasks:
        task.cancel()
    cancelled_at = time.monotonic()
    await asyncio.gather(*tasks, return_exceptions=True)
    reads = []  # (seconds after the cancels the read was sent, queue depth)
    while time.monotonic() - cancelled_at < 10:
        sent = time.monotonic() - cancelled_at
        async with session.get(f"{url}/healthz") as response:
            health = await response.json()
        reads.append((round(sent, 3), health["engine"]["queue_depth"]))
        if reads[-1][1] == 0:
            break
        await asyncio.sleep(0.05)
    after = await stream(session, url, NORMAL, max_tokens=20)
    return {
        "requests": len(tasks),
        "answered 429 before the cancels": statuses.count(429),
        "queue depth before the cancels": depth_before,
        "queue depth reads after the cancels (s, depth)": reads,
        "healthz status": health["status"],
        "a normal request afterwards": after,
    }


MALFORMED = {
    "deep nesting [ x 60000": b"[" * 60_000,
    "5000-digit integer": b'{"model": "base", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}",
    "messages is a string": b'{"model": "base", "messages": "hi"}',
    "content is a number": b'{"model": "base", "messages": [{"role": "user", "content": 7}]}',
    "not JSON": b"\xff\xfe{not json",
    "vote with wrong types": b'{"answer_id": [1], "rating": {"up": 1}, "voter": null}',
}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from worker_throughput import SPECS, build_model

    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hostile-api-") as scratch:
        tmp = Path(scratch)
        if args.model:
            model, adapter = Path(args.model), None
        else:
            model, adapter = build_model(tmp, SPECS["bench"])
        api = Api(args, model, adapter, tmp, API_MAX_MESSAGES="1200", API_RATE_LIMIT_PER_MINUTE="0")
        try:
            async with aiohttp.ClientSession() as session:
                await stream(session, api.url, NORMAL, max_tokens=8)  # warm up
                before = api.tracebacks()
                over_budget = [*NORMAL, {"role": "assistant", "content": "powder " * 3000}]
                report["bad_request_mid_stream"] = await beside_a_stream(
                    session,
                    api.url,
                    {
                        "assistant turn over the budget": json.dumps(
                            {"model": "finetuned", "messages": over_budget}
                        ).encode(),
                        "lone surrogate": b'{"model": "finetuned", "messages": '
                        b'[{"role": "user", "content": "\\ud800x"}]}',
                    },
                )
                report["bad_request_mid_stream"]["tracebacks"] = api.tracebacks() - before

                before = api.tracebacks()
                malformed = {}
                for path in ("/v1/chat/completions", "/v1/feedback"):
                    for name, data in MALFORMED.items():
                        status, seconds, _ = await post(session, api.url, path, data)
                        malformed[f"{path} {name}"] = {"status": status, "seconds": seconds}
                report["malformed_bodies"] = {
                    "statuses": sorted({r["status"] for r in malformed.values()}),
                    "slowest_s": max(r["seconds"] for r in malformed.values()),
                    "each": malformed,
                    "tracebacks": api.tracebacks() - before,
                }

                before = api.tracebacks()
                chat = long_conversation()
                data = json.dumps(
                    {"model": "finetuned", "messages": chat, "max_tokens": 8}
                ).encode()
                result = await beside_a_stream(session, api.url, {"1000-turn conversation": data})
                result["body_bytes"] = len(data)
                result["tracebacks"] = api.tracebacks() - before
                report["long_conversation_beside_stream"] = result

                before = api.tracebacks()
                report["queue_flood_with_cancels"] = await queue_flood(session, api.url)
                report["queue_flood_with_cancels"]["tracebacks"] = api.tracebacks() - before
        finally:
            api.stop()
            api.keep_log(args.logs)

        capped = Api(args, model, adapter, tmp)  # the default API_MAX_MESSAGES
        try:
            async with aiohttp.ClientSession() as session:
                data = json.dumps({"model": "finetuned", "messages": long_conversation()}).encode()
                status, seconds, text = await post(
                    session, capped.url, "/v1/chat/completions", data
                )
                report["too_many_messages"] = {
                    "status": status,
                    "seconds": seconds,
                    "answer": text,
                    "tracebacks": capped.tracebacks(),
                }
        finally:
            capped.stop()
            capped.keep_log(args.logs)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model directory (default: build the tiny bench model)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the server")
    parser.add_argument("--logs", help="copy the servers' logs into this folder")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    for scenario, figures in report.items():
        print(f"== {scenario}")
        for key, value in figures.items():
            if key != "each":
                print(f"   {key}: {value}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
