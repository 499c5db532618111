"""``python -m bot``: the Discord bot; ``--console`` chats in the terminal; ``api`` serves HTTP.

``python -m bot feedback export`` turns the collected votes into preference datasets.

Settings are read and checked before torch or discord.py are imported, so a
missing token or model is one line and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from bot.discord_bot.settings import BotSettings
from freeski_common.cli import ArgumentParser
from freeski_common.errors import UserError, cli_entry
from freeski_common.shutdown import stop_requested

log = logging.getLogger("bot")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["api"]:
        from bot.api.server import main as api_main

        return api_main(args[1:])
    if args[:1] == ["feedback"]:
        from bot.feedback.cli import main as feedback_main

        return feedback_main(args[1:])
    return run(args)


@cli_entry
def run(argv: Sequence[str]) -> int:
    parser = ArgumentParser(
        prog="python -m bot",
        description="Serve the Freeski bot on Discord (settings from the environment and .env). "
        "`python -m bot api` serves the OpenAI-compatible HTTP API instead; "
        "`python -m bot feedback export` writes the votes out as preference data.",
    )
    parser.add_argument(
        "--console",
        action="store_true",
        help="chat with the model in this terminal instead of connecting to Discord",
    )
    args = parser.parse_args(argv)
    settings = BotSettings.from_env(require_token=not args.console)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.console:
        from bot.console import run_console

        return asyncio.run(run_console(settings.engine))
    return asyncio.run(serve(settings))


async def serve(settings: BotSettings) -> int:
    """Load the model, connect, and on SIGINT/SIGTERM finish or stop answers and exit cleanly."""
    from bot.discord_bot.client import FreeskiBot
    from bot.serving.factory import build_engine

    metrics_server = None
    if settings.metrics_port:
        from bot.serving.metrics_server import start_metrics_server

        metrics_server = start_metrics_server(settings.metrics_port, host=settings.metrics_host)
    engine = build_engine(settings.engine)
    await engine.start()
    bot = FreeskiBot(settings, engine)
    try:
        with stop_requested() as stop:
            connection = asyncio.create_task(bot.start(settings.discord_token))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({connection, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done():  # it ended by itself: Discord refused or could not be reached
                await bot.close()
                _raise_login_error(connection)
            log.info("shutting down")
            await bot.close()
            await asyncio.wait({connection}, timeout=10)
            stopping.cancel()
    finally:
        await engine.close()
        if metrics_server is not None:
            metrics_server.close()
    return 0


def _raise_login_error(connection: asyncio.Task[None]) -> None:
    """Turn Discord's refusals into the one line that says what to fix."""
    import discord

    try:
        connection.result()
    except discord.LoginFailure:
        raise UserError(
            "Discord rejected DISCORD_TOKEN: copy a fresh token from the Developer Portal's Bot page"
        ) from None
    except discord.PrivilegedIntentsRequired:
        raise UserError(
            "the bot needs the Message Content intent: enable it on the Developer Portal's Bot page"
        ) from None
    except (discord.HTTPException, discord.GatewayNotFound, OSError) as exc:
        raise UserError(
            f"could not connect to Discord ({exc}): check the network and retry"
        ) from None


if __name__ == "__main__":
    raise SystemExit(main())
