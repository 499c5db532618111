"""The feedback store: answers, 👍/👎 votes and base-vs-finetuned preferences in SQLite.

One file (``FEEDBACK_DB``, default ``data/feedback.sqlite``), created with its
schema on first use and opened in WAL mode, so the bot and the API process can
write to it at the same time and readers (``feedback export``) never wait for
a writer. Every method is blocking and thread-safe; the event loop uses it
through :class:`bot.feedback.aio.AsyncFeedbackStore`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bot.feedback.ids import (
    conversation_key,
    derive_key,
    hash_voter,
    load_or_create_salt,
    new_pair_id,
)
from bot.feedback.records import (
    CHOICES,
    RATINGS,
    AdapterRef,
    AnswerCounts,
    AnswerRecord,
    AnswerVote,
    Choice,
    FeedbackSummary,
    InvalidRecord,
    PairCounts,
    PairVote,
    Rating,
    StoredAnswer,
    StoredPair,
    UnknownAnswer,
    UnknownPair,
    check_id,
)

DEFAULT_FEEDBACK_DB = "data/feedback.sqlite"
SCHEMA_VERSION = 2  # 2: answers.sources

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    answer_id    TEXT PRIMARY KEY,
    created_at   REAL NOT NULL,
    source       TEXT NOT NULL,
    conversation TEXT NOT NULL,
    text         TEXT NOT NULL,
    variant      TEXT NOT NULL CHECK (variant IN ('base', 'finetuned')),
    model        TEXT NOT NULL,
    adapter_path TEXT,
    adapter_hash TEXT,
    settings     TEXT NOT NULL,
    pair_id      TEXT,
    thread_key   TEXT NOT NULL,
    sources      TEXT NOT NULL DEFAULT '[]'
);
CREATE UNIQUE INDEX IF NOT EXISTS answers_pair_variant ON answers (pair_id, variant)
    WHERE pair_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS answers_adapter ON answers (adapter_hash);
CREATE TABLE IF NOT EXISTS answer_votes (
    answer_id  TEXT NOT NULL REFERENCES answers (answer_id) ON DELETE CASCADE,
    voter      TEXT NOT NULL,
    rating     TEXT NOT NULL CHECK (rating IN ('up', 'down')),
    updated_at REAL NOT NULL,
    PRIMARY KEY (answer_id, voter)
);
CREATE TABLE IF NOT EXISTS pair_votes (
    pair_id    TEXT NOT NULL,
    voter      TEXT NOT NULL,
    choice     TEXT NOT NULL CHECK (choice IN ('base', 'finetuned', 'both_bad')),
    updated_at REAL NOT NULL,
    PRIMARY KEY (pair_id, voter)
);
"""


