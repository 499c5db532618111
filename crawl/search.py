"""Searching the forum store: the passages that may answer a question, best first.

BM25 over the store's own FTS5 index (see :mod:`crawl.index`): no server, no
model, one read-only SQLite connection that a crawl may be writing beside.
A user's words are never an FTS query: each word is quoted, so text full of
``"``, ``*``, ``NEAR``, ``:`` or parentheses searches for those words and
cannot raise a syntax error. The rules that need the whole store are applied
here, on the candidates: a text pasted into ``copypasta_threads`` threads is
spam, a copy of a passage already found is no second source, and no thread
fills more than ``per_thread`` of the ``k`` slots.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from crawl.errors import CrawlError

WORD = re.compile(r"[^\W_]+")
# Words that say nothing about which thread answers: BM25 would weigh them little anyway,
# but each one in an OR query makes SQLite score every post that has it.
_STOPWORD_TEXT = """a about above after again all also am an and any are as at be because been before being
    below between both but by can could did do does doing don down during each few for from
    further get got had has have having he her here hers him his how i if in into is it its
    itself just like me more most my no nor not now of off on once only or other our out over
    own same she should so some such than that the their them then there these they this those
    through to too under until up very was we were what when where which while who whom why
    will with would you your yours anyone anybody someone thanks thank guys hey hi please
    know think want need really much many one get gets getting good best"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
MAX_TERMS = 24
CANDIDATES_PER_SLOT = 8
# BM25 scores every passage that has any of the query's words, ~1 µs each: a word in a third of
# a million-post forum costs a third of a second. The rarest words are the ones that find the
# thread, so a search keeps words, rarest first, while the passages they match stay within this
# budget (the rarest word is always kept). A forum under this size searches every word.
MATCH_BUDGET = 20_000
EXCERPT_CHARS = 220


class IndexUnavailable(CrawlError):
    """The store cannot be searched (missing, not a store, or not indexed yet)."""


@dataclass(frozen=True)
class Passage:
    """One reply that may answer the question, with where it was said.

    ``score`` is BM25's (higher is better; comparable within one search only).
    ``excerpt`` is the passage's sentences that share most words with the
    question: what a reader is shown when the answer itself is not enough.
    """

    post_id: str
    thread_id: str
    title: str
    text: str
    url: str
    thread_url: str
    author: str | None
    created: str | None
    score: float
    excerpt: str


def query_terms(text: str) -> list[str]:
    """The distinct words of ``text`` worth searching for, in order, at most ``MAX_TERMS``.

    Stopwords and single characters are left out: a height written 5'6 would
    otherwise rank a thread about 5-year-olds above the one about ski length.
    """
    terms: list[str] = []
    for word in WORD.findall(text.casefold()):
        if word in STOPWORDS or len(word) < 2 or word in terms:
            continue
        terms.append(word)
    return terms[:MAX_TERMS]


def match_expression(terms: Iterable[str]) -> str:
    """An FTS5 query matching any of ``terms``, each a quoted string (so never a syntax error)."""
    return " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)


def excerpt(text: str, question: str, max_chars: int = EXCERPT_CHARS) -> str:
    """What of ``text`` a reader is shown: all of it when it fits, else the sentences around
    the one that shares most words with ``question`` (the one before first: forum replies
    tend to put the plain answer first and the reasons after)."""
    if len(" ".join(text.split())) <= max_chars:
        return clip(text, max_chars)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]
    wanted = {_stem(w) for w in query_terms(question)}

    def overlap(sentence: str) -> int:
        return len(wanted & {_stem(w) for w in WORD.findall(sentence.casefold())})

    best = max(range(len(sentences)), key=lambda i: (overlap(sentences[i]), -i))
    first = last = best
    while True:  # grow the window a sentence at a time, earlier first, while it fits
        grown = False
        for candidate in (first - 1, last + 1):
            if 0 <= candidate < len(sentences):
                lo, hi = min(first, candidate), max(last, candidate)
                if len(" ".join(sentences[lo : hi + 1])) <= max_chars:
                    first, last, grown = lo, hi, True
        if not grown:
            break
    return clip(" ".join(sentences[first : last + 1]), max_chars)


