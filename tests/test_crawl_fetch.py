"""The crawler against a loopback copy of the forum, with faults injected in front of it."""

from __future__ import annotations

import asyncio
import gzip
import sqlite3
import time
from collections import Counter, defaultdict
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import pytest
from aiohttp import web

from crawl.crawler import CrawlOptions, CrawlSummary, crawl
from crawl.errors import CrawlError
from crawl.fetcher import Fetcher, FetchOptions, Pacer, parse_retry_after
from crawl.newschoolers import NewschoolersSite
from crawl.sample_site import serve_forum
from crawl.states import PageState, ThreadState
from crawl.store import Store

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).parent / "fixtures" / "forum"
SITE_DIR = FIXTURES / "site"
LISTING = "/forum/1/Ski-Gabber"
T1 = "/forum/thread/700001/Forum-rules---read-before-posting"
T2 = "/forum/thread/700002/Wax-for-cold-snow-"
T3 = "/forum/thread/700003/Park-skis-in-powder---too-soft-"
T5 = "/forum/thread/700005/Linked-without-its-slug"
T7 = "/forum/thread/700007/Goggles-fogging"
FAST = FetchOptions(
    concurrency=2, delay=0, timeout=0.4, max_tries=3, backoff=0.01, max_backoff=0.05
)


class FakeClock:
    """A clock that moves only when something sleeps on it: pacing and backoff are checked
    in its time, so the tests neither wait for real seconds nor depend on the machine's speed.

    A sleeper wakes at the time it fell asleep plus its delay (or later, if another sleeper
    already moved the clock past that): concurrent sleeps overlap as on a real clock.
    """

    def __init__(self) -> None:
        self.time = 0.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        start = self.time
        self.slept.append(seconds)
        await asyncio.sleep(0)
        self.time = max(self.time, start + seconds)


@dataclass
class FaultyServer:
    """Counts every request and answers the planned fault for the n-th hit of a path."""

    plan: dict[str, list] = field(default_factory=dict)
    hits: Counter = field(default_factory=Counter)
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    in_flight: int = 0
    max_in_flight: int = 0
    stop_after: int | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    clock: FakeClock | None = None  # request times on this clock; the wall clock if None

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        key = request.path_qs
        self.hits[key] += 1
        self.times[key].append(self.clock.now() if self.clock else time.monotonic())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.02)  # long enough for concurrent requests to overlap
            if self.stop_after is not None and self.pages_requested() >= self.stop_after:
                self.stopped.set()
            planned = self.plan.get(key, [])
            action = planned[self.hits[key] - 1] if self.hits[key] <= len(planned) else None
            if action == 503:
                return web.Response(status=503, text="overloaded")
            if action == 429:
                return web.Response(status=429, headers={"Retry-After": "1"})
            if action == "hang":
                await asyncio.sleep(1.0)  # past the client's timeout
            if action == "challenge":
                return web.Response(
                    text=(FIXTURES / "pages/challenge.html").read_text(), content_type="text/html"
                )
            return await handler(request)
        finally:
            self.in_flight -= 1

    def reset(self, *, stop_after: int | None = None) -> None:
        """Start counting afresh for the next run against the same server (same URLs)."""
        self.hits.clear()
        self.times.clear()
        self.max_in_flight = 0
        self.stop_after = stop_after
        self.stopped = asyncio.Event()

    def pages_requested(self) -> int:
        return sum(n for path, n in self.hits.items() if path != "/robots.txt")


async def run_crawl(
    base: str, db: Path, *, options: FetchOptions = FAST, clock: FakeClock | None = None, **kw
) -> tuple:
    with Store.open(db) as store:
        summary = await crawl(
            NewschoolersSite(),
            store,
            CrawlOptions(forum_url=base + LISTING, progress=False, **kw),
            options,
            clock=clock,
        )
        return summary, store.counts(), {t.id: t for t in store.threads()}, list(store.dump())


def page_states(db: Path) -> dict[str, str]:
    """Each stored page's state, by its URL's path and query."""
    with closing(sqlite3.connect(db)) as connection:
        rows = connection.execute("SELECT url, state FROM pages").fetchall()
    return {url.split("/", 3)[3]: state for url, state in rows}