class FeedbackStore:
    """Blocking access to one feedback database; safe to share between threads.

    ``salt`` keys the voter hash; by default it is read from (or created in)
    ``<db>.salt`` beside the database, so every process using the same file
    hashes a voter the same way, and a copy of the database alone reveals no
    user ids. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        salt: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._salt = salt if salt is not None else load_or_create_salt(_salt_path(self.path))
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._tx() as db:
            db.executescript(SCHEMA)
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            _migrate(db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- recording -----------------------------------------------------------------

    def voter_hash(self, voter: str) -> str:
        """How ``voter`` (e.g. ``discord:1234``) is stored."""
        return hash_voter(voter, self._salt)

    def derived_key(self, purpose: str) -> bytes:
        """A secret of this store's own (e.g. to sign web voter ids), derived from its salt."""
        return derive_key(self._salt, purpose)

    def record_answer(self, record: AnswerRecord) -> str:
        """Store one answer; returns its id. Raises InvalidRecord for a bad or duplicate record."""
        with self._tx() as db:
            self._insert(db, record)
        return record.answer_id

    def record_pair(
        self, base: AnswerRecord, finetuned: AnswerRecord, pair_id: str | None = None
    ) -> str:
        """Store a ``/compare``'s two answers as one pair (one transaction); returns the pair id.

        The pair id is, in order: ``pair_id``, the records' own ``pair_id`` (they
        must agree), or a new one.
        """
        if base.variant != "base" or finetuned.variant != "finetuned":
            raise InvalidRecord("a pair is a base answer and a finetuned answer, in that order")
        chosen = pair_id or base.pair_id or finetuned.pair_id or new_pair_id()
        for record in (base, finetuned):
            if record.pair_id not in (None, chosen):
                raise InvalidRecord(
                    f"answer {record.answer_id} already names pair {record.pair_id}"
                )
        check_id(chosen, "pair_id")
        with self._tx() as db:
            for record in (base, finetuned):
                self._insert(db, record, pair_id=chosen)
        return chosen

    def pair_answers(
        self, base_answer_id: str, finetuned_answer_id: str, pair_id: str | None = None
    ) -> str:
        """Group two already recorded answers into a pair (the web page's two completions).

        Idempotent: pairing the same two answers again returns the same id.
        Raises UnknownAnswer, or InvalidRecord when the variants are wrong or
        either answer already belongs to another pair.
        """
        with self._tx() as db:
            rows = {
                answer_id: self._answer_row(db, answer_id)
                for answer_id in (base_answer_id, finetuned_answer_id)
            }
            base, finetuned = rows[base_answer_id], rows[finetuned_answer_id]
            if base["variant"] != "base" or finetuned["variant"] != "finetuned":
                raise InvalidRecord("a pair is a base answer and a finetuned answer, in that order")
            existing: set[str] = {base["pair_id"], finetuned["pair_id"]} - {None}
            if len(existing) > 1 or (existing and None in (base["pair_id"], finetuned["pair_id"])):
                raise InvalidRecord("one of these answers already belongs to another pair")
            if existing:
                (found,) = existing
                if pair_id is not None and pair_id != found:
                    raise InvalidRecord(f"these answers are already pair {found}")
                return found
            chosen = check_id(pair_id or new_pair_id(), "pair_id")
            try:
                db.execute(
                    "UPDATE answers SET pair_id = ? WHERE answer_id IN (?, ?)",
                    (chosen, base_answer_id, finetuned_answer_id),
                )
            except sqlite3.IntegrityError:
                raise InvalidRecord(f"pair {chosen} already exists") from None
            return chosen

    # ---- voting --------------------------------------------------------------------

    def vote_answer(self, answer_id: str, voter: str, rating: Rating) -> AnswerVote:
        """Record (or change) ``voter``'s 👍/👎 on one answer; returns the previous rating and counts.

        Raises UnknownAnswer if the answer is not stored, InvalidRecord for a bad rating.
        """
        if rating not in RATINGS:
            raise InvalidRecord(f"rating {rating!r} is not one of {', '.join(RATINGS)}")
        voter_hash = self.voter_hash(voter)
        with self._tx() as db:
            self._answer_row(db, answer_id)
            previous = db.execute(
                "SELECT rating FROM answer_votes WHERE answer_id = ? AND voter = ?",
                (answer_id, voter_hash),
            ).fetchone()
            db.execute(
                "INSERT INTO answer_votes (answer_id, voter, rating, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (answer_id, voter) DO UPDATE SET rating = excluded.rating,"
                " updated_at = excluded.updated_at",
                (answer_id, voter_hash, rating, self._clock()),
            )
            return AnswerVote(previous and previous["rating"], _answer_counts(db, answer_id))

    def vote_pair(self, pair_id: str, voter: str, choice: Choice) -> PairVote:
        """Record (or change) ``voter``'s preference on a pair; returns the previous choice and counts.

        Raises UnknownPair unless both answers of the pair are stored.
        """
        if choice not in CHOICES:
            raise InvalidRecord(f"choice {choice!r} is not one of {', '.join(CHOICES)}")
        voter_hash = self.voter_hash(voter)
        with self._tx() as db:
            (members,) = db.execute(
                "SELECT COUNT(*) FROM answers WHERE pair_id = ?", (pair_id,)
            ).fetchone()
            if members != 2:
                raise UnknownPair(f"no base/finetuned pair {pair_id!r} is stored")
            previous = db.execute(
                "SELECT choice FROM pair_votes WHERE pair_id = ? AND voter = ?",
                (pair_id, voter_hash),
            ).fetchone()
            db.execute(
                "INSERT INTO pair_votes (pair_id, voter, choice, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (pair_id, voter) DO UPDATE SET choice = excluded.choice,"
                " updated_at = excluded.updated_at",
                (pair_id, voter_hash, choice, self._clock()),
            )
            return PairVote(previous and previous["choice"], _pair_counts(db, pair_id))

    # ---- reading -------------------------------------------------------------------

    def answer_counts(self, answer_id: str) -> AnswerCounts:
        """Raises UnknownAnswer."""
        with self._tx() as db:
            self._answer_row(db, answer_id)
            return _answer_counts(db, answer_id)

    def pair_counts(self, pair_id: str) -> PairCounts:
        """Raises UnknownPair."""
        return self.get_pair(pair_id).counts

    def get_answer(self, answer_id: str) -> StoredAnswer:
        """Raises UnknownAnswer."""
        with self._tx() as db:
            return _stored(db, self._answer_row(db, answer_id))

    def get_pair(self, pair_id: str) -> StoredPair:
        """Raises UnknownPair."""
        with self._tx() as db:
            rows = db.execute("SELECT * FROM answers WHERE pair_id = ?", (pair_id,)).fetchall()
            by_variant = {row["variant"]: row for row in rows}
            if set(by_variant) != {"base", "finetuned"}:
                raise UnknownPair(f"no base/finetuned pair {pair_id!r} is stored")
            return StoredPair(
                pair_id,
                _stored(db, by_variant["base"]),
                _stored(db, by_variant["finetuned"]),
                _pair_counts(db, pair_id),
            )

    def answers(self, *, adapter_hash: str | None = None) -> list[StoredAnswer]:
        """Every stored answer (of one adapter, if given), oldest first, ties by id."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM answers WHERE ? IS NULL OR adapter_hash = ?"
                " ORDER BY created_at, answer_id",
                (adapter_hash, adapter_hash),
            ).fetchall()
            return [_stored(db, row) for row in rows]

    def pairs(self, *, adapter_hash: str | None = None) -> list[StoredPair]:
        """Every complete pair (whose finetuned answer came from that adapter, if given), oldest first."""
        with self._tx() as db:
            ids = [
                row["pair_id"]
                for row in db.execute(
                    "SELECT pair_id FROM answers WHERE pair_id IS NOT NULL"
                    " AND variant = 'finetuned' AND (? IS NULL OR adapter_hash = ?)"
                    " ORDER BY created_at, pair_id",
                    (adapter_hash, adapter_hash),
                )
            ]
        pairs = []
        for pair_id in ids:
            try:
                pairs.append(self.get_pair(pair_id))
            except UnknownPair:  # only the finetuned half was recorded
                continue
        return pairs

    def summary(self, adapter: AdapterRef | None = None) -> FeedbackSummary:
        """Vote counts and win rate for one adapter (matched by hash, or by path when unhashed); all when None."""
        args: tuple[str | None, ...]
        if adapter is None:
            where, args = "1", ()
        elif adapter.hash is not None:
            where, args = "a.adapter_hash = ?", (adapter.hash,)
        else:
            where, args = "a.adapter_hash IS NULL AND a.adapter_path IS ?", (adapter.path,)
        with self._tx() as db:
            (answers,) = db.execute(
                f"SELECT COUNT(*) FROM answers a WHERE {where}", args
            ).fetchone()
            ratings = dict(
                db.execute(
                    "SELECT v.rating, COUNT(*) FROM answer_votes v JOIN answers a USING (answer_id)"
                    f" WHERE {where} GROUP BY v.rating",
                    args,
                ).fetchall()
            )
            choices = dict(
                db.execute(
                    "SELECT v.choice, COUNT(*) FROM pair_votes v JOIN answers a"
                    f" ON a.pair_id = v.pair_id AND a.variant = 'finetuned' WHERE {where}"
                    " GROUP BY v.choice",
                    args,
                ).fetchall()
            )
            (pairs_voted,) = db.execute(
                "SELECT COUNT(DISTINCT v.pair_id) FROM pair_votes v JOIN answers a"
                f" ON a.pair_id = v.pair_id AND a.variant = 'finetuned' WHERE {where}",
                args,
            ).fetchone()
        return FeedbackSummary(
            answers=answers,
            up=ratings.get("up", 0),
            down=ratings.get("down", 0),
            pairs_voted=pairs_voted,
            base=choices.get("base", 0),
            finetuned=choices.get("finetuned", 0),
            both_bad=choices.get("both_bad", 0),
        )

    # ---- internals -----------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db:
            yield self._db

    def _insert(
        self, db: sqlite3.Connection, record: AnswerRecord, *, pair_id: str | None = None
    ) -> None:
        record.validate()
        conversation = [dict(m) for m in record.conversation]
        try:
            db.execute(
                "INSERT INTO answers (answer_id, created_at, source, conversation, text, variant,"
                " model, adapter_path, adapter_hash, settings, pair_id, thread_key, sources)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.answer_id,
                    self._clock(),
                    record.source,
                    json.dumps(conversation, ensure_ascii=False),
                    record.text,
                    record.variant,
                    record.model,
                    record.adapter.path,
                    record.adapter.hash,
                    json.dumps(dict(record.settings), ensure_ascii=False, sort_keys=True),
                    pair_id or record.pair_id,
                    record.thread_key or conversation_key(record.conversation),
                    json.dumps([dict(source) for source in record.sources], ensure_ascii=False),
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise InvalidRecord(
                f"answer {record.answer_id} (or its pair's {record.variant} answer) is already stored"
            ) from exc

    @staticmethod
    def _answer_row(db: sqlite3.Connection, answer_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = db.execute(
            "SELECT * FROM answers WHERE answer_id = ?", (answer_id,)
        ).fetchone()
        if row is None:
            raise UnknownAnswer(f"no answer {answer_id!r} is stored")
        return row


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a store written by an older version up to :data:`SCHEMA_VERSION`, in place."""
    columns = {row["name"] for row in db.execute("PRAGMA table_info(answers)")}
    if "sources" not in columns:  # version 1: answers recorded before grounding
        db.execute("ALTER TABLE answers ADD COLUMN sources TEXT NOT NULL DEFAULT '[]'")
    db.execute(
        "UPDATE meta SET value = ? WHERE key = 'schema_version' AND CAST(value AS INTEGER) < ?",
        (str(SCHEMA_VERSION), SCHEMA_VERSION),
    )


