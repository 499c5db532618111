"""Hostile clients against a real ``python -m bot api`` on loopback: Host, Origin, Authorization, votes.

Starts two servers over the tiny model this project builds (random weights,
no download): one without a token (loopback only: the Host and Origin guard
and the voter identity apply) and one with ``API_TOKEN`` (the Bearer parsing
applies), each with its own feedback store. The token-less one runs with the
vote rate limit off, so the forged votes all reach the store and the counted
voters show the identity rule alone; the token one keeps the default limit,
which its last scenario measures. Every request is written byte by
byte on a raw socket, so headers no HTTP library would send (a foreign Host,
bytes that are not ASCII) reach the server as an attacker would send them.

Prints one line per scenario: what was sent, the status (and the figure that
matters, e.g. how many voters 100 forged votes became), what was expected,
and the time to the answer. Then it stops both servers with SIGTERM and
checks their logs hold no traceback. Exits 1 if any scenario or log check
fails. Nothing leaves 127.0.0.1.

    python benchmarks/hostile_auth.py [--votes 100] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STARTUP_TIMEOUT_S = 180
DEFAULT_VOTES_PER_MINUTE = 30  # API_VOTES_PER_MINUTE's default, left as it is on the token server
RATE_VOTES = 40
TOKEN = "hostile-bench-token-5c1e"
CHAT = json.dumps(
    {
        "model": "base",
        "messages": [{"role": "user", "content": "wax for cold snow?"}],
        "max_tokens": 4,
    }
).encode()


@dataclass
class Reply:
    status: int
    headers: dict[str, list[str]]
    body: Any
    ms: float


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    feedback_db: Path

    def send(
        self,
        method: str,
        path: str,
        headers: dict[str, str | bytes] | None = None,
        body: bytes = b"",
    ) -> Reply:
        """One request on its own connection, headers exactly as given (Host defaults to ours)."""
        fields: dict[str, str | bytes] = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        head = f"{method} {path} HTTP/1.1\r\n".encode()
        for name, value in fields.items():
            head += name.encode() + b": " + (value if isinstance(value, bytes) else value.encode())
            head += b"\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
            sock.sendall(head + body)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        ms = (time.perf_counter() - started) * 1000
        raw_head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        parsed: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            parsed.setdefault(name.strip().lower(), []).append(value.strip())
        if "chunked" in parsed.get("transfer-encoding", []):
            payload = _unchunk(payload)
        try:
            data: Any = json.loads(payload)
        except ValueError:
            data = payload[:200]
        return Reply(int(lines[0].split()[1]), parsed, data, ms)


def _unchunk(payload: bytes) -> bytes:
    out = b""
    while payload:
        size_line, _, rest = payload.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        payload = rest[size + 2 :]
    return out


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failures: int = 0

    def check(self, scenario: str, reply: Reply, expected: int, figure: str = "") -> Reply:
        ok = reply.status == expected
        self.failures += not ok
        code = reply.body.get("error", {}).get("code") if isinstance(reply.body, dict) else None
        detail = f" {code}" if code else ""
        extra = f"; {figure}" if figure else ""
        line = (
            f"{'ok  ' if ok else 'FAIL'} {scenario}: {reply.status}{detail} "
            f"(expected {expected}){extra}; {reply.ms:.1f} ms"
        )
        print(line, flush=True)
        self.lines.append(line)
        return reply

    def note(self, scenario: str, ok: bool, figure: str) -> None:
        self.failures += not ok
        line = f"{'ok  ' if ok else 'FAIL'} {scenario}: {figure}"
        print(line, flush=True)
        self.lines.append(line)


def start(name: str, model: Path, workdir: Path, extra_env: dict[str, str]) -> Server:
    """``python -m bot api --port 0`` over the tiny model, its log in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "server.log"
    feedback_db = workdir / "feedback.sqlite"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "INFERENCE_BACKEND": "local",
        "BASE_MODEL": str(model),
        "LOAD_IN_4BIT": "false",
        "TEMPERATURE": "0",
        "MAX_NEW_TOKENS": "8",
        "METRICS_PORT": "",
        "LOG_LEVEL": "INFO",
        "FEEDBACK_DB": str(feedback_db),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        **extra_env,
    }
    for unset in ("ADAPTER_PATH", "API_TOKEN", "API_ALLOWED_HOSTS", "API_VOTES_PER_MINUTE"):
        if unset not in extra_env:
            env.pop(unset, None)
    command = [sys.executable, "-m", "bot", "api", "--host", "127.0.0.1", "--port", "0"]
    with log.open("wb") as out:  # run from workdir: no .env of the checkout is read
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    port = None
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        for line in log.read_text(errors="replace").splitlines():
            if " at http://" in line:
                port = int(line.split(" at http://")[1].split("/")[0].rsplit(":", 1)[1])
        if port is not None and _healthy(port):
            return Server(name, port, process, log, feedback_db)
    stop(process)
    raise SystemExit(
        f"{name}: python -m bot api did not come up; its log:\n{log.read_text()[-3000:]}"
    )


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def stop(process: subprocess.Popen[bytes]) -> int | None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            return None
    return process.returncode


