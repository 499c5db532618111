"""Serve the Prometheus metrics of :mod:`bot.serving.metrics` on ``METRICS_PORT``.

The engines update the metrics themselves as they work (the local worker
samples GPU memory after each batch), so this only exposes them: one
exposition endpoint per process, whichever front ends (Discord, the HTTP API)
share the engine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from freeski_common.errors import UserError


@dataclass
class MetricsServer:
    """A running exposition endpoint; :meth:`close` stops it."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.httpd.server_port

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(port: int, *, host: str = "127.0.0.1") -> MetricsServer:
    """Expose ``/metrics`` on ``host:port`` (port 0: any free one) from a daemon thread.

    Loopback unless told otherwise (``METRICS_HOST``): the endpoint has no
    authentication, and queue depths and request counts say how busy, and
    when, a community is. A Prometheus in another host or container needs
    ``METRICS_HOST=0.0.0.0`` (and a firewall).
    """
    try:
        httpd, thread = start_http_server(port, addr=host)
    except OSError as error:
        raise UserError(
            f"METRICS_PORT={port}: cannot listen on {host}:{port} ({error.strerror}); "
            "choose a free port (or METRICS_HOST) or leave METRICS_PORT unset"
        ) from None
    return MetricsServer(httpd, thread)