@dataclass(frozen=True)
class FaultyCrawl:
    server: FaultyServer
    base: str
    summary: CrawlSummary
    counts: dict
    threads: dict
    states: dict[str, str]


@pytest.fixture(scope="module")
def faulty_crawl(tmp_path_factory) -> FaultyCrawl:
    """One crawl of the fixture forum through every fault at once; the tests below each
    check what one fault did to it."""
    clock = FakeClock()
    server = FaultyServer(
        plan={
            LISTING: [503],  # then success
            T1: [503, 503, 503],  # gives up after max_tries
            T2: [429],  # Retry-After: 1
            T2 + "?page=2": ["challenge"],  # a page the parser does not recognise
            T7: ["hang"],  # a timeout, then success
        },
        clock=clock,
    )
    db = tmp_path_factory.mktemp("faulty") / "f.sqlite"

    async def run() -> FaultyCrawl:
        async with serve_forum(SITE_DIR, middlewares=[server.middleware]) as base:
            summary, counts, threads, _ = await run_crawl(base, db, clock=clock)
        return FaultyCrawl(server, base, summary, counts, threads, page_states(db))

    return asyncio.run(run())


def test_a_503_on_the_listing_is_retried_and_the_listing_ends_at_its_last_page(faulty_crawl):
    hits = faulty_crawl.server.hits
    assert hits[LISTING] == 2 and hits[LISTING + "?page=2"] == 1
    assert hits[LISTING + "?page=3"] == 0  # page 2 has no next link


def test_a_page_that_keeps_failing_is_given_up_after_max_tries_and_recorded(faulty_crawl):
    assert faulty_crawl.server.hits[T1] == FAST.max_tries
    assert faulty_crawl.states[T1.lstrip("/")] == "fetch_error"


def test_retry_after_is_honoured(faulty_crawl):
    server = faulty_crawl.server
    assert server.hits[T2] == 2
    retry_gap = server.times[T2][1] - server.times[T2][0]
    assert retry_gap >= 0.95, f"Retry-After: 1 was not honoured ({retry_gap:.2f} s)"


def test_a_timeout_is_retried(faulty_crawl):
    assert faulty_crawl.server.hits[T7] == 2


def test_a_404_is_recorded_not_retried(faulty_crawl):
    assert faulty_crawl.server.hits["/forum/thread/700006/Deleted-thread"] == 1
    assert faulty_crawl.states["forum/thread/700006/Deleted-thread"] == "not_found"


def test_robots_txt_disallowed_pages_are_never_requested(faulty_crawl):
    hits = faulty_crawl.server.hits
    assert not any("700004" in path for path in hits)  # robots.txt disallows it
    assert not any(
        path.startswith(("/forum/print/", "/forum/reply/", "/members/")) for path in hits
    )
    assert faulty_crawl.states["forum/thread/700004/Disallowed-thread"] == "disallowed"


def test_a_thread_listed_on_two_listing_pages_is_fetched_once_per_page(faulty_crawl):
    hits = faulty_crawl.server.hits
    assert [hits[T3], hits[T3 + "?page=2"], hits[T3 + "?page=3"]] == [1, 1, 1]
    assert faulty_crawl.threads["700003"].page_count == 3


def test_a_slugless_link_is_followed_through_the_301_and_the_thread_moves(faulty_crawl):
    hits = faulty_crawl.server.hits
    assert hits["/forum/thread/700005"] == 1 and hits[T5] == 1  # 301 followed
    assert faulty_crawl.threads["700005"].url == faulty_crawl.base + T5


def test_no_more_than_concurrency_requests_are_in_flight(faulty_crawl):
    assert faulty_crawl.server.max_in_flight == 2 and faulty_crawl.summary.max_in_flight == 2


def test_a_page_the_parser_cannot_read_is_a_parse_error(faulty_crawl):
    assert faulty_crawl.states[T2.lstrip("/") + "?page=2"] == "parse_error"


def test_the_store_holds_only_the_states_the_types_name(faulty_crawl):
    assert set(faulty_crawl.states.values()) <= set(get_args(PageState))
    assert {t.state for t in faulty_crawl.threads.values()} <= set(get_args(ThreadState))