def counted_voters(server: Server, answer_id: str) -> int:
    from bot.feedback.store import FeedbackStore

    with FeedbackStore(server.feedback_db) as store:
        counts = store.get_answer(answer_id).counts
    return counts.up + counts.down


def stuff_votes(
    server: Server, votes: int, headers_for: Callable[[int], dict[str, str]]
) -> tuple[str, Counter[int], int]:
    """``votes`` 👍 on one fresh answer; the answer id, the statuses, and the voters counted."""
    answer = server.send("POST", "/v1/chat/completions", {"Content-Type": "application/json"}, CHAT)
    answer_id = answer.body["id"]
    statuses: Counter[int] = Counter()
    for i in range(votes):
        body = json.dumps({"answer_id": answer_id, "rating": "up", "voter": f"forged-{i}"}).encode()
        headers = {"Content-Type": "application/json", **headers_for(i)}
        statuses[server.send("POST", "/v1/feedback", headers, body).status] += 1
    return answer_id, statuses, counted_voters(server, answer_id)


def tokenless_scenarios(server: Server, report: Report, votes: int) -> None:
    port = server.port
    json_type = {"Content-Type": "application/json"}
    report.check(
        "no token: GET / with Host evil.example (DNS rebinding)",
        server.send("GET", "/", {"Host": f"evil.example:{port}"}),
        403,
    )
    report.check(
        "no token: POST chat with Host evil.example",
        server.send(
            "POST", "/v1/chat/completions", {"Host": f"evil.example:{port}", **json_type}, CHAT
        ),
        403,
    )
    report.check(
        "no token: page on evil.example POSTs text/plain chat (Origin)",
        server.send(
            "POST",
            "/v1/chat/completions",
            {"Origin": "http://evil.example", "Content-Type": "text/plain"},
            CHAT,
        ),
        403,
    )
    report.check(
        "no token: Origin null (sandboxed frame, file://)",
        server.send("POST", "/v1/chat/completions", {"Origin": "null", **json_type}, CHAT),
        403,
    )
    report.check(
        "no token: Origin of another port on this machine",
        server.send(
            "POST", "/v1/chat/completions", {"Origin": "http://127.0.0.1:1", **json_type}, CHAT
        ),
        403,
    )
    report.check(
        "no token: Host with bytes that are not UTF-8",
        server.send("GET", "/v1/models", {"Host": b"\xff\xfe.example"}),
        403,
    )
    report.check(
        "no token: a mangled Origin (http://[::1, bracket left open)",
        server.send("POST", "/v1/chat/completions", {"Origin": "http://[::1", **json_type}, CHAT),
        403,
    )
    page = report.check("no token: the web chat page, GET /", server.send("GET", "/"), 200)
    cookies = page.headers.get("set-cookie", [])
    report.note(
        "no token: the page issues an HttpOnly SameSite=Lax voter cookie",
        any("HttpOnly" in c and "SameSite=Lax" in c for c in cookies),
        f"Set-Cookie: {cookies[0].split('=')[0] if cookies else 'none'}",
    )
    report.check(
        "no token: the page's own fetch (same Origin) POSTs chat",
        server.send(
            "POST",
            "/v1/chat/completions",
            {"Origin": f"http://127.0.0.1:{port}", **json_type},
            CHAT,
        ),
        200,
    )
    health = report.check("no token: GET /healthz", server.send("GET", "/healthz"), 200)
    model = health.body["engine"]["model"] if isinstance(health.body, dict) else "?"
    report.note(
        "no token: /healthz names no file path", "/" not in model, f"model shown as {model!r}"
    )

    _, statuses, voters = stuff_votes(server, votes, lambda i: {})
    report.note(
        f"no token: {votes} votes naming {votes} voters, no cookie",
        voters == 1,
        f"statuses {dict(sorted(statuses.items()))}, counted voters {voters}",
    )
    cookie = cookies[0].split(";")[0] if cookies else ""
    _, statuses, voters = stuff_votes(server, votes, lambda i: {"Cookie": cookie})
    report.note(
        f"no token: {votes} votes naming {votes} voters, one browser cookie",
        voters == 1,
        f"statuses {dict(sorted(statuses.items()))}, counted voters {voters}",
    )

    def forged(i: int) -> dict[str, str]:
        return {"Cookie": f"freeski_voter={secrets.token_urlsafe(16)}.{secrets.token_hex(16)}"}

    _, statuses, voters = stuff_votes(server, votes, forged)
    report.note(
        f"no token: {votes} votes with {votes} forged voter cookies",
        voters == 1,
        f"statuses {dict(sorted(statuses.items()))}, counted voters {voters}",
    )


