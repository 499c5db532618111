"""The forum store: one SQLite file (WAL) that the crawl writes as it goes and the dataset reads.

Every page is committed together with what was parsed from it, in one
transaction, so a crawl killed at any moment leaves either the whole page or
none of it; ``pages`` is the crawl's memory of what it already has, which is
what makes a restarted crawl continue instead of starting over.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

from crawl.errors import CrawlError
from crawl.site import Markup, Post, ThreadLink, ThreadPage
from crawl.states import PageState, ThreadState

SCHEMA_VERSION = "3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS threads (
    id          TEXT PRIMARY KEY,           -- the site's thread id
    forum       TEXT NOT NULL,              -- e.g. forum/1/Ski-Gabber
    rank        INTEGER NOT NULL UNIQUE,    -- order of discovery in the listing walk
    title       TEXT NOT NULL,
    url         TEXT NOT NULL,              -- first page, on the crawled host
    listing_url TEXT NOT NULL,              -- the listing page that first listed it
    sticky      INTEGER NOT NULL DEFAULT 0,
    author      TEXT,
    created     TEXT,                       -- ISO 8601, site local time
    page_count  INTEGER,                    -- as the thread's pagination says
    state       TEXT NOT NULL DEFAULT 'pending',
                -- pending | partial | done | not_found | disallowed | error
    indexed     INTEGER NOT NULL DEFAULT 0  -- its passages match its posts (see passages)
);
CREATE TABLE IF NOT EXISTS posts (
    id         TEXT PRIMARY KEY,            -- the site's post id
    thread_id  TEXT NOT NULL REFERENCES threads(id),
    page       INTEGER NOT NULL,
    position   INTEGER NOT NULL,            -- its #N, else its place on the page; 1 on page 1 = the question
    author     TEXT,
    created    TEXT,
    html       TEXT NOT NULL,               -- the post's element as served
    text       TEXT NOT NULL,               -- its own text: quotes and signature held apart
    quoted_ids TEXT NOT NULL DEFAULT '[]',  -- JSON list of the post ids it quotes
    quotes     TEXT NOT NULL DEFAULT '[]',  -- JSON list of {post_id, author, text}
    signature  TEXT NOT NULL DEFAULT '',
    edited     INTEGER NOT NULL DEFAULT 0,
    deleted    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS posts_by_thread ON posts(thread_id, position);
CREATE TABLE IF NOT EXISTS pages (
    url           TEXT PRIMARY KEY,         -- as requested, on the crawled host
    kind          TEXT NOT NULL,            -- listing | thread
    thread_id     TEXT,
    number        INTEGER NOT NULL,         -- page number within the listing or thread
    state         TEXT NOT NULL,
                  -- ok | not_found | http_error | parse_error | fetch_error | disallowed
    status        INTEGER,                  -- last HTTP status, if any
    has_next      INTEGER NOT NULL DEFAULT 0,
    fetched_at    TEXT NOT NULL,
    etag          TEXT,
    last_modified TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    recovered     INTEGER NOT NULL DEFAULT 0,    -- posts read out of a post that swallowed them
    fallbacks     TEXT NOT NULL DEFAULT '[]',    -- JSON list: the markup fallbacks the page needed
    selectors     TEXT NOT NULL DEFAULT '{}'     -- JSON {assumed selector: elements it matched}
);
-- The search index: a thread's replies that are answers (crawl.rules), with the text the
-- dataset trains on, and SQLite's FTS5 over them and their thread's title. Rebuilt per
-- thread whenever a page of it is stored (threads.indexed = 0 until then).
CREATE TABLE IF NOT EXISTS passages (
    id        INTEGER PRIMARY KEY,
    post_id   TEXT NOT NULL UNIQUE,
    thread_id TEXT NOT NULL,
    title     TEXT NOT NULL,                -- the thread's cleaned title
    text      TEXT NOT NULL,                -- the cleaned reply, as the dataset has it
    author    TEXT,
    created   TEXT,
    url       TEXT NOT NULL,                -- the post on the crawled site
    text_key  BLOB NOT NULL                 -- crawl.rules.text_key: copies share it
);
CREATE INDEX IF NOT EXISTS passages_by_thread ON passages(thread_id);
CREATE INDEX IF NOT EXISTS passages_by_key ON passages(text_key, thread_id);
-- Every readable post's key, answer or not: the copypasta rule counts threads over all posts.
CREATE TABLE IF NOT EXISTS post_keys (
    post_id   TEXT PRIMARY KEY,
    thread_id TEXT NOT NULL,
    text_key  BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS post_keys_by_key ON post_keys(text_key, thread_id);
CREATE VIRTUAL TABLE IF NOT EXISTS passage_index USING fts5(
    title, text, content='passages', content_rowid='id',
    tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS passages_insert AFTER INSERT ON passages BEGIN
    INSERT INTO passage_index(rowid, title, text) VALUES (new.id, new.title, new.text);
END;
CREATE TRIGGER IF NOT EXISTS passages_delete AFTER DELETE ON passages BEGIN
    INSERT INTO passage_index(passage_index, rowid, title, text)
    VALUES ('delete', old.id, old.title, old.text);
END;
"""