def test_every_thread_ends_in_the_state_its_faults_give_it(faulty_crawl):
    assert {tid: t.state for tid, t in faulty_crawl.threads.items()} == {
        "700001": "error",
        "700002": "error",
        "700003": "done",
        "700004": "disallowed",
        "700005": "done",
        "700006": "not_found",
        "700007": "done",
    }
    assert faulty_crawl.threads["700001"].sticky


def test_the_summary_counts_the_posts_stored_and_the_errors(faulty_crawl):
    assert faulty_crawl.counts["posts"] == 3 + 9 + 2 + 2  # 700002 p1, 700003, 700005, 700007
    summary = faulty_crawl.summary
    assert summary.errors == 3  # 700001 gave up, 700002 page 2 unparsable, 700006 gone
    assert summary.thread_states["done"] == 3


async def test_max_threads_and_pages_per_thread(tmp_path):
    server = FaultyServer()
    async with serve_forum(SITE_DIR, middlewares=[server.middleware]) as base:
        _, counts, threads, _ = await run_crawl(
            base, tmp_path / "f.sqlite", max_threads=3, pages_per_thread=2
        )
    assert server.hits[LISTING + "?page=2"] == 0  # three threads are on the first page
    assert [t.state for t in sorted(threads.values(), key=lambda t: t.rank)][:3] == [
        "done",
        "done",
        "partial",
    ]
    assert server.hits[T3 + "?page=2"] == 1 and server.hits[T3 + "?page=3"] == 0
    assert {t.state for t in threads.values() if t.rank > 3} == {"pending"}
    assert counts["posts"] == 3 + 6 + 6  # 700001, 700002 (both pages), 700003's first two


