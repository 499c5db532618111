"""Run an aiohttp app on 127.0.0.1 for the length of a test."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator

from aiohttp import web


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


def api_url_from_log(process: subprocess.Popen[str], timeout_s: float) -> str:
    """The URL a ``python -m bot api`` subprocess logs once it listens (stderr must be a pipe)."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        line = process.stderr.readline()
        if " at http://" in line:
            return line.split(" at ")[1].split()[0]
    raise AssertionError("python -m bot api never said where it listens")