# How to bring a store written by an older crawler up to this one, step by step.
MIGRATIONS = {
    "1": (
        "ALTER TABLE pages ADD COLUMN recovered INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE pages ADD COLUMN fallbacks TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE pages ADD COLUMN selectors TEXT NOT NULL DEFAULT '{}'",
        # Schema 1's parser gave up on pages that this one reads (posts swallowed by unclosed
        # tags, guessed markup missing): forget those pages so the next run fetches them again.
        "DELETE FROM pages WHERE state = 'parse_error'",
        "UPDATE meta SET value = '2' WHERE key = 'schema_version'",
    ),
    # Schema 3 adds the search index (created empty by SCHEMA); every thread starts unindexed,
    # and `python -m crawl index` (or the next fetch) fills it.
    "2": (
        "ALTER TABLE threads ADD COLUMN indexed INTEGER NOT NULL DEFAULT 0",
        "UPDATE meta SET value = '3' WHERE key = 'schema_version'",
    ),
}

# Pages in these states are kept on a rerun: the answer would not change by asking again.
# fetch_error (retries exhausted) and disallowed (robots.txt may change) are looked at again.
SETTLED_STATES: frozenset[PageState] = frozenset({"ok", "not_found", "http_error", "parse_error"})


@dataclass(frozen=True)
class PageRecord:
    """What the crawl learned from one URL."""

    url: str
    kind: str
    number: int
    state: PageState
    thread_id: str | None = None
    status: int | None = None
    has_next: bool = False
    etag: str | None = None
    last_modified: str | None = None
    attempts: int = 0
    error: str | None = None
    recovered: int = 0
    fallbacks: tuple[str, ...] = ()
    selectors: Mapping[str, int] = field(default_factory=dict)

    @property
    def settled(self) -> bool:
        # A listing page that did not parse is asked again: the listing is the crawl's map,
        # and what stood in for it (a challenge page, a new layout) may be gone next time.
        if self.kind == "listing" and self.state == "parse_error":
            return False
        return self.state in SETTLED_STATES

    def with_markup(self, markup: Markup) -> PageRecord:
        """This record carrying what the parser said of the page's markup."""
        return replace(
            self,
            recovered=markup.recovered,
            fallbacks=tuple(markup.fallbacks),
            selectors=dict(markup.assumed),
        )


@dataclass(frozen=True)
class ThreadRow:
    id: str
    forum: str
    rank: int
    title: str
    url: str
    sticky: bool
    author: str | None
    created: str | None
    page_count: int | None
    state: ThreadState


class StoredQuote(TypedDict):
    """A :class:`crawl.site.Quote` as the ``quotes`` column holds it (JSON)."""

    post_id: str | None
    author: str | None
    text: str


@dataclass(frozen=True)
class StoredPost:
    id: str
    thread_id: str
    page: int
    position: int
    author: str | None
    created: str | None
    text: str
    quotes: list[StoredQuote]
    signature: str
    edited: bool
    deleted: bool


