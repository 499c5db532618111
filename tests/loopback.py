"""Servers on 127.0.0.1 for the length of a test: an aiohttp app, or ``python -m bot api`` itself."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

REPO = Path(__file__).resolve().parents[1]


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` on loopback (port 0: a free one); yields ``http://127.0.0.1:PORT``."""
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def free_port() -> int:
    """A loopback port nothing listens on (for "the server is down")."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _url_from_log(process: subprocess.Popen[str], timeout_s: float) -> str:
    """The URL a ``python -m bot api`` subprocess logs once it listens (stderr must be a pipe)."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        line = process.stderr.readline()
        if " at http://" in line:
            return line.split(" at ")[1].split()[0]
    raise AssertionError("python -m bot api never said where it listens")


@dataclass
class ApiProcess:
    """A running ``python -m bot api``: where it listens and what it logged since."""

    process: subprocess.Popen[str]
    url: str  # http://127.0.0.1:PORT/v1, what an OpenAI client takes as base_url
    log: list[str] = field(default_factory=list)  # stderr lines after the listening one
    _drain: threading.Thread | None = None

    def stop(self, timeout_s: float = 20) -> int:
        """SIGTERM, as a service manager stops it; its exit code, once its log is all read."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout_s)
        if self._drain is not None:
            self._drain.join(timeout=5)
        return code


@contextlib.contextmanager
def bot_api(
    env: Mapping[str, str | None],
    cwd: Path,
    *,
    start_timeout_s: float = 60,
    stop_timeout_s: float = 20,
) -> Iterator[ApiProcess]:
    """``python -m bot api --port 0`` in ``cwd``, yielded once it listens.

    ``env`` goes over this process's environment (``None`` unsets a variable),
    after PYTHONPATH, no API token and no metrics port. ``cwd`` should be a
    fresh directory, so no ``.env`` from the checkout applies. Its stderr is
    read on a thread, so a full pipe never blocks the server. At the end it
    must stop cleanly on SIGTERM (exit 0); a test may stop it earlier with
    :meth:`ApiProcess.stop`.
    """
    merged = {**os.environ, "PYTHONPATH": str(REPO), "API_TOKEN": "", "METRICS_PORT": "", **env}
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "api", "--port", "0"],
        cwd=cwd,
        env={name: value for name, value in merged.items() if value is not None},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        api = ApiProcess(process, _url_from_log(process, start_timeout_s))
        assert process.stderr is not None
        api._drain = threading.Thread(target=api.log.extend, args=(process.stderr,), daemon=True)
        api._drain.start()
        yield api
        assert api.stop(stop_timeout_s) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
