"""SIGINT and SIGTERM as an asyncio event: how every long-running command learns to stop.

The bot, the HTTP API and the sample forum server all run until an operator
(or a service manager) sends SIGINT or SIGTERM, then finish what they are
doing and exit 0. Handling the signals on the event loop, rather than letting
``KeyboardInterrupt`` fly through whatever is running, is what makes that
clean stop possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_requested() -> Iterator[asyncio.Event]:
    """An event that SIGINT or SIGTERM sets while the block runs; the handlers go at its end.

    Must be entered on the running event loop's thread (a loop can only watch
    signals from the main thread).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
