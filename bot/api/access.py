"""Who may call the API: the bearer token, and, without one, only this machine's own pages.

With ``API_TOKEN`` set, ``/v1/`` needs ``Authorization: Bearer <token>``; the
scheme is case-insensitive (RFC 7235) and a header that is not ASCII is a plain
401. Without a token the API listens on loopback only, but loopback alone does
not keep a browser out: any web page the user opens can POST ``text/plain`` at
``127.0.0.1`` (no CORS preflight), and a DNS-rebinding page can even read the
answers under its own name. So a token-less server answers only requests whose
``Host`` is one of its own names and whose ``Origin``, when a browser sends
one, is the server itself. Programs (curl, the ``openai`` client) send no
``Origin`` and a loopback ``Host``, and pass.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import re
from collections.abc import Callable, Collection
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from bot.api.protocol import ApiError
from bot.serving.engine import EngineStatus

DEFAULT_PORTS = {"http": 80, "https": 443}


def bearer_auth(token: str) -> Middleware:
    """Require ``Authorization: Bearer <API_TOKEN>`` on ``/v1/`` when a token is set."""
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            token
            and request.path.startswith("/v1/")
            and not _bearer_matches(request.headers.get("Authorization", ""), expected)
        ):
            raise ApiError(
                401,
                "Missing or wrong API key: send 'Authorization: Bearer <API_TOKEN>'.",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return check


def _bearer_matches(header: str, expected: bytes) -> bool:
    """``<scheme> <credentials>`` with the scheme ``bearer`` in any case and the right token.

    aiohttp hands header bytes that are not UTF-8 over as surrogates; they are
    compared as the bytes that came, so they simply do not match.
    """
    scheme, _, credentials = header.strip().partition(" ")
    try:
        given = credentials.strip().encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    # compare_digest even on a wrong scheme, so the time taken says nothing of the token.
    return hmac.compare_digest(given, expected) and scheme.lower() == "bearer"


def same_origin_only(token: str, own_host: str, allowed_hosts: Collection[str] = ()) -> Middleware:
    """Without a token, refuse (403) a foreign ``Host`` (DNS rebinding) or ``Origin`` (CSRF).

    The server's own names are ``localhost``, loopback addresses, the address
    it listens on (``own_host``) and ``allowed_hosts`` (``API_ALLOWED_HOSTS``).
    With a token the check is off: the token is what keeps strangers out, and a
    page on another site cannot read it.
    """
    own = {_host_name(own_host), "localhost", *(_host_name(h) for h in allowed_hosts)}

    def is_own(name: str) -> bool:
        if name in own:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token:
            return await handler(request)
        host = request.headers.get("Host")
        host_name, host_port = _split_authority(host) if host is not None else ("", None)
        if host is not None and not is_own(host_name):
            raise ApiError(
                403,
                f"This server answers only to its own address, not to Host {_quoted(host)}: "
                "open it as http://127.0.0.1:<port>/ (or http://localhost:<port>/), "
                "or add the name to API_ALLOWED_HOSTS.",
                type="permission_error",
                code="foreign_host",
            )
        origin = request.headers.get("Origin")
        if origin is not None and not _origin_is(origin, host_port, request, is_own):
            raise ApiError(
                403,
                f"Requests from other sites are refused (Origin {_quoted(origin)}): "
                "use the page this server serves at /, or call the API from a program "
                "(which sends no Origin), or set API_TOKEN.",
                type="permission_error",
                code="foreign_origin",
            )
        return await handler(request)

    return check


def _origin_is(
    origin: str, host_port: int | None, request: web.Request, is_own: Callable[[str], bool]
) -> bool:
    """Whether ``Origin`` is this server: one of its names, on the port the request came to."""
    try:
        parts = urlsplit(origin)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:  # includes "null"
            return False
        origin_port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:  # a bracket left open, a port out of range
        return False
    own_port = host_port or _local_port(request) or DEFAULT_PORTS[parts.scheme]
    return is_own(parts.hostname.lower()) and origin_port == own_port


def _split_authority(authority: str) -> tuple[str, int | None]:
    """``host[:port]`` (``[v6]:port`` too) → lower-case name without brackets, and the port."""
    try:
        parts = urlsplit(f"//{authority}")
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", None


def _host_name(host: str) -> str:
    return host.strip().strip("[]").lower()


def _local_port(request: web.Request) -> int | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None


def _quoted(value: str) -> str:
    """An attacker's header, shortened and made printable for the error message."""
    return ascii(value[:80])


def public_status(status: EngineStatus) -> EngineStatus:
    """The engine status without this machine's file paths, for ``/healthz`` (no token needed).

    A local model or adapter directory is named by its last part (a finetune
    run's ``adapter/`` by its run: ``ski-v1/adapter``); hub ids and an
    OpenAI-compatible server's model names are not paths and stay as they are.
    """
    local = status.backend == "local"
    model_is_path = local and (
        status.model.startswith(("/", ".", "~")) or Path(status.model).exists()
    )
    return dataclasses.replace(
        status,
        model=_last_part(status.model) if model_is_path else status.model,
        adapter=_last_part(status.adapter) if local and status.adapter else status.adapter,
        # "off: no forum store at /srv/bot/forum.sqlite: …" names the store by its file name
        grounding=_ABSOLUTE_PATH.sub(lambda m: Path(m.group(0)).name, status.grounding),
    )


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/[^\s:`'\"]+")


def _last_part(path_name: str) -> str:
    path = Path(path_name)
    if path.name == "adapter" and path.parent.name:
        return f"{path.parent.name}/adapter"
    return path.name or "local"
