"""The feedback store: answers, 👍/👎 votes and pairwise preferences in SQLite.

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
    SIDES,
    VOTE_CHOICES,
    AdapterRef,
    AnswerCounts,
    AnswerRecord,
    AnswerVote,
    Choice,
    FeedbackSummary,
    InvalidRecord,
    ModelRef,
    ModelVotes,
    PairCounts,
    PairTally,
    PairVote,
    Rating,
    Side,
    StoredAnswer,
    StoredPair,
    UnknownAnswer,
    UnknownPair,
    UnusableStore,
    VoteChoice,
    check_id,
)

DEFAULT_FEEDBACK_DB = "data/feedback.sqlite"
SCHEMA_VERSION = 3  # 2: answers.sources; 3: any served name, pair sides, tie votes

# A served name is 1-32 of [a-z0-9._-] (records.NAME_PATTERN), checked here too so no
# writer can store what the leaderboard could not show.
_ANSWERS = """
CREATE TABLE answers (
    answer_id    TEXT PRIMARY KEY,
    created_at   REAL NOT NULL,
    source       TEXT NOT NULL,
    conversation TEXT NOT NULL,
    text         TEXT NOT NULL,
    variant      TEXT NOT NULL
        CHECK (length(variant) BETWEEN 1 AND 32 AND variant NOT GLOB '*[^a-z0-9._-]*'),
    model        TEXT NOT NULL,
    adapter_path TEXT,
    adapter_hash TEXT,
    settings     TEXT NOT NULL,
    pair_id      TEXT,
    pair_side    TEXT CHECK (pair_side IN ('a', 'b')),
    thread_key   TEXT NOT NULL,
    sources      TEXT NOT NULL DEFAULT '[]',
    CHECK ((pair_id IS NULL) = (pair_side IS NULL))
)"""
_PAIR_VOTES = """
CREATE TABLE pair_votes (
    pair_id    TEXT NOT NULL,
    voter      TEXT NOT NULL,
    choice     TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    updated_at REAL NOT NULL,
    PRIMARY KEY (pair_id, voter)
)"""
_INDEXES = (
    "CREATE UNIQUE INDEX answers_pair_side ON answers (pair_id, pair_side)"
    " WHERE pair_id IS NOT NULL",
    "CREATE INDEX answers_adapter ON answers (adapter_hash)",
)
SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    _ANSWERS,
    """
    CREATE TABLE answer_votes (
        answer_id  TEXT NOT NULL REFERENCES answers (answer_id) ON DELETE CASCADE,
        voter      TEXT NOT NULL,
        rating     TEXT NOT NULL CHECK (rating IN ('up', 'down')),
        updated_at REAL NOT NULL,
        PRIMARY KEY (answer_id, voter)
    )""",
    _PAIR_VOTES,
    *_INDEXES,
)
_COLUMNS_2 = (
    "answer_id, created_at, source, conversation, text, variant, model, adapter_path,"
    " adapter_hash, settings, pair_id, thread_key, sources"
)
# How to bring a store written by an older version up to this one, step by step. Each runs
# in the opening transaction with foreign keys off (3 rebuilds answers, which votes reference).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # Version 1 recorded answers before grounding: no sources.
    1: ("ALTER TABLE answers ADD COLUMN sources TEXT NOT NULL DEFAULT '[]'",),
    # Version 3 serves any name, not only base/finetuned; SQLite drops a CHECK only by
    # rebuilding the table. Every pair so far was base (shown first: side a) vs finetuned
    # (side b), and every pair vote named one of them.
    2: (
        _ANSWERS.replace("CREATE TABLE answers", "CREATE TABLE answers_3"),
        f"INSERT INTO answers_3 ({_COLUMNS_2}, pair_side) SELECT {_COLUMNS_2},"
        " CASE WHEN pair_id IS NULL THEN NULL WHEN variant = 'base' THEN 'a' ELSE 'b' END"
        " FROM answers",
        "DROP TABLE answers",
        "ALTER TABLE answers_3 RENAME TO answers",
        *_INDEXES,
        _PAIR_VOTES.replace("CREATE TABLE pair_votes", "CREATE TABLE pair_votes_3"),
        "INSERT INTO pair_votes_3 (pair_id, voter, choice, updated_at) SELECT pair_id, voter,"
        " CASE choice WHEN 'base' THEN 'a' WHEN 'finetuned' THEN 'b' ELSE choice END,"
        " updated_at FROM pair_votes",
        "DROP TABLE pair_votes",
        "ALTER TABLE pair_votes_3 RENAME TO pair_votes",
    ),
}
# The side each of the two names had in every pair before pairs recorded their sides.
_LEGACY_SIDES: dict[str, Side] = {"base": "a", "finetuned": "b"}


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
        try:
            _prepare(self._db, self.path)  # before foreign keys: a migration rebuilds tables
            self._db.execute("PRAGMA journal_mode=WAL")  # once it is ours to change
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
                exc,
                sqlite3.OperationalError,  # locked, unreadable: not the file's fault
            ):  # e.g. "file is not a database"
                raise UnusableStore(f"{self.path} is not a feedback store ({exc})") from None
            raise
        self._db.execute("PRAGMA foreign_keys=ON")

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

    def record_pair(self, a: AnswerRecord, b: AnswerRecord, pair_id: str | None = None) -> str:
        """Store a ``/compare``'s two answers as one pair (one transaction); returns the pair id.

        ``a`` is the side shown first (today's callers: base, then finetuned).
        The pair id is, in order: ``pair_id``, the records' own ``pair_id``
        (they must agree), or a new one. Raises InvalidRecord when both answers
        are from the same model.
        """
        _check_two_models(a.variant, b.variant)
        chosen = pair_id or a.pair_id or b.pair_id or new_pair_id()
        for record in (a, b):
            if record.pair_id not in (None, chosen):
                raise InvalidRecord(
                    f"answer {record.answer_id} already names pair {record.pair_id}"
                )
        check_id(chosen, "pair_id")
        with self._tx() as db:
            self._insert(db, a, pair_id=chosen, side="a")
            self._insert(db, b, pair_id=chosen, side="b")
        return chosen

    def pair_recorded(self, a_answer_id: str, b_answer_id: str, pair_id: str | None = None) -> str:
        """Group two already recorded answers into a pair, ``a`` shown first; returns its id.

        For answers streamed one by one (the web page's two completions).
        Idempotent: pairing the same two answers again, in the same order,
        returns the same id. Raises UnknownAnswer, or InvalidRecord when both
        are from one model or either already belongs to another pair.
        """
        with self._tx() as db:
            a, b = self._answer_row(db, a_answer_id), self._answer_row(db, b_answer_id)
            return self._pair_rows(db, a, b, pair_id)

    def pair_answers(
        self, base_answer_id: str, finetuned_answer_id: str, pair_id: str | None = None
    ) -> str:
        """:meth:`pair_recorded` for a base answer and a finetuned one, in that order.

        The web page's vote names its answers ``base_answer_id`` and
        ``finetuned_answer_id``; a swapped pair is refused (InvalidRecord),
        not silently recorded the other way round.
        """
        with self._tx() as db:
            base = self._answer_row(db, base_answer_id)
            finetuned = self._answer_row(db, finetuned_answer_id)
            if (base["variant"], finetuned["variant"]) != ("base", "finetuned"):
                raise InvalidRecord("a pair is a base answer and a finetuned answer, in that order")
            return self._pair_rows(db, base, finetuned, pair_id)

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

    def vote_pair(self, pair_id: str, voter: str, choice: VoteChoice) -> PairVote:
        """Record (or change) ``voter``'s preference on a pair; returns the previous choice and counts.

        ``choice`` is a side (``a``, ``b``), ``tie`` or ``both_bad``, or the
        name of one side's model among ``base`` and ``finetuned``, as voters
        said it before pairs had sides. On a base/finetuned pair the previous
        choice is said that way too, unless this vote named a side letter.
        Raises UnknownPair unless both answers of the pair are
        stored, InvalidRecord for a choice that names neither side.
        """
        if choice not in VOTE_CHOICES:
            raise InvalidRecord(f"choice {choice!r} is not one of {', '.join(VOTE_CHOICES)}")
        voter_hash = self.voter_hash(voter)
        with self._tx() as db:
            names = _side_names(db, pair_id)
            side = _side_of(choice, names)
            previous = db.execute(
                "SELECT choice FROM pair_votes WHERE pair_id = ? AND voter = ?",
                (pair_id, voter_hash),
            ).fetchone()
            db.execute(
                "INSERT INTO pair_votes (pair_id, voter, choice, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (pair_id, voter) DO UPDATE SET choice = excluded.choice,"
                " updated_at = excluded.updated_at",
                (pair_id, voter_hash, side, self._clock()),
            )
            said = previous and previous["choice"]
            if said in SIDES and choice not in SIDES and set(names.values()) == set(_LEGACY_SIDES):
                said = names[said]  # a base/finetuned pair's voters named sides by model
            return PairVote(said, _pair_counts(db, pair_id))

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
            by_side = {row["pair_side"]: row for row in rows}
            if set(by_side) != set(SIDES):
                raise UnknownPair(f"no pair {pair_id!r} is stored (or only one of its answers)")
            return StoredPair(
                pair_id,
                _stored(db, by_side["a"]),
                _stored(db, by_side["b"]),
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
        """Every complete pair (in which that adapter answered, if given), oldest first."""
        with self._tx() as db:
            ids = [
                row["pair_id"]
                for row in db.execute(
                    "SELECT pair_id, MIN(created_at) AS at FROM answers"
                    " WHERE pair_id IS NOT NULL AND (? IS NULL OR"
                    " (variant != 'base' AND adapter_hash = ?))"
                    " GROUP BY pair_id ORDER BY at, pair_id",
                    (adapter_hash, adapter_hash),
                )
            ]
        pairs = []
        for pair_id in ids:
            try:
                pairs.append(self.get_pair(pair_id))
            except UnknownPair:  # only one half was recorded
                continue
        return pairs

    def summary(self, adapter: AdapterRef | None = None) -> FeedbackSummary:
        """One adapter's answers, 👍/👎 and its votes against base; all adapters' when None.

        The adapter is matched by hash, or by path when unhashed; its pair
        votes are those of pairs between it and ``base``.
        """
        args: tuple[str | None, ...]
        if adapter is None:
            where, args = "1", ()
        elif adapter.hash is not None:
            where, args = "m.adapter_hash = ?", (adapter.hash,)
        else:
            where, args = "m.adapter_hash IS NULL AND m.adapter_path IS ?", (adapter.path,)
        with self._tx() as db:
            (answers,) = db.execute(
                f"SELECT COUNT(*) FROM answers m WHERE {where}", args
            ).fetchone()
            ratings = dict(
                db.execute(
                    "SELECT v.rating, COUNT(*) FROM answer_votes v JOIN answers m USING (answer_id)"
                    f" WHERE {where} GROUP BY v.rating",
                    args,
                ).fetchall()
            )
            against_base = (
                "FROM pair_votes v"
                " JOIN answers m ON m.pair_id = v.pair_id AND m.variant != 'base'"
                " JOIN answers o ON o.pair_id = v.pair_id AND o.pair_side != m.pair_side"
                f" AND o.variant = 'base' WHERE {where}"
            )
            outcomes = dict(
                db.execute(
                    "SELECT CASE v.choice WHEN m.pair_side THEN 'won' WHEN o.pair_side THEN 'lost'"
                    f" ELSE v.choice END AS outcome, COUNT(*) {against_base} GROUP BY outcome",
                    args,
                ).fetchall()
            )
            (pairs_voted,) = db.execute(
                f"SELECT COUNT(DISTINCT v.pair_id) {against_base}", args
            ).fetchone()
        return FeedbackSummary(
            answers=answers,
            up=ratings.get("up", 0),
            down=ratings.get("down", 0),
            pairs_voted=pairs_voted,
            base=outcomes.get("lost", 0),
            finetuned=outcomes.get("won", 0),
            both_bad=outcomes.get("both_bad", 0),
            tie=outcomes.get("tie", 0),
        )

    def leaderboard_counts(self) -> tuple[list[ModelVotes], list[PairTally]]:
        """What :mod:`bot.feedback.leaderboard` ranks, read in one transaction.

        Per model (name and weights): its answers and the 👍/👎 on them; and
        every pair vote, tallied per (side a's model, side b's model). ``base``
        is one model whatever adapter its process also served (answers recorded
        before several adapters were served carry that adapter's hash).
        """
        with self._tx() as db:
            return _model_votes(db), _pair_tallies(db)

    # ---- internals -----------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db:
            yield self._db

    def _insert(
        self,
        db: sqlite3.Connection,
        record: AnswerRecord,
        *,
        pair_id: str | None = None,
        side: Side | None = None,
    ) -> None:
        record.validate()
        conversation = [dict(m) for m in record.conversation]
        pair_id = pair_id or record.pair_id
        if pair_id is not None and side is None:  # a half recorded alone: base or finetuned
            if record.variant not in _LEGACY_SIDES:
                raise InvalidRecord(
                    f"answer {record.answer_id}: record a {record.variant!r} answer's pair"
                    " with record_pair, which says its side"
                )
            side = _LEGACY_SIDES[record.variant]
        try:
            db.execute(
                "INSERT INTO answers (answer_id, created_at, source, conversation, text, variant,"
                " model, adapter_path, adapter_hash, settings, pair_id, pair_side, thread_key,"
                " sources) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    pair_id,
                    side if pair_id is not None else None,
                    record.thread_key or conversation_key(record.conversation),
                    json.dumps([dict(source) for source in record.sources], ensure_ascii=False),
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise InvalidRecord(
                f"answer {record.answer_id} (or its pair's side {side}) is already stored"
            ) from exc

    @staticmethod
    def _pair_rows(
        db: sqlite3.Connection, a: sqlite3.Row, b: sqlite3.Row, pair_id: str | None
    ) -> str:
        _check_two_models(a["variant"], b["variant"])
        existing: set[str] = {a["pair_id"], b["pair_id"]} - {None}
        if len(existing) > 1 or (existing and None in (a["pair_id"], b["pair_id"])):
            raise InvalidRecord("one of these answers already belongs to another pair")
        if existing:
            (found,) = existing
            if (a["pair_side"], b["pair_side"]) != ("a", "b"):
                raise InvalidRecord(f"these answers are already pair {found}, the other way round")
            if pair_id is not None and pair_id != found:
                raise InvalidRecord(f"these answers are already pair {found}")
            return found
        chosen = check_id(pair_id or new_pair_id(), "pair_id")
        try:
            for row, side in ((a, "a"), (b, "b")):
                db.execute(
                    "UPDATE answers SET pair_id = ?, pair_side = ? WHERE answer_id = ?",
                    (chosen, side, row["answer_id"]),
                )
        except sqlite3.IntegrityError:
            raise InvalidRecord(f"pair {chosen} already exists") from None
        return chosen

    @staticmethod
    def _answer_row(db: sqlite3.Connection, answer_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = db.execute(
            "SELECT * FROM answers WHERE answer_id = ?", (answer_id,)
        ).fetchone()
        if row is None:
            raise UnknownAnswer(f"no answer {answer_id!r} is stored")
        return row


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    """Create the schema in a new file, or bring an older store up to :data:`SCHEMA_VERSION`.

    One immediate transaction, so of two processes opening the same file at
    once the second waits and finds the work done, and a failed migration
    leaves the store as it was.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        tables = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not tables:
            for statement in SCHEMA:
                db.execute(statement)
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif not {"meta", "answers", "answer_votes", "pair_votes"} <= tables:
            raise UnusableStore(
                f"{path} is not a feedback store (it holds {', '.join(sorted(tables))})"
            )
        else:
            _migrate(db, path)
        db.commit()
    except BaseException:
        db.rollback()
        raise


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = int(row[0]) if row is not None and str(row[0]).isdigit() else 1
    if version > SCHEMA_VERSION:
        raise UnusableStore(
            f"{path} was written by a newer version of the bot (feedback schema {version}, "
            f"this one reads {SCHEMA_VERSION}): upgrade the bot to read it"
        )
    if version == SCHEMA_VERSION:
        return
    for step in range(version, SCHEMA_VERSION):
        for statement in MIGRATIONS[step]:
            db.execute(statement)
    if db.execute("PRAGMA foreign_key_check").fetchone() is not None:
        raise UnusableStore(
            f"{path}: migrating the feedback store would orphan votes; left as it was"
        )
    db.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
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
        a=rows.get("a", 0),
        b=rows.get("b", 0),
        both_bad=rows.get("both_bad", 0),
        tie=rows.get("tie", 0),
    )


def _weights(table: str) -> str:
    """An answer's weights as the leaderboard tells models apart: none for base."""
    return f"CASE WHEN {table}.variant = 'base' THEN NULL ELSE {table}.adapter_hash END"


def _model_votes(db: sqlite3.Connection) -> list[ModelVotes]:
    rows = db.execute(
        f"SELECT a.variant AS name, {_weights('a')} AS weights, COUNT(*) AS answers,"
        " COALESCE(SUM(v.up), 0) AS up, COALESCE(SUM(v.down), 0) AS down"
        " FROM answers a LEFT JOIN (SELECT answer_id, SUM(rating = 'up') AS up,"
        " SUM(rating = 'down') AS down FROM answer_votes GROUP BY answer_id) v"
        " USING (answer_id) GROUP BY name, weights ORDER BY name, weights"
    ).fetchall()
    return [
        ModelVotes(ModelRef(row["name"], row["weights"]), row["answers"], row["up"], row["down"])
        for row in rows
    ]


def _pair_tallies(db: sqlite3.Connection) -> list[PairTally]:
    rows = db.execute(
        f"SELECT x.variant AS a_name, {_weights('x')} AS a_weights, y.variant AS b_name,"
        f" {_weights('y')} AS b_weights, SUM(v.choice = 'a') AS a_wins,"
        " SUM(v.choice = 'b') AS b_wins, SUM(v.choice = 'tie') AS ties,"
        " SUM(v.choice = 'both_bad') AS both_bad FROM pair_votes v"
        " JOIN answers x ON x.pair_id = v.pair_id AND x.pair_side = 'a'"
        " JOIN answers y ON y.pair_id = v.pair_id AND y.pair_side = 'b'"
        " GROUP BY a_name, a_weights, b_name, b_weights"
        " ORDER BY a_name, a_weights, b_name, b_weights"
    ).fetchall()
    return [
        PairTally(
            ModelRef(row["a_name"], row["a_weights"]),
            ModelRef(row["b_name"], row["b_weights"]),
            row["a_wins"],
            row["b_wins"],
            row["ties"],
            row["both_bad"],
        )
        for row in rows
    ]


def _check_two_models(a: str, b: str) -> None:
    if a == b:
        raise InvalidRecord(f"a pair compares two models; both answers are from {a!r}")


def _side_names(db: sqlite3.Connection, pair_id: str) -> dict[Side, str]:
    names: dict[Side, str] = {
        row["pair_side"]: row["variant"]
        for row in db.execute(
            "SELECT pair_side, variant FROM answers WHERE pair_id = ?", (pair_id,)
        )
    }
    if set(names) != set(SIDES):
        raise UnknownPair(f"no pair {pair_id!r} is stored (or only one of its answers)")
    return names


def _side_of(choice: VoteChoice, names: dict[Side, str]) -> Choice:
    """What a vote stores: ``choice`` itself, or the side whose model it names."""
    if choice in CHOICES:
        return choice
    for side, name in names.items():
        if name == choice:
            return side
    raise InvalidRecord(
        f"choice {choice!r} names neither model of this pair ({names['a']} vs {names['b']}):"
        " vote a, b, tie or both_bad"
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
