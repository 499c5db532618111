"""Typed reads of environment variables (and ``.env``), failing with one clear line.

The bot's settings (engine, Discord, HTTP API) are the product's only
environment variables, and all go through these helpers, so a bad value always
names the variable, what was found and what is expected. (Training is
configured by YAML and options instead; the crawler reads one variable.)
"""

from __future__ import annotations

import os

from dotenv import find_dotenv, load_dotenv

from freeski_common.errors import UserError

_loaded = False


def load_env_file(path: str | os.PathLike[str] | None = None) -> None:
    """Load ``.env`` (from the working directory up) once; the real environment wins."""
    global _loaded
    if path is not None:
        load_dotenv(path, override=False)
        return
    if not _loaded:
        load_dotenv(find_dotenv(usecwd=True), override=False)
        _loaded = True


def env_str(name: str, default: str | None = None, *, required: bool = False) -> str | None:
    value = os.environ.get(name, "").strip()
    if value:
        return value
    if required:
        raise UserError(
            f"{name} is not set: set it in the environment or in .env (see .env.example)"
        )
    return default


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not a whole number: set it to e.g. {default}") from None
    if minimum is not None and value < minimum:
        raise UserError(f"{name}={value} is too small: it must be at least {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not a number: set it to e.g. {default}") from None
    if minimum is not None and value < minimum:
        raise UserError(f"{name}={value} is too small: it must be at least {minimum}")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise UserError(f"{name}={raw!r} is not a yes/no value: use true or false")
