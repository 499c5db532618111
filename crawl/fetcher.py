"""Polite HTTP for one site: robots.txt, a request budget, pacing, retries.

All the crawl's requests go through one :class:`Fetcher`, bound to one origin,
so politeness is enforced in one place rather than trusted to every caller:

* a URL that robots.txt disallows is never requested, redirects included
  (RFC 9309 matching via protego: the longest rule wins, ``*`` and ``$`` are
  patterns; the stdlib parser takes the first match and reads ``*`` literally);
* at most ``concurrency`` requests are in flight, and request starts are at
  least ``delay`` seconds apart (robots.txt ``Crawl-delay`` wins when longer);
* timeouts, connection errors, 5xx and 429 are retried with exponential
  backoff and jitter; a ``Retry-After`` is obeyed and holds back every
  request to the host, not only the one retried;
* a page that keeps failing is given up after ``max_tries`` and reported,
  never raised: one bad page does not stop a crawl;
* a body larger than ``max_page_bytes`` is refused (``fetch_error``, not
  retried in the run): counted after decompression, so a small gzip bomb is
  cut off at the cap rather than inflated into memory.

Every wait (pacing, backoff, ``Retry-After``) is measured and slept on one
:class:`Clock`, the event loop's unless another is given, so the timing rules
can be tested on a clock that a test moves by hand.
"""

from __future__ import annotations

import asyncio
import codecs
import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
from protego import Protego
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base

from crawl.errors import CrawlError
from crawl.states import FetchState
from freeski_common.http import parse_retry_after

DEFAULT_USER_AGENT = (
    "freeski-bot-crawler/0.1 (builds a ski Q&A dataset; obeys robots.txt; one request per second)"
)
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRYABLE_ERRORS = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientResponseError,  # a response aiohttp cannot parse (bad status line, headers)
    asyncio.TimeoutError,
    TimeoutError,
)


@dataclass(frozen=True)
class FetchOptions:
    """How hard the crawl may push a site; defaults are the polite ones."""

    user_agent: str = DEFAULT_USER_AGENT
    concurrency: int = 4
    delay: float = 1.0  # seconds between request starts to the host
    timeout: float = 30.0  # per request, connect to last byte
    max_tries: int = 5
    backoff: float = 1.0  # the first retry waits about this long, doubling after
    max_backoff: float = 60.0
    max_retry_after: float = 300.0  # a longer Retry-After is capped, not obeyed for hours
    max_redirects: int = 5
    max_page_bytes: int = 5 * 1024 * 1024  # of the decoded body; a forum page is ~100 KB


@dataclass(frozen=True)
class FetchResult:
    """The outcome for one URL."""

    url: str
    final_url: str
    state: FetchState
    status: int | None = None
    text: str = ""
    etag: str | None = None
    last_modified: str | None = None
    attempts: int = 0
    error: str | None = None


class PageTooLarge(Exception):
    """A body over ``max_page_bytes``: asking again would bring the same bytes."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        size = f"declares {declared} bytes" if declared is not None else "goes on past that"
        super().__init__(
            f"the response is larger than the {limit}-byte page limit ({size}); "
            "raise --max-page-bytes if the site's pages really are that big"
        )


class RetryableResponse(Exception):
    """A 429 or 5xx: worth asking again, after ``retry_after`` seconds when the server says."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Response:
    status: int
    text: str
    headers: Mapping[str, str]


class _Backoff(wait_base):
    """Exponential backoff with jitter, unless the server said how long to wait."""

    def __init__(self, base: float, maximum: float, max_retry_after: float) -> None:
        self.base = base
        self.maximum = maximum
        self.max_retry_after = max_retry_after

    def __call__(self, retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, RetryableResponse) and error.retry_after is not None:
            return min(error.retry_after, self.max_retry_after)
        exponential: float = self.base * 2 ** (retry_state.attempt_number - 1)
        return min(self.maximum, exponential + random.uniform(0, self.base))