class Store:
    """The crawl's SQLite file. Not thread-safe: one event loop owns it."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, path: str | Path, *, create: bool = True) -> Store:
        path = Path(path)
        if not create and not path.is_file():
            raise CrawlError(
                f"no forum store at {path}: run `python -m crawl fetch --db {path}` first"
            )
        if create and not path.parent.is_dir():
            raise CrawlError(
                f"the directory for --db {path} does not exist: create {path.parent} first"
            )
        try:
            db = sqlite3.connect(path)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            with db:
                db.executescript(SCHEMA)
                db.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                    (SCHEMA_VERSION,),
                )
            version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
            while version in MIGRATIONS:
                with db:
                    for statement in MIGRATIONS[version]:
                        db.execute(statement)
                version = db.execute(
                    "SELECT value FROM meta WHERE key='schema_version'"
                ).fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise CrawlError(
                f"{path} is not a forum store ({exc}): give a new file or the one `fetch` wrote"
            ) from None
        if version != SCHEMA_VERSION:
            db.close()
            raise CrawlError(
                f"{path} was written with store schema {version}, this crawler reads {SCHEMA_VERSION}: "
                "crawl into a new file"
            )
        return cls(db, path)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- pages -----------------------------------------------------------------------
    def page(self, url: str) -> PageRecord | None:
        row = self._db.execute("SELECT * FROM pages WHERE url = ?", (url,)).fetchone()
        if row is None:
            return None
        return PageRecord(
            url=row["url"],
            kind=row["kind"],
            number=row["number"],
            state=row["state"],
            thread_id=row["thread_id"],
            status=row["status"],
            has_next=bool(row["has_next"]),
            etag=row["etag"],
            last_modified=row["last_modified"],
            attempts=row["attempts"],
            error=row["error"],
            recovered=row["recovered"],
            fallbacks=tuple(json.loads(row["fallbacks"])),
            selectors=json.loads(row["selectors"]),
        )

    def _put_page(self, record: PageRecord) -> None:
        self._db.execute(
            """INSERT INTO pages(url, kind, thread_id, number, state, status, has_next, fetched_at,
                                 etag, last_modified, attempts, error, recovered, fallbacks,
                                 selectors)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(url) DO UPDATE SET
                 kind=excluded.kind, thread_id=excluded.thread_id, number=excluded.number,
                 state=excluded.state, status=excluded.status, has_next=excluded.has_next,
                 fetched_at=excluded.fetched_at, etag=excluded.etag,
                 last_modified=excluded.last_modified, attempts=excluded.attempts,
                 error=excluded.error, recovered=excluded.recovered,
                 fallbacks=excluded.fallbacks, selectors=excluded.selectors""",
            (
                record.url,
                record.kind,
                record.thread_id,
                record.number,
                record.state,
                record.status,
                int(record.has_next),
                datetime.now(timezone.utc).isoformat(timespec="seconds"),
                record.etag,
                record.last_modified,
                record.attempts,
                record.error,
                record.recovered,
                json.dumps(list(record.fallbacks)),
                json.dumps(dict(record.selectors), sort_keys=True),
            ),
        )

    def save_page(self, record: PageRecord) -> None:
        """Record a page that brought nothing to store (an error, a 404, a disallowed URL)."""
        with self._db:
            self._put_page(record)

    # --- listings and threads --------------------------------------------------------
    def save_listing(
        self, record: PageRecord, forum: str, links: Sequence[tuple[ThreadLink, str]]
    ) -> None:
        """Record a listing page and the threads it introduced (``(link, url on the crawled host)``)."""
        with self._db:
            self._put_page(record)
            rank = self._db.execute("SELECT COALESCE(MAX(rank), 0) FROM threads").fetchone()[0]
            for link, url in links:
                exists = self._db.execute("SELECT 1 FROM threads WHERE id = ?", (link.thread_id,))
                if exists.fetchone():
                    continue
                rank += 1
                self._db.execute(
                    """INSERT INTO threads(id, forum, rank, title, url, listing_url, sticky)
                       VALUES (?, ?, ?, ?, ?, ?, ?)""",
                    (link.thread_id, forum, rank, link.title, url, record.url, int(link.sticky)),
                )

    def listed_threads(self, listing_url: str) -> list[ThreadRow]:
        """The threads first discovered on ``listing_url``, in discovery order."""
        rows = self._db.execute(
            "SELECT * FROM threads WHERE listing_url = ? ORDER BY rank", (listing_url,)
        )
        return [_thread_row(row) for row in rows]

    def threads(self) -> list[ThreadRow]:
        return [_thread_row(row) for row in self._db.execute("SELECT * FROM threads ORDER BY rank")]

    def save_thread_page(
        self, record: PageRecord, page: ThreadPage | None, *, thread_url: str | None = None
    ) -> None:
        """Record a thread page and, when it parsed, its posts and what it says about the thread.

        ``thread_url`` moves the thread to the URL its first page redirected to, in the same
        transaction, so a rerun asks for later pages at the same URLs as the first run did.
        """
        with self._db:
            self._put_page(record)
            if thread_url is not None and record.thread_id is not None:
                self._db.execute(
                    "UPDATE threads SET url = ? WHERE id = ?", (thread_url, record.thread_id)
                )
            if page is None or record.thread_id is None:
                return
            self._db.execute("UPDATE threads SET indexed = 0 WHERE id = ?", (record.thread_id,))
            if record.number == 1:
                self._db.execute(
                    """UPDATE threads SET title = ?, author = ?, created = ?, page_count = ?
                       WHERE id = ?""",
                    (page.title, page.author, page.created, page.page_count, record.thread_id),
                )
            for post in page.posts:
                self._put_post(record.thread_id, record.number, post)

    def _put_post(self, thread_id: str, page: int, post: Post) -> None:
        """Insert or refresh one post; where it sits is the lowest page it was seen on.

        Some forums repeat the opening post at the top of every page of a thread: the
        last page seen must not move it off page 1 (the dataset builder takes page 1's
        first post as the question), and a post that moves to an earlier page (posts
        before it deleted, seen on ``--refresh``) follows it there.
        """
        quotes: list[StoredQuote] = [
            {"post_id": q.post_id, "author": q.author, "text": q.text} for q in post.quotes
        ]
        quoted_ids = [q.post_id for q in post.quotes if q.post_id]
        self._db.execute(
            """INSERT INTO posts(id, thread_id, page, position, author, created, html, text,
                                 quoted_ids, quotes, signature, edited, deleted)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(id) DO UPDATE SET
                 thread_id=excluded.thread_id,
                 page=CASE WHEN excluded.page <= posts.page THEN excluded.page ELSE posts.page END,
                 position=CASE WHEN excluded.page <= posts.page
                               THEN excluded.position ELSE posts.position END,
                 author=excluded.author, created=excluded.created, html=excluded.html,
                 text=excluded.text, quoted_ids=excluded.quoted_ids, quotes=excluded.quotes,
                 signature=excluded.signature, edited=excluded.edited, deleted=excluded.deleted""",
            (
                post.post_id,
                thread_id,
                page,
                post.position,
                post.author,
                post.created,
                post.html,
                post.text,
                json.dumps(quoted_ids),
                json.dumps(quotes, ensure_ascii=False),
                post.signature,
                int(post.edited),
                int(post.deleted),
            ),
        )

    def set_thread_state(self, thread_id: str, state: ThreadState) -> None:
        with self._db:
            self._db.execute("UPDATE threads SET state = ? WHERE id = ?", (state, thread_id))

    def thread(self, thread_id: str) -> ThreadRow | None:
        row = self._db.execute("SELECT * FROM threads WHERE id = ?", (thread_id,)).fetchone()
        return _thread_row(row) if row else None

    # --- reading for the dataset -----------------------------------------------------
    def posts(self, thread_id: str) -> list[StoredPost]:
        rows = self._db.execute(
            "SELECT * FROM posts WHERE thread_id = ? ORDER BY page, position, id", (thread_id,)
        )
        return [
            StoredPost(
                id=row["id"],
                thread_id=row["thread_id"],
                page=row["page"],
                position=row["position"],
                author=row["author"],
                created=row["created"],
                text=row["text"],
                quotes=json.loads(row["quotes"]),
                signature=row["signature"],
                edited=bool(row["edited"]),
                deleted=bool(row["deleted"]),
            )
            for row in rows
        ]

    def post_url(self, thread: ThreadRow, post: StoredPost) -> str:
        """Where a post can be read on the site: its page, with the post's anchor when it has one."""
        page_url = self.page_url(thread.id, post.page) or thread.url
        if not post.id.isdigit():
            return page_url  # an id the crawler derived: the page has no anchor for it
        return f"{page_url}#post-{post.id}"

    def page_url(self, thread_id: str, number: int) -> str | None:
        row = self._db.execute(
            "SELECT url FROM pages WHERE kind = 'thread' AND thread_id = ? AND number = ?",
            (thread_id, number),
        ).fetchone()
        return row[0] if row else None

    def counts(self) -> dict[str, int]:
        """Rows per table and pages per state: the crawl summary and ``stats.json`` use these."""
        result = {
            table: self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("threads", "posts", "pages")
        }
        for state, count in self._db.execute("SELECT state, COUNT(*) FROM pages GROUP BY state"):
            result[f"pages_{state}"] = count
        result["pages_recovered"] = self._db.execute(
            "SELECT COUNT(*) FROM pages WHERE recovered > 0"
        ).fetchone()[0]
        return result

    def markup_report(self) -> dict[str, Any]:
        """How the stored pages met the site module's markup guesses (``stats.json`` ``markup``).

        ``matched_nothing`` lists the assumed selectors that matched no element on any page
        that tried them: the guesses an operator should check first.
        """
        fallbacks: Counter[str] = Counter()
        totals: Counter[str] = Counter()
        pages = recovered_pages = recovered_posts = 0
        rows = self._db.execute(
            "SELECT recovered, fallbacks, selectors FROM pages WHERE state = 'ok' ORDER BY url"
        )
        for row in rows:
            pages += 1
            recovered_pages += row["recovered"] > 0
            recovered_posts += row["recovered"]
            fallbacks.update(json.loads(row["fallbacks"]))
            for selector, count in json.loads(row["selectors"]).items():
                totals[selector] += count
        parse_errors = self._db.execute(
            "SELECT COUNT(*) FROM pages WHERE state = 'parse_error'"
        ).fetchone()[0]
        return {
            "pages": pages,
            "parse_errors": parse_errors,
            "recovered_pages": recovered_pages,
            "recovered_posts": recovered_posts,
            "fallbacks": dict(sorted(fallbacks.items())),
            "matched_nothing": sorted(s for s, n in totals.items() if n == 0),
        }

    # --- the search index (crawl.search reads it, crawl.index writes it) --------------
    def unindexed_threads(self) -> list[ThreadRow]:
        rows = self._db.execute("SELECT * FROM threads WHERE indexed = 0 ORDER BY rank")
        return [_thread_row(row) for row in rows]

    def index_counts(self) -> dict[str, int]:
        passages, threads = self._db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT thread_id) FROM passages"
        ).fetchone()
        return {"passages": passages, "threads": threads}

    def forget_index(self) -> None:
        """Mark every thread unindexed, so the next indexing pass rebuilds all of it."""
        with self._db:
            self._db.execute("UPDATE threads SET indexed = 0")

    def replace_passages(
        self,
        thread_id: str,
        passages: Sequence[Mapping[str, object]],
        keys: Sequence[tuple[str, bytes]],
    ) -> None:
        """Put a thread's passages and post keys in place of its old ones, in one transaction."""
        with self._db:
            self._db.execute("DELETE FROM passages WHERE thread_id = ?", (thread_id,))
            self._db.execute("DELETE FROM post_keys WHERE thread_id = ?", (thread_id,))
            self._db.executemany(
                """INSERT INTO passages(post_id, thread_id, title, text, author, created, url,
                                        text_key)
                   VALUES (:post_id, :thread_id, :title, :text, :author, :created, :url,
                           :text_key)""",
                passages,
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO post_keys(post_id, thread_id, text_key) VALUES (?, ?, ?)",
                [(post_id, thread_id, key) for post_id, key in keys],
            )
            self._db.execute("UPDATE threads SET indexed = 1 WHERE id = ?", (thread_id,))

    def dump(self) -> Iterator[tuple[object, ...]]:
        """Every stored row except fetch times, in a fixed order: equal dumps, equal stores."""
        queries = (
            "SELECT * FROM threads ORDER BY id",
            "SELECT * FROM posts ORDER BY id",
            """SELECT url, kind, thread_id, number, state, status, has_next, etag, last_modified, error,
                      recovered, fallbacks, selectors
               FROM pages ORDER BY url""",
        )
        for query in queries:
            yield from (tuple(row) for row in self._db.execute(query))


def _thread_row(row: sqlite3.Row) -> ThreadRow:
    return ThreadRow(
        id=row["id"],
        forum=row["forum"],
        rank=row["rank"],
        title=row["title"],
        url=row["url"],
        sticky=bool(row["sticky"]),
        author=row["author"],
        created=row["created"],
        page_count=row["page_count"],
        state=row["state"],
    )