def feedback_db_from_env() -> Path | None:
    """``FEEDBACK_DB`` (default ``data/feedback.sqlite``); ``off`` or ``none`` turns feedback off."""
    from bot.serving.env import env_str

    value = env_str("FEEDBACK_DB", DEFAULT_FEEDBACK_DB) or DEFAULT_FEEDBACK_DB
    if value.lower() in ("off", "none", "false", "0"):
        return None
    return Path(value).expanduser()


def _salt_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".salt")


def _answer_counts(db: sqlite3.Connection, answer_id: str) -> AnswerCounts:
    rows: dict[str, Any] = dict(
        db.execute(
            "SELECT rating, COUNT(*) FROM answer_votes WHERE answer_id = ? GROUP BY rating",
            (answer_id,),
        ).fetchall()
    )
    return AnswerCounts(up=rows.get("up", 0), down=rows.get("down", 0))


def _pair_counts(db: sqlite3.Connection, pair_id: str) -> PairCounts:
    rows: dict[str, Any] = dict(
        db.execute(
            "SELECT choice, COUNT(*) FROM pair_votes WHERE pair_id = ? GROUP BY choice",
            (pair_id,),
        ).fetchall()
    )
    return PairCounts(
        base=rows.get("base", 0),
        finetuned=rows.get("finetuned", 0),
        both_bad=rows.get("both_bad", 0),
    )


def _stored(db: sqlite3.Connection, row: sqlite3.Row) -> StoredAnswer:
    return StoredAnswer(
        answer_id=row["answer_id"],
        created_at=row["created_at"],
        source=row["source"],
        conversation=json.loads(row["conversation"]),
        text=row["text"],
        variant=row["variant"],
        model=row["model"],
        adapter=AdapterRef(row["adapter_path"], row["adapter_hash"]),
        settings=json.loads(row["settings"]),
        pair_id=row["pair_id"],
        thread_key=row["thread_key"],
        counts=_answer_counts(db, row["answer_id"]),
        sources=json.loads(row["sources"]),
    )
