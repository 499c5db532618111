"""The store across crawler versions: an old store opens, is migrated, and the crawl resumes."""

from __future__ import annotations

import sqlite3
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
from aiohttp import web

from crawl.crawler import CrawlOptions, crawl
from crawl.errors import CrawlError
from crawl.fetcher import FetchOptions
from crawl.newschoolers import NewschoolersSite
from crawl.sample_site import serve_forum
from crawl.store import SCHEMA_VERSION, Store

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).parent / "fixtures"
SITE_DIR = FIXTURES / "forum" / "site"
SCHEMA_1 = FIXTURES / "store" / "schema-1.sql"
FAST = FetchOptions(concurrency=2, delay=0, timeout=5, max_tries=2, backoff=0.01)
FORGOTTEN = "/forum/thread/700002/Wax-for-cold-snow-?page=2"  # schema 1 could not parse it


def old_store(path: Path, origin: str) -> Path:
    with closing(sqlite3.connect(path)) as db:
        db.executescript(SCHEMA_1.read_text(encoding="utf-8").replace("{ORIGIN}", origin))
    return path


def threads_and_posts(store: Store) -> list[tuple]:
    """The dump without the pages table, whose markup columns schema 1 did not fill."""
    return [row for row in store.dump() if row[1] not in ("listing", "thread")]


async def test_a_schema_1_store_is_migrated_and_the_crawl_resumes_where_it_stopped(tmp_path):
    hits: Counter = Counter()

    @web.middleware
    async def count(request: web.Request, handler):
        hits[request.path_qs] += 1
        return await handler(request)

    async with serve_forum(SITE_DIR, middlewares=[count]) as base:
        db = old_store(tmp_path / "old.sqlite", base)
        with closing(sqlite3.connect(db)) as raw:
            kept = {url for (url,) in raw.execute("SELECT url FROM pages WHERE state = 'ok'")}
        options = CrawlOptions(forum_url=base + "/forum/1/Ski-Gabber", progress=False)
        with Store.open(db) as store:
            summary = await crawl(NewschoolersSite(), store, options, FAST)
            resumed = threads_and_posts(store)
            forgotten = store.page(base + FORGOTTEN)
            resumed_index = store.index_counts()
        asked = Counter(hits)
        with Store.open(tmp_path / "fresh.sqlite") as store:
            await crawl(NewschoolersSite(), store, options, FAST)
            fresh = threads_and_posts(store)
            fresh_index = store.index_counts()

    with closing(sqlite3.connect(db)) as raw:
        version = raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (SCHEMA_VERSION,) == ("3",)
    assert len(kept) == 5
    assert {url for url in kept if asked[url.removeprefix(base)]} == set()  # none asked again
    assert asked[FORGOTTEN] == 1 and forgotten is not None and forgotten.state == "ok"
    assert summary.pages_from_store == 5
    assert resumed == fresh  # the same threads and posts as a crawl that never stopped
    # The old store gained a search index: its threads from before are indexed too.
    assert resumed_index == fresh_index and resumed_index["passages"] > 0


def test_a_store_from_a_newer_crawler_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "new.sqlite"
    Store.open(path).close()
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(CrawlError, match=r"written with store schema 99.*crawl into a new file"):
        Store.open(path)
