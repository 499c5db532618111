"""HTTP details more than one stage needs: reading a server's ``Retry-After``.

The crawler obeys it when the forum says 429 or 503, and the bot's
OpenAI-compatible engine when an inference server is busy; both must read the
header the same way.
"""

from __future__ import annotations

import math
import re
import time
from datetime import timezone
from email.utils import parsedate_to_datetime

_SECONDS = re.compile(r"\d+(\.\d+)?")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header; None when it is absent or unreadable.

    The standard form is whole seconds or an HTTP date (a date in the past
    means 0). Fractional seconds (``0.5``) are not in the standard but some
    servers send them, and waiting half a second is what they mean, so they are
    read as such. Anything else (negative, ``inf``, words) is ignored rather
    than guessed at: the caller then falls back to its own backoff.
    """
    if value is None:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # "-0000": no zone given; HTTP dates are GMT
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))
