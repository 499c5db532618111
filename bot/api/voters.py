"""Who a web vote is from: the server decides, never the client.

A voter id the client could choose would let one script cast a hundred votes
as a hundred people. So ``POST /v1/feedback`` counts a vote for:

1. the browser, when the request carries the ``freeski_voter`` cookie: a
   random id the server issued with the page (``GET /``), signed with a key
   derived from the feedback store's salt (HMAC-SHA256), ``HttpOnly`` (the
   page's scripts cannot read or copy it) and ``SameSite=Lax`` (another
   site's page cannot vote with it: no cross-site POST or fetch carries it).
   Not ``Strict``: a browser withholds a Strict cookie when it follows a link
   from another site (a Discord message) to the page, which would then give
   it a new id, a new voter, on every such arrival. A forged or altered
   cookie is ignored;
2. otherwise the client: the ``API_TOKEN`` when one is set (every request has
   passed it), else its network address.

A client that drops the cookie therefore stays one voter, and one that
fetches the page again and again for fresh cookies is held back by the vote
rate limit, which counts per voter and per address (``API_VOTES_PER_MINUTE``).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable
from http.cookies import SimpleCookie

from aiohttp import hdrs, web

from bot.api.protocol import ApiError
from bot.serving.ratelimit import RateLimiter

COOKIE = "freeski_voter"
COOKIE_MAX_AGE_S = 400 * 24 * 3600  # the longest browsers keep a cookie
KEY_PURPOSE = "web voter cookie"
_COOKIE_VALUE = re.compile(r"^([A-Za-z0-9_-]{22})\.([0-9a-f]{32})$")


class WebVoters:
    """Issues and checks the per-browser voter ids, and rate-limits votes."""

    def __init__(
        self,
        key: bytes,
        *,
        token: str = "",
        votes_per_minute: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key = key
        self._token = token
        self._votes = RateLimiter(votes_per_minute, clock=clock)

    def install(self, app: web.Application) -> None:
        """Give every browser that loads the page (``GET /``) a voter id, if it has none."""
        app.on_response_prepare.append(self._issue_with_page)

    def voter_of(self, request: web.Request) -> str:
        """The voter a request's vote counts for (the store keeps only a salted hash of it)."""
        browser = self.browser_of(request)
        if browser is not None:
            return f"web:browser:{browser}"
        if self._token:
            return "web:token"
        return f"web:address:{request.remote or 'unknown'}"

    def browser_of(self, request: web.Request) -> str | None:
        """The browser id in the request's cookie, if the server issued it; else None."""
        match = _COOKIE_VALUE.match(request.cookies.get(COOKIE, ""))
        if match is None:
            return None
        browser, signature = match.groups()
        return browser if hmac.compare_digest(signature, self._sign(browser)) else None

    def check_rate(self, request: web.Request, voter: str) -> None:
        """Refuse (429) a vote past ``API_VOTES_PER_MINUTE`` for this voter or this address."""
        for key in (voter, ("address", request.remote)):
            wait_s = self._votes.acquire(key)
            if wait_s is not None:
                raise ApiError.too_many(
                    f"Too many votes: at most {self._votes.per_window} a minute. "
                    f"Try again in {math.ceil(wait_s)} s.",
                    code="too_many_votes",
                    wait_s=wait_s,
                )

    def issue(self) -> str:
        """A fresh cookie value: ``<random id>.<signature>``."""
        browser = secrets.token_urlsafe(16)
        return f"{browser}.{self._sign(browser)}"

    def _sign(self, browser: str) -> str:
        return hmac.new(self._key, browser.encode(), hashlib.sha256).hexdigest()[:32]

    async def _issue_with_page(self, request: web.Request, response: web.StreamResponse) -> None:
        if (
            request.method == "GET"
            and request.path == "/"
            and response.status == 200
            and self.browser_of(request) is None
        ):
            # A header, not response.set_cookie: aiohttp has written out its cookies by now.
            cookie = SimpleCookie()
            cookie[COOKIE] = self.issue()
            morsel = cookie[COOKIE]
            morsel["max-age"] = str(COOKIE_MAX_AGE_S)
            morsel["path"] = "/"
            morsel["httponly"] = True  # a flag: written bare when set
            morsel["samesite"] = "Lax"
            response.headers.add(hdrs.SET_COOKIE, morsel.OutputString())
