"""``python -m bot api``: start the engine, listen, and stop cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from bot.api.feedback import ApiFeedback
from bot.api.protocol import model_names
from bot.api.routes import create_app
from bot.api.settings import ApiSettings
from bot.feedback.store import feedback_db_from_env
from bot.serving.engine import (
    Engine,
)
from bot.serving.factory import build_engine
from bot.serving.metrics_server import start_metrics_server
from bot.serving.settings import (
    EngineSettings,
    log_level_from_env,
    metrics_host_from_env,
    metrics_port_from_env,
)
from freeski_common.cli import ArgumentParser
from freeski_common.errors import UserError, cli_entry
from freeski_common.shutdown import stop_requested

log = logging.getLogger(__name__)


def check_bind_allowed(settings: ApiSettings) -> None:
    """Refuse to expose an API without a token beyond this machine."""
    if settings.token:
        return
    host = settings.host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UserError(
            f"API_HOST={settings.host} would expose the API without a token: "
            "set API_TOKEN to a secret, or listen on 127.0.0.1"
        )


async def serve(
    engine: Engine,
    settings: ApiSettings,
    *,
    engine_settings: EngineSettings | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    feedback_db: Path | None = None,
) -> None:
    """Serve the API until SIGINT/SIGTERM, starting ``engine`` and closing it at the end.

    The port is taken before the engine starts, so a port in use fails at
    once rather than after minutes of model loading; meanwhile ``/healthz``
    says 503 and questions get the engine's "still loading" answer. With
    ``feedback_db``, answers are recorded there and ``POST /v1/feedback`` takes votes.
    """
    check_bind_allowed(settings)
    feedback = await _open_feedback(feedback_db, engine_settings) if feedback_db else None
    # A client that hangs up cancels its handler, and with it its place in the
    # engine's queue: nobody waits for an answer no one will read.
    runner = web.AppRunner(
        create_app(engine, settings, engine_settings=engine_settings, feedback=feedback),
        handler_cancellation=True,
    )
    metrics_server = None
    try:
        with stop_requested() as stop:
            await runner.setup()
            try:
                await web.TCPSite(runner, settings.host, settings.port).start()
            except OSError as error:
                raise UserError(
                    f"cannot listen on {settings.host}:{settings.port} ({error.strerror}): "
                    "choose another API_PORT (or --port)"
                ) from None
            if metrics_port:
                metrics_server = start_metrics_server(metrics_port, host=metrics_host)
            await engine.start()
            host, port = runner.addresses[0][:2]
            url = f"http://{host}:{port}/v1"
            names = model_names(engine.models())
            log.info("serving %s at %s (SIGINT or SIGTERM stops)", ", ".join(names), url)
            log.info("web chat: open http://%s:%s/ in a browser", host, port)
            await stop.wait()
            log.info("stopping: finishing in-flight requests")
    finally:
        await runner.cleanup()
        if metrics_server is not None:
            metrics_server.close()
        await engine.close()
        if feedback is not None:
            await feedback.store.close()


async def _open_feedback(path: Path, engine_settings: EngineSettings | None) -> ApiFeedback:
    try:
        feedback = await ApiFeedback.open(path, engine_settings or EngineSettings())
    except (OSError, sqlite3.Error, ValueError) as error:
        raise UserError(
            f"cannot open FEEDBACK_DB={path} ({error}): point it at a writable file, or set it to off"
        ) from None
    log.info("recording answers and votes in %s", path)
    return feedback


def _parse_args(argv: Sequence[str] | None, defaults: ApiSettings) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m bot api",
        description="Serve the OpenAI-compatible chat API (models 'base', 'finetuned' and each adapter).",
    )
    parser.add_argument(
        "--host", default=defaults.host, help="address to listen on (API_HOST; default %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=defaults.port,
        help="port to listen on, 0 for any free one (API_PORT; default %(default)s)",
    )
    return parser.parse_args(argv)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bot api``: build the configured engine and serve it over HTTP."""
    settings = ApiSettings.from_env()
    args = _parse_args(argv, settings)
    settings = dataclasses.replace(settings, host=args.host, port=args.port)
    check_bind_allowed(settings)
    engine_settings = EngineSettings.from_env()
    metrics_port = metrics_port_from_env()
    feedback_db = feedback_db_from_env()
    logging.basicConfig(
        level=log_level_from_env(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine = build_engine(engine_settings)
    asyncio.run(
        serve(
            engine,
            settings,
            engine_settings=engine_settings,
            metrics_port=metrics_port,
            metrics_host=metrics_host_from_env(),
            feedback_db=feedback_db,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