async def test_kill_and_resume_ends_identical_and_fetches_no_stored_page_again(tmp_path):
    server = FaultyServer()
    async with serve_forum(SITE_DIR, middlewares=[server.middleware]) as base:
        _, _, _, uninterrupted = await run_crawl(base, tmp_path / "whole.sqlite")

        server.reset(stop_after=6)
        task = asyncio.create_task(run_crawl(base, tmp_path / "resumed.sqlite"))
        await asyncio.wait_for(server.stopped.wait(), timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stored_after_kill = {
            path
            for path, state in page_states(tmp_path / "resumed.sqlite").items()
            if state == "ok"
        }
        assert 0 < len(stored_after_kill) < len(page_states(tmp_path / "whole.sqlite"))

        server.reset()
        summary, _, _, resumed = await run_crawl(base, tmp_path / "resumed.sqlite")
    refetched = {path.lstrip("/") for path in server.hits} & stored_after_kill
    assert refetched == set()
    assert summary.pages_from_store >= len(stored_after_kill)
    assert resumed == uninterrupted


async def test_rerun_of_a_finished_crawl_asks_only_for_robots_and_refresh_asks_again(tmp_path):
    server = FaultyServer()
    async with serve_forum(SITE_DIR, middlewares=[server.middleware]) as base:
        await run_crawl(base, tmp_path / "f.sqlite")
        server.reset()
        await run_crawl(base, tmp_path / "f.sqlite")
        # A crawl's fetch errors are tried again on a rerun; this one had none.
        assert list(server.hits) == ["/robots.txt"]
        server.reset()
        _, counts, _, _ = await run_crawl(base, tmp_path / "f.sqlite", refresh=True)
    assert server.hits[T3] == 1 and server.hits[LISTING] == 1
    assert counts["posts"] == 3 + 6 + 9 + 2 + 2


@asynccontextmanager
async def serve_robots(robots_txt: str, hits: Counter | None = None):
    """A site whose every page says "ok", under the given robots.txt; yields its origin."""

    @web.middleware
    async def count(request: web.Request, handler):
        if hits is not None:
            hits[request.path_qs] += 1
        return await handler(request)

    async def robots(_: web.Request) -> web.Response:
        return web.Response(text=robots_txt)

    async def page(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[count])
    app.router.add_get("/robots.txt", robots)
    app.router.add_get("/{path:.+}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_robots_crawl_delay_spaces_requests(tmp_path):
    clock = FakeClock()
    async with (
        serve_robots("User-agent: *\nCrawl-delay: 1\n") as origin,
        Fetcher.open(origin, FAST, clock=clock) as fetcher,
    ):
        assert fetcher.crawl_delay == 1.0
        started = clock.now()
        results = await asyncio.gather(
            fetcher.fetch(f"{origin}/p/1"), fetcher.fetch(f"{origin}/p/2")
        )
        elapsed = clock.now() - started
    assert [r.state for r in results] == ["ok", "ok"]
    assert elapsed >= 0.95
    assert clock.slept == [pytest.approx(1.0)]  # the second request waited its turn, once


async def test_the_pacer_spaces_starts_by_its_interval_and_a_hold_off_pushes_them_back():
    clock = FakeClock()
    pacer = Pacer(2.0, clock)
    starts = []

    async def start() -> None:
        await pacer.wait()
        starts.append(clock.now())

    await asyncio.gather(*(start() for _ in range(3)))
    assert starts == [0.0, 2.0, 4.0]
    pacer.hold_off(10.0)  # at 4.0, the server says: wait 10 s
    await start()
    assert starts[-1] == 14.0
    pacer.hold_off(1.0)  # shorter than the spacing already due: changes nothing
    await start()
    assert starts[-1] == 16.0
    clock.time = 30.0  # time passed with no request: the next one goes at once
    await start()
    assert starts[-1] == 30.0 and clock.slept == [2.0, 2.0, 10.0, 2.0]


async def test_backoff_and_retry_after_sleep_on_the_fetchers_clock():
    """A 429's Retry-After and a 503's backoff are waited on the injected clock, not the wall."""
    clock = FakeClock()
    answers = iter(
        [web.Response(status=429, headers={"Retry-After": "7"}), web.Response(status=503)]
    )

    async def page(_: web.Request) -> web.Response:
        return next(answers, web.Response(text="ok"))

    app = web.Application()
    app.router.add_get("/robots.txt", lambda _: web.Response(status=404))
    app.router.add_get("/p", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        options = FetchOptions(delay=0, max_tries=3, backoff=4.0, max_backoff=60.0)
        async with Fetcher.open(origin, options, clock=clock) as fetcher:
            wall = time.monotonic()
            result = await fetcher.fetch(f"{origin}/p")
            wall = time.monotonic() - wall
    finally:
        await runner.cleanup()
    assert result.state == "ok" and result.attempts == 3
    # 7 s as the server said, then 4 s doubled once plus up to 4 s of jitter.
    assert clock.slept[0] == 7.0 and 8.0 <= clock.slept[-1] <= 12.0
    assert clock.now() >= 15.0 and wall < 5.0


async def test_robots_rules_follow_rfc_9309_longest_match_and_wildcards():
    """The most specific rule wins whatever its place in the file, and ``*``/``$`` are
    patterns: the stdlib parser took the first match and read ``*`` literally, so it
    fetched both disallowed pages below."""
    robots_txt = (
        "User-agent: *\nAllow: /forum/\nDisallow: /forum/print/\nDisallow: /*?sort=\n"
        "Disallow: /*.pdf$\n"
    )
    hits: Counter = Counter()
    paths = ("/forum/print/1", "/forum/1/Ski?sort=new", "/rules.pdf", "/forum/thread/1")
    async with serve_robots(robots_txt, hits) as origin, Fetcher.open(origin, FAST) as fetcher:
        results = [await fetcher.fetch(origin + path) for path in paths]
    assert [r.state for r in results] == ["disallowed", "disallowed", "disallowed", "ok"]
    assert set(hits) == {"/robots.txt", "/forum/thread/1"}


async def test_unreadable_robots_txt_stops_the_crawl_with_one_clear_error(tmp_path):
    @web.middleware
    async def down(request: web.Request, handler):
        return web.Response(status=503)

    async with serve_forum(SITE_DIR, middlewares=[down]) as base:
        with pytest.raises(
            CrawlError,
            match=r"cannot read http://127\.0\.0\.1:\d+/robots.txt \(HTTP 503 after 3 tries\)",
        ):
            await run_crawl(base, tmp_path / "f.sqlite")


async def test_a_forum_whose_first_listing_is_missing_is_an_error(tmp_path):
    async with serve_forum(SITE_DIR) as base:
        options = CrawlOptions(forum_url=base + "/forum/9/Nope", progress=False)
        with (
            Store.open(tmp_path / "f.sqlite") as store,
            pytest.raises(CrawlError, match="cannot read the forum listing"),
        ):
            await crawl(NewschoolersSite(), store, options, FAST)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("120", 120.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0), ("soon", None), (None, None)],
)
def test_retry_after_header(header, seconds):
    assert parse_retry_after(header) == seconds


async def test_a_malformed_http_response_is_retried_then_recorded_not_raised():
    """A server that answers garbage must cost one page, not the whole crawl."""
    attempts: Counter = Counter()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = (await reader.readline()).decode()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        path = request_line.split()[1]
        attempts[path] += 1
        if path == "/robots.txt":
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 2OO NOT-A-STATUS\r\nthis is not a header\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with Fetcher.open(origin, FAST) as fetcher:
            result = await fetcher.fetch(f"{origin}/forum/thread/1")
    finally:
        server.close()
        await server.wait_closed()
    assert result.state == "fetch_error"
    assert result.attempts == FAST.max_tries
    assert attempts["/forum/thread/1"] == FAST.max_tries


@asynccontextmanager
async def serve_pages(pages: dict[str, web.Response], hits: Counter):
    """A site without robots.txt answering each path with a fresh copy of its response."""

    async def page(request: web.Request) -> web.Response:
        hits[request.path] += 1
        template = pages[request.path]
        return web.Response(
            body=template.body, status=template.status, headers=dict(template.headers)
        )

    app = web.Application()
    app.router.add_get("/robots.txt", lambda _: web.Response(status=404))
    app.router.add_get("/{path:.+}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_body_over_the_page_limit_is_a_clear_page_error_and_not_retried():
    hits: Counter = Counter()
    options = FetchOptions(delay=0, max_tries=3, backoff=0.01, max_page_bytes=1000)
    pages = {
        "/big": web.Response(body=b"x" * 5000, content_type="text/html"),
        "/small": web.Response(body=b"y" * 1000, content_type="text/html"),
    }
    async with serve_pages(pages, hits) as origin, Fetcher.open(origin, options) as fetcher:
        big = await fetcher.fetch(f"{origin}/big")
        small = await fetcher.fetch(f"{origin}/small")
    assert big.state == "fetch_error" and big.text == ""
    assert "larger than the 1000-byte page limit" in big.error
    assert "--max-page-bytes" in big.error
    assert hits["/big"] == 1  # the same bytes would come back: not asked again
    assert small.state == "ok" and small.text == "y" * 1000


async def test_a_decompression_bomb_is_cut_off_at_the_limit_whatever_content_length_says():
    hits: Counter = Counter()
    bomb = gzip.compress(b"<p>" + b"a" * 4_000_000)  # ~4 KB on the wire, 4 MB inflated
    options = FetchOptions(delay=0, max_tries=2, backoff=0.01, max_page_bytes=100_000)
    pages = {
        "/bomb": web.Response(
            body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "text/html"}
        )
    }
    async with serve_pages(pages, hits) as origin, Fetcher.open(origin, options) as fetcher:
        result = await fetcher.fetch(f"{origin}/bomb")
    assert len(bomb) < 100_000  # Content-Length alone would have let it through
    assert result.state == "fetch_error" and result.text == ""
    assert "larger than the 100000-byte page limit" in result.error
    assert hits["/bomb"] == 1


async def test_a_listing_that_serves_page_1_for_every_page_number_ends_the_walk(tmp_path):
    """A site that ignores ?page=N keeps promising a next page; the walk must not loop."""

    @web.middleware
    async def same_listing(request: web.Request, handler):
        if request.path == LISTING:
            request = request.clone(rel_url=LISTING)
        return await handler(request)

    async with serve_forum(SITE_DIR, middlewares=[same_listing]) as base:
        options = CrawlOptions(forum_url=base + LISTING, max_threads=None, progress=False)
        with Store.open(tmp_path / "f.sqlite") as store:
            summary = await crawl(NewschoolersSite(), store, options, FAST)
    assert summary.threads == 4  # page 1's threads, crawled
    assert summary.listing_error is not None
    assert f"{LISTING}?page=2: lists no thread that an earlier listing page did not" in (
        summary.listing_error
    )