def token_scenarios(server: Server, report: Report) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        report.check(
            f"token: Authorization '{scheme} <token>'",
            server.send("GET", "/v1/models", {"Authorization": f"{scheme} {TOKEN}"}),
            200,
        )
    odd: list[tuple[str, bytes]] = [
        ("bytes that are not UTF-8 (Bearer \\xff\\xfe\\x80)", b"Bearer \xff\xfe\x80"),
        ("UTF-8 that is not ASCII (Bearer t\\u00f6k\\u00e9n)", "Bearer tökén".encode()),
        ("a non-ASCII scheme before the right token", b"\xc3\xa9 " + TOKEN.encode()),
        ("Basic <token>", f"Basic {TOKEN}".encode()),
        ("the token without a scheme", TOKEN.encode()),
    ]
    for label, value in odd:
        report.check(
            f"token: Authorization {label}",
            server.send(
                "POST",
                "/v1/chat/completions",
                {"Authorization": value, "Content-Type": "application/json"},
                CHAT,
            ),
            401,
        )
    report.check("token: no Authorization", server.send("GET", "/v1/models"), 401)
    answer = server.send(
        "POST",
        "/v1/chat/completions",
        {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        CHAT,
    )
    answer_id = answer.body["id"]
    statuses: Counter[int] = Counter()
    for i in range(RATE_VOTES):
        body = json.dumps({"answer_id": answer_id, "rating": "up", "voter": f"forged-{i}"}).encode()
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        statuses[server.send("POST", "/v1/feedback", headers, body).status] += 1
    voters = counted_voters(server, answer_id)
    report.note(
        f"token: {RATE_VOTES} votes naming {RATE_VOTES} voters, no cookie, default vote limit",
        voters == 1
        and statuses
        == Counter({200: DEFAULT_VOTES_PER_MINUTE, 429: RATE_VOTES - DEFAULT_VOTES_PER_MINUTE}),
        f"statuses {dict(sorted(statuses.items()))}, counted voters {voters}",
    )


def tracebacks(log: Path) -> int:
    return log.read_text(errors="replace").count("Traceback")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--votes", type=int, default=100, help="forged votes per scenario")
    parser.add_argument("--keep-logs", type=Path, help="copy the servers' logs here")
    args = parser.parse_args()

    from finetune.tiny_model import build_tiny_model

    report = Report()
    with tempfile.TemporaryDirectory(prefix="hostile-auth-") as tmp:
        model = build_tiny_model(Path(tmp) / "model", seed=0)
        servers = []
        try:
            # The vote limit is off here, so every forged vote reaches the store and the
            # counted voters show the identity rule alone; the token server keeps the default.
            servers.append(
                start("no token", model, Path(tmp) / "open", {"API_VOTES_PER_MINUTE": "0"})
            )
            servers.append(start("token", model, Path(tmp) / "token", {"API_TOKEN": TOKEN}))
            tokenless_scenarios(servers[0], report, args.votes)
            token_scenarios(servers[1], report)
        finally:
            codes = {server.name: stop(server.process) for server in servers}
        for server in servers:
            found = tracebacks(server.log)
            report.note(
                f"{server.name}: server log after SIGTERM",
                found == 0 and codes[server.name] == 0,
                f"{found} tracebacks, exit code {codes[server.name]}",
            )
            if args.keep_logs:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(server.log, args.keep_logs / f"{server.name.replace(' ', '-')}.log")
    print(json.dumps({"scenarios": len(report.lines), "failures": report.failures}))
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