class Clock(Protocol):
    """Where the fetcher reads the time and waits."""

    def now(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class LoopClock:
    """The running event loop's monotonic clock and ``asyncio.sleep``: what a crawl uses."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Pacer:
    """Spaces request starts to one host at least ``interval`` seconds apart."""

    def __init__(self, interval: float, clock: Clock | None = None) -> None:
        self.interval = interval
        self.clock = clock or LoopClock()
        self._next_start: float | None = None
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            if self._next_start is not None:
                delay = self._next_start - self.clock.now()
                if delay > 0:
                    await self.clock.sleep(delay)
            self._next_start = self.clock.now() + self.interval

    def hold_off(self, seconds: float) -> None:
        """Push the next start back: the server asked every client to wait."""
        until = self.clock.now() + seconds
        self._next_start = until if self._next_start is None else max(self._next_start, until)


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class Fetcher:
    """Fetches pages of one origin politely. Create with :meth:`open`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        origin: str,
        options: FetchOptions,
        map_url: Callable[[str], str | None] = lambda url: url,
        clock: Clock | None = None,
    ) -> None:
        self.origin = origin
        self.options = options
        self._session = session
        self._map_url = map_url
        self._robots: Protego | None = None
        self._slots = asyncio.Semaphore(options.concurrency)
        self._pacer = Pacer(options.delay, clock)
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        origin: str,
        options: FetchOptions,
        map_url: Callable[[str], str | None] = lambda url: url,
        clock: Clock | None = None,
    ) -> AsyncIterator[Fetcher]:
        """A fetcher with its own session, robots.txt already read (raises CrawlError if unreadable)."""
        timeout = aiohttp.ClientTimeout(total=options.timeout)
        connector = aiohttp.TCPConnector(limit=options.concurrency)
        headers = {"User-Agent": options.user_agent}
        async with aiohttp.ClientSession(
            headers=headers, timeout=timeout, connector=connector
        ) as session:
            fetcher = cls(session, origin, options, map_url, clock)
            await fetcher.load_robots()
            yield fetcher

    @property
    def crawl_delay(self) -> float:
        """The delay between requests in force: ours, or robots.txt's when longer."""
        return self._pacer.interval

    async def load_robots(self) -> None:
        url = f"{self.origin}/robots.txt"
        result = await self._fetch_following(url, {}, check_robots=False)
        if result.state == "ok":
            robots = Protego.parse(result.text)
        elif result.status is not None and 400 <= result.status < 500:
            robots = Protego.parse("")  # RFC 9309: no robots.txt (4xx) means no restrictions
        else:
            raise CrawlError(
                f"cannot read {url} ({result.error or result.state}): the crawl does not start "
                "without the site's rules; check --forum-url and that the site is up"
            )
        self._robots = robots
        declared = robots.crawl_delay(self.options.user_agent)
        if declared is not None:
            self._pacer.interval = max(self._pacer.interval, float(declared))

    def allowed(self, url: str) -> bool:
        """Whether robots.txt lets this crawler fetch ``url`` (and it is on the crawled origin)."""
        if origin_of(url) != self.origin:
            return False
        return self._robots is None or self._robots.can_fetch(url, self.options.user_agent)

    async def fetch(
        self, url: str, *, etag: str | None = None, last_modified: str | None = None
    ) -> FetchResult:
        """GET ``url`` (conditionally when validators are given), following on-site redirects."""
        headers = {}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        return await self._fetch_following(url, headers, check_robots=True)

    async def _fetch_following(
        self, url: str, headers: dict[str, str], *, check_robots: bool
    ) -> FetchResult:
        current = url
        attempts = 0
        for _ in range(self.options.max_redirects + 1):
            if check_robots and not self.allowed(current):
                return FetchResult(url, current, "disallowed", error="disallowed by robots.txt")
            outcome = await self._get_with_retries(current, headers)
            if isinstance(outcome, FetchResult):
                return replace(
                    outcome, url=url, final_url=current, attempts=attempts + outcome.attempts
                )
            response, tries = outcome
            attempts += tries
            if response.status in REDIRECT_STATUSES:
                location = response.headers.get("Location", "")
                target = self._map_url(urljoin(current, location)) if location else None
                if target is None or origin_of(target) != self.origin:
                    return FetchResult(
                        url=url,
                        final_url=current,
                        state="http_error",
                        status=response.status,
                        attempts=attempts,
                        error=f"redirected off the crawled site to {location!r}",
                    )
                current = target
                headers = {}
                continue
            return FetchResult(
                url=url,
                final_url=current,
                state=_state_of(response.status),
                status=response.status,
                text=response.text,
                etag=response.headers.get("ETag"),
                last_modified=response.headers.get("Last-Modified"),
                attempts=attempts,
                error=None if response.status in (200, 304) else f"HTTP {response.status}",
            )
        return FetchResult(
            url=url,
            final_url=current,
            state="http_error",
            attempts=attempts,
            error=f"more than {self.options.max_redirects} redirects",
        )

    async def _get_with_retries(
        self, url: str, headers: dict[str, str]
    ) -> tuple[_Response, int] | FetchResult:
        retrying = AsyncRetrying(
            sleep=self._pacer.clock.sleep,
            retry=retry_if_exception_type((RetryableResponse, *RETRYABLE_ERRORS)),
            stop=stop_after_attempt(self.options.max_tries),
            wait=_Backoff(
                self.options.backoff, self.options.max_backoff, self.options.max_retry_after
            ),
            reraise=True,
        )
        tries = 0
        try:
            async for attempt in retrying:
                with attempt:
                    tries += 1
                    return await self._get_once(url, headers), tries
        except PageTooLarge as exc:
            return FetchResult(
                url=url, final_url=url, state="fetch_error", attempts=tries, error=str(exc)
            )
        except RetryableResponse as exc:
            return FetchResult(
                url=url,
                final_url=url,
                state="fetch_error",
                status=exc.status,
                attempts=tries,
                error=f"HTTP {exc.status} after {tries} tries",
            )
        except RETRYABLE_ERRORS as exc:
            reason = (
                "timed out"
                if isinstance(exc, (asyncio.TimeoutError, TimeoutError))
                else " ".join(str(exc).split())  # parser errors span several lines
            )
            return FetchResult(
                url=url,
                final_url=url,
                state="fetch_error",
                attempts=tries,
                error=f"{reason or type(exc).__name__} after {tries} tries",
            )
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _get_once(self, url: str, headers: dict[str, str]) -> _Response:
        async with self._slots:
            await self._pacer.wait()
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.requests += 1
            try:
                async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
                    if resp.status == 429 or resp.status >= 500:
                        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                        if retry_after is not None:
                            self._pacer.hold_off(min(retry_after, self.options.max_retry_after))
                        raise RetryableResponse(resp.status, retry_after)
                    text = await self._read_text(resp) if resp.status == 200 else ""
                    return _Response(resp.status, text, resp.headers.copy())
            finally:
                self.in_flight -= 1

    async def _read_text(self, resp: aiohttp.ClientResponse) -> str:
        """The body as text, refused once it passes ``max_page_bytes``.

        aiohttp's stream yields decompressed bytes, so the count is what would be
        held in memory, whatever ``Content-Length`` (the compressed size) says.
        """
        limit = self.options.max_page_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise PageTooLarge(limit, resp.content_length)
        body = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise PageTooLarge(limit)
        return bytes(body).decode(_charset(resp.charset), errors="replace")


def _charset(declared: str | None) -> str:
    """The header's charset when Python knows it, else UTF-8 (what aiohttp's ``text()`` assumes)."""
    if declared:
        try:
            return codecs.lookup(declared).name
        except LookupError:
            pass
    return "utf-8"


def _state_of(status: int) -> FetchState:
    if status == 200:
        return "ok"
    if status == 304:
        return "not_modified"
    if status in (404, 410):
        return "not_found"
    return "http_error"
