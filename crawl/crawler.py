"""The crawl: walk a forum's listing, then each thread's pages, storing everything as it arrives.

One producer walks the listing pages in order (so thread ranks, and therefore
``--max-threads``, mean the same on every run); ``concurrency`` workers take
threads from a queue and walk their pages one after the other. Before any
request the store is asked whether the page is already settled: that check is
the whole of resuming, and it makes a rerun of a finished crawl cost no
request but robots.txt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

from crawl.errors import CrawlError
from crawl.fetcher import Clock, Fetcher, FetchOptions, FetchResult
from crawl.index import index_pending, index_thread
from crawl.site import ForumSite, Markup, ParseError
from crawl.states import ThreadState
from crawl.store import PageRecord, Store, ThreadRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrawlOptions:
    forum_url: str
    max_threads: int | None = None
    pages_per_thread: int = 10
    refresh: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal


@dataclass
class CrawlSummary:
    """What one run did; ``describe()`` is the end-of-crawl report."""

    threads: int = 0
    thread_states: dict[ThreadState, int] = field(default_factory=dict)
    pages_fetched: int = 0
    pages_from_store: int = 0
    errors: int = 0
    requests: int = 0
    max_in_flight: int = 0
    seconds: float = 0.0
    pages_parsed: int = 0
    pages_recovered: int = 0  # pages where posts were read out of a post that swallowed them
    posts_recovered: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)  # fallback -> pages that used it
    selector_matches: Counter[str] = field(default_factory=Counter)  # assumed selector -> total
    listing_error: str | None = None  # why the listing walk stopped before the forum's end

    def note_markup(self, markup: Markup) -> None:
        self.pages_parsed += 1
        self.pages_recovered += markup.recovered > 0
        self.posts_recovered += markup.recovered
        self.fallbacks.update(markup.fallbacks)
        for selector, count in markup.assumed.items():
            self.selector_matches[selector] += count

    @property
    def matched_nothing(self) -> list[str]:
        """The assumed selectors that matched no element on any page parsed in this run."""
        return sorted(s for s, n in self.selector_matches.items() if n == 0)

    def describe(self) -> str:
        states = ", ".join(f"{n} {s}" for s, n in sorted(self.thread_states.items())) or "none"
        rate = self.pages_fetched / self.seconds if self.seconds > 0 else 0.0
        recovered = f"{self.pages_recovered} page{'s' * (self.pages_recovered != 1)} recovered"
        if self.posts_recovered:
            recovered += f" ({self.posts_recovered} posts read out of posts that swallowed them)"
        lines = [
            f"crawled {self.threads} threads ({states}); {self.pages_fetched} pages fetched, "
            f"{self.pages_from_store} already in the store, {self.errors} errors, {recovered}; "
            f"{self.requests} requests in {self.seconds:.1f} s ({rate:.1f} pages/s)"
        ]
        if self.fallbacks or self.matched_nothing:
            used = ", ".join(f"{name} on {n} pages" for name, n in sorted(self.fallbacks.items()))
            lines.append(
                f"markup of the {self.pages_parsed} pages parsed: assumed selectors that matched "
                f"nothing: {', '.join(self.matched_nothing) or 'none'}; fallbacks used: "
                f"{used or 'none'} (check the site with `python -m crawl check URL`)"
            )
        if self.listing_error:
            lines.append(f"the listing stopped early: {self.listing_error}")
        return "\n".join(lines)


def url_rebaser(site: ForumSite, forum_url: str) -> Callable[[str], str | None]:
    """Map a link onto the crawled host: the site's canonical hosts become ``forum_url``'s,
    so a mirror or a local copy is crawled exactly like the site. Off-site links give None."""
    base = urlsplit(forum_url)

    def rebase(url: str) -> str | None:
        parts = urlsplit(url)
        if parts.netloc != base.netloc and parts.hostname not in site.canonical_hosts:
            return None
        return urlunsplit((base.scheme, base.netloc, parts.path, parts.query, ""))

    return rebase


async def crawl(
    site: ForumSite,
    store: Store,
    options: CrawlOptions,
    fetch_options: FetchOptions,
    *,
    clock: Clock | None = None,
) -> CrawlSummary:
    """Crawl ``options.forum_url`` into ``store``; raises CrawlError for a forum URL it cannot use."""
    try:
        forum = site.check_forum_url(options.forum_url)
    except ValueError as exc:
        raise CrawlError(f"--forum-url: {exc}") from None
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(options.forum_url))
    rebase = url_rebaser(site, options.forum_url)
    async with Fetcher.open(origin, fetch_options, rebase, clock) as fetcher:
        summary = await Crawler(site, store, fetcher, options, forum).run()
    # Threads whose pages all came from the store (a store an older crawler wrote, a crawl
    # killed between a page and its indexing) are indexed now.
    index_pending(store, progress=options.progress)
    return summary


class Crawler:
    def __init__(
        self, site: ForumSite, store: Store, fetcher: Fetcher, options: CrawlOptions, forum: str
    ) -> None:
        self.site = site
        self.store = store
        self.fetcher = fetcher
        self.options = options
        self.forum = forum
        self.rebase = url_rebaser(site, options.forum_url)
        self.summary = CrawlSummary()

    async def run(self) -> CrawlSummary:
        started = time.monotonic()
        workers = max(1, self.fetcher.options.concurrency)
        queue: asyncio.Queue[ThreadRow | None] = asyncio.Queue(maxsize=2 * workers)
        bar = tqdm(
            total=0, unit="thread", desc="threads", disable=_bar_disabled(self.options.progress)
        )
        tasks = [asyncio.create_task(self._walk_listing(queue, workers, bar))]
        tasks += [asyncio.create_task(self._work(queue, bar)) for _ in range(workers)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            bar.close()
            self.summary.seconds = time.monotonic() - started
            self.summary.requests = self.fetcher.requests
            self.summary.max_in_flight = self.fetcher.max_in_flight
        return self.summary

    # --- listing -------------------------------------------------------------------
    async def _walk_listing(
        self, queue: asyncio.Queue[ThreadRow | None], workers: int, bar: tqdm[NoReturn]
    ) -> None:
        limit = self.options.max_threads
        seen: set[str] = set()
        number = 1
        while limit is None or len(seen) < limit:
            url = self.site.listing_url(self.options.forum_url, number)
            record = await self._listing_page(url, number)
            if record.state != "ok" and number == 1:
                raise CrawlError(
                    f"cannot read the forum listing {url} ({record.error or record.state}): "
                    "check --forum-url"
                )
            if record.state != "ok":
                # The page before promised this one: not the forum's end, and the report says so.
                self.summary.listing_error = f"{url}: {record.error or record.state}"
                break
            listed = self.store.listed_threads(url)
            if number > 1 and not listed:
                # Every row was on an earlier page: a site that ignores ?page=N serves page 1
                # again forever, and its "next" link would keep this walk going for ever.
                self.summary.listing_error = (
                    f"{url}: lists no thread that an earlier listing page did not; the site "
                    "seems to serve the same listing for every ?page=N, so the walk stops here"
                )
                break
            for thread in listed:
                if thread.id in seen or (limit is not None and len(seen) >= limit):
                    continue
                seen.add(thread.id)
                bar.total = len(seen)
                bar.refresh()
                await queue.put(thread)
            if not record.has_next:
                break
            number += 1
        for _ in range(workers):
            await queue.put(None)

    async def _listing_page(self, url: str, number: int) -> PageRecord:
        stored, result = await self._fetch_unless_stored(url)
        if result is None:
            assert stored is not None
            return stored
        record = _record(result, url, "listing", number)
        if result.state != "ok":
            self._error(record)
            self.store.save_page(record)
            return record
        try:
            listing = self.site.parse_listing(result.text, result.final_url)
            if number > 1 and not listing.threads:
                raise ParseError(
                    "no thread rows, although the previous listing page had rows and a next "
                    "page: the listing layout changed? (run `python -m crawl check` on this URL)"
                )
        except ParseError as exc:
            record = replace(record, state="parse_error", error=str(exc))
            self._error(record)
            self.store.save_page(record)
            return record
        self._note_markup(url, listing.markup)
        links = []
        for link in listing.threads:
            on_host = self.rebase(link.url)
            if on_host is not None:
                links.append((link, on_host))
        record = replace(record, has_next=listing.has_next).with_markup(listing.markup)
        self.store.save_listing(record, self.forum, links)
        return record

    # --- threads -------------------------------------------------------------------
    async def _work(self, queue: asyncio.Queue[ThreadRow | None], bar: tqdm[NoReturn]) -> None:
        while (thread := await queue.get()) is not None:
            state = await self._crawl_thread(thread)
            self.store.set_thread_state(thread.id, state)
            self.summary.threads += 1
            self.summary.thread_states[state] = self.summary.thread_states.get(state, 0) + 1
            bar.update(1)
            bar.set_postfix(
                pages=self.summary.pages_fetched,
                stored=self.summary.pages_from_store,
                errors=self.summary.errors,
                refresh=False,
            )

    async def _crawl_thread(self, thread: ThreadRow) -> ThreadState:
        """Walk one thread's pages; returns its crawl state."""
        first_url = thread.url
        for number in range(1, self.options.pages_per_thread + 1):
            url = self.site.thread_url(first_url, number)
            record = await self._thread_page(thread, url, number)
            if number == 1 and record.state == "ok" and (saved := self.store.thread(thread.id)):
                first_url = saved.url  # moved, if page 1 redirected
            if record.state == "not_found":
                return "not_found" if number == 1 else "done"
            if record.state == "disallowed":
                return "disallowed" if number == 1 else "partial"
            if record.state != "ok":
                return "error"
            if not record.has_next:
                return "done"
        return "partial"  # more pages than --pages-per-thread

    async def _thread_page(self, thread: ThreadRow, url: str, number: int) -> PageRecord:
        stored, result = await self._fetch_unless_stored(url)
        if result is None:
            assert stored is not None
            return stored
        record = _record(result, url, "thread", number, thread.id)
        if result.state != "ok":
            if result.state not in ("disallowed", "not_found") or number == 1:
                self._error(record)
            self.store.save_thread_page(record, None)
            return record
        try:
            page = self.site.parse_thread(result.text, result.final_url)
            if page.thread_id != thread.id:
                raise ParseError(f"the page is thread {page.thread_id}, not {thread.id}")
        except ParseError as exc:
            record = replace(record, state="parse_error", error=str(exc))
            self._error(record)
            self.store.save_thread_page(record, None)
            return record
        self._note_markup(url, page.markup)
        record = replace(record, has_next=page.has_next).with_markup(page.markup)
        moved = None
        if number == 1 and result.final_url != url:
            # Stored under where it lives, so the next run looks for it there and finds it.
            moved = urlunsplit(urlsplit(result.final_url)._replace(query="", fragment=""))
            record = replace(record, url=moved)
        self.store.save_thread_page(record, page, thread_url=moved)
        # The search index follows as pages arrive: a bot reading the store sees new answers.
        index_thread(self.store, self.store.thread(thread.id) or thread)
        return record

    async def _fetch_unless_stored(self, url: str) -> tuple[PageRecord | None, FetchResult | None]:
        """The stored page and no fetch when the store already has it settled (or the
        server says it is unchanged); otherwise the stored page, if any, and a fresh fetch."""
        stored = self.store.page(url)
        if stored is not None and stored.settled and not self.options.refresh:
            self.summary.pages_from_store += 1
            return stored, None
        result = await self._fetch(url, stored)
        if result.state == "not_modified" and stored is not None:
            self.store.save_page(stored)
            return stored, None
        return stored, result

    async def _fetch(self, url: str, stored: PageRecord | None) -> FetchResult:
        known = stored if stored is not None and stored.state == "ok" else None
        result = await self.fetcher.fetch(
            url,
            etag=known.etag if known else None,
            last_modified=known.last_modified if known else None,
        )
        if result.state != "disallowed":
            self.summary.pages_fetched += 1
        return result

    def _note_markup(self, url: str, markup: Markup) -> None:
        """Count what the page needed; say the first time each fallback is used in a run."""
        for name in markup.fallbacks:
            if name not in self.summary.fallbacks:
                log.warning(
                    "markup: %s needed the fallback %s (assumed markup missing); "
                    "said once per run, counted in the summary",
                    url,
                    name,
                )
        self.summary.note_markup(markup)

    def _error(self, record: PageRecord) -> None:
        if record.state == "disallowed":
            log.info("skipped (robots.txt): %s", record.url)
            return
        self.summary.errors += 1
        log.warning("%s: %s: %s", record.state, record.url, record.error)


def _record(
    result: FetchResult, url: str, kind: str, number: int, thread_id: str | None = None
) -> PageRecord:
    """What the store keeps of a fetch; parsing may still turn it into a parse error."""
    return PageRecord(
        url=url,
        kind=kind,
        number=number,
        state=result.state,
        thread_id=thread_id,
        status=result.status,
        etag=result.etag,
        last_modified=result.last_modified,
        attempts=result.attempts,
        error=result.error,
    )


def _bar_disabled(progress: bool | None) -> bool | None:
    return None if progress is None else not progress