def clip(text: str, max_chars: int) -> str:
    """``text`` cut at a word boundary to at most ``max_chars``, with an ellipsis if cut."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 1].rsplit(" ", 1)[0].rstrip(",;:-")
    return cut + "…"


def _stem(word: str) -> str:
    """Enough of a word to match its plural and -ing forms in an excerpt (not for ranking)."""
    return word[:5]


class Retriever:
    """Searches one forum store; safe to share between threads (one connection, one lock)."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        path: Path,
        *,
        copypasta_threads: int = 3,
        per_thread: int = 2,
    ) -> None:
        self._db = connection
        self._lock = threading.Lock()
        self.path = path
        self.copypasta_threads = copypasta_threads
        self.per_thread = per_thread
        # word -> passages having it, capped at the budget. A count gone stale as a crawl adds
        # posts only keeps a word that could have been dropped: slower, never wrong.
        self._frequency: dict[str, int] = {}

    @classmethod
    def open(cls, path: str | Path, **options: int) -> Retriever:
        """Open ``path`` read-only; raises :class:`IndexUnavailable` with the fix when it cannot."""
        path = Path(path)
        if not path.is_file():
            raise IndexUnavailable(
                f"no forum store at {path}: crawl one with `python -m crawl fetch --db {path}`"
            )
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout = 2000")  # a crawl's commit is a few ms
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        except sqlite3.Error as exc:
            raise IndexUnavailable(f"{path} is not a readable forum store ({exc})") from None
        if "passages" not in tables or "passage_index" not in tables:
            db.close()
            raise IndexUnavailable(
                f"{path} has no search index (an older store): run "
                f"`python -m crawl index --db {path}`"
            )
        return cls(db, path, **options)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def counts(self) -> dict[str, int]:
        """Passages and threads in the index, and threads whose posts are not indexed yet."""
        with self._lock:
            passages, threads = self._db.execute(
                "SELECT COUNT(*), COUNT(DISTINCT thread_id) FROM passages"
            ).fetchone()
            pending = self._db.execute("SELECT COUNT(*) FROM threads WHERE indexed = 0").fetchone()
        return {"passages": passages, "threads": threads, "pending_threads": pending[0]}

    def search(
        self,
        question: str,
        k: int,
        *,
        exclude_posts: Collection[str] = (),
        exclude_threads: Collection[str] = (),
        exclude_keys: Collection[bytes] = (),
    ) -> list[Passage]:
        """The ``k`` best passages for ``question``; fewer when fewer match, none for no words."""
        terms = query_terms(question)
        if k < 1 or not terms:
            return []
        limit = k * CANDIDATES_PER_SLOT + len(exclude_posts)
        with self._lock:
            try:
                terms = self._selective(terms)
                rows = self._db.execute(
                    # Ranked first, joined after: joining every match before the sort
                    # read each matching passage's row, more than scoring it cost.
                    """SELECT p.*, t.url AS thread_url, best.bm25
                       FROM (SELECT rowid, bm25(passage_index, 2.0, 1.0) AS bm25
                             FROM passage_index WHERE passage_index MATCH ?
                             ORDER BY bm25 LIMIT ?) AS best
                       JOIN passages p ON p.id = best.rowid
                       JOIN threads t ON t.id = p.thread_id
                       ORDER BY best.bm25""",
                    (match_expression(terms), limit),
                ).fetchall()
                spam = self._copypasta({row["text_key"] for row in rows})
            except sqlite3.OperationalError as exc:
                raise IndexUnavailable(f"cannot search {self.path} ({exc})") from None
        found: list[Passage] = []
        seen_keys: set[bytes] = set(exclude_keys)
        per_thread: dict[str, int] = {}
        for row in rows:
            key, thread_id = row["text_key"], row["thread_id"]
            if (
                row["post_id"] in exclude_posts
                or thread_id in exclude_threads
                or key in seen_keys
                or key in spam
                or per_thread.get(thread_id, 0) >= self.per_thread
            ):
                continue
            seen_keys.add(key)
            per_thread[thread_id] = per_thread.get(thread_id, 0) + 1
            found.append(
                Passage(
                    post_id=row["post_id"],
                    thread_id=thread_id,
                    title=row["title"],
                    text=row["text"],
                    url=row["url"],
                    thread_url=row["thread_url"],
                    author=row["author"],
                    created=row["created"],
                    score=round(-row["bm25"], 4),
                    excerpt=excerpt(row["text"], question),
                )
            )
            if len(found) == k:
                break
        return found

    def _selective(self, terms: list[str]) -> list[str]:
        """The rarest of ``terms`` whose passages together stay within ``MATCH_BUDGET``."""
        for term in terms:
            if term not in self._frequency:
                if len(self._frequency) >= 100_000:  # bounded memory; counting again is cheap
                    self._frequency.clear()
                self._frequency[term] = self._db.execute(
                    """SELECT COUNT(*) FROM (SELECT 1 FROM passage_index
                                             WHERE passage_index MATCH ? LIMIT ?)""",
                    (match_expression([term]), MATCH_BUDGET + 1),
                ).fetchone()[0]
        kept: list[str] = []
        matched = 0
        for term in sorted(terms, key=lambda t: (self._frequency[t], terms.index(t))):
            if kept and matched + self._frequency[term] > MATCH_BUDGET:
                break
            kept.append(term)
            matched += self._frequency[term]
        return kept

    def _copypasta(self, keys: set[bytes]) -> set[bytes]:
        """Of ``keys``, those whose text appears in ``copypasta_threads`` threads or more."""
        if not keys:
            return set()
        marks = ",".join("?" * len(keys))
        rows = self._db.execute(
            f"""SELECT text_key FROM post_keys WHERE text_key IN ({marks})
                GROUP BY text_key HAVING COUNT(DISTINCT thread_id) >= ?""",
            (*keys, self.copypasta_threads),
        )
        return {row[0] for row in rows}
