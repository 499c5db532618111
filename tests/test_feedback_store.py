"""The feedback store against a real SQLite file: records, votes, counts, pairs, restarts."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from bot.feedback.aio import AsyncFeedbackStore
from bot.feedback.ids import adapter_weights_hash, hash_voter
from bot.feedback.records import (
    AdapterRef,
    AnswerCounts,
    AnswerRecord,
    InvalidRecord,
    PairCounts,
    UnknownAnswer,
    UnknownPair,
)
from bot.feedback.store import FeedbackStore

ADAPTER = AdapterRef("runs/a/adapter", "aaaa1111")
QUESTION = [{"role": "user", "content": "Best wax for spring slush?"}]


def record(variant: str = "finetuned", text: str = "Warm-temperature wax.", **kw) -> AnswerRecord:
    kw.setdefault("adapter", ADAPTER)
    return AnswerRecord(
        conversation=kw.pop("conversation", QUESTION),
        text=text,
        variant=variant,  # type: ignore[arg-type]
        model="tiny",
        source="discord",
        settings={"temperature": 0.7, "max_new_tokens": 64},
        **kw,
    )


@pytest.fixture
def store(tmp_path: Path) -> FeedbackStore:
    with FeedbackStore(tmp_path / "sub" / "feedback.sqlite") as opened:
        yield opened


def test_created_on_first_use_in_wal_mode_with_a_private_salt(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "feedback.sqlite"
    FeedbackStore(path).close()
    assert path.is_file()
    salt = path.with_name("feedback.sqlite.salt")
    assert salt.stat().st_mode & 0o077 == 0
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_two_processes_creating_the_salt_at_once_end_with_the_same_one(tmp_path, monkeypatch):
    """The bot and the API starting together: the first one is still writing its salt
    (held inside token_bytes here) while the second finds the file and reads it."""
    from bot.feedback import ids

    path = tmp_path / "feedback.sqlite.salt"
    second_done = threading.Event()
    real_token_bytes = ids.secrets.token_bytes
    calls: list[int] = []

    def token_bytes(n: int) -> bytes:
        calls.append(n)
        if len(calls) == 1:  # the first starter stalls mid-creation until the second finished
            second_done.wait(timeout=10)
        return real_token_bytes(n)

    monkeypatch.setattr(ids.secrets, "token_bytes", token_bytes)
    results: dict[str, bytes | Exception] = {}

    def start(name: str) -> None:
        try:
            results[name] = ids.load_or_create_salt(path)
        except Exception as exc:  # the test reports what the loser saw
            results[name] = exc
        if name == "second":
            second_done.set()

    first = threading.Thread(target=start, args=("first",))
    first.start()
    while not calls:  # the first starter is inside its creation
        threading.Event().wait(0.01)
    start("second")
    first.join(timeout=20)

    assert not isinstance(results["second"], Exception), results["second"]
    assert results["first"] == results["second"] == bytes.fromhex(path.read_text())
    assert len(results["first"]) == ids.SALT_BYTES
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no staged file left behind
    assert path.stat().st_mode & 0o077 == 0


def test_answer_round_trips_with_everything_needed_to_learn_from_it(store: FeedbackStore) -> None:
    answer_id = store.record_answer(record(thread_key="thread-9"))
    stored = store.get_answer(answer_id)
    assert stored.conversation == QUESTION
    assert (stored.text, stored.variant, stored.model, stored.source) == (
        "Warm-temperature wax.",
        "finetuned",
        "tiny",
        "discord",
    )
    assert stored.adapter == ADAPTER
    assert stored.settings == {"temperature": 0.7, "max_new_tokens": 64}
    assert stored.thread_key == "thread-9"
    assert stored.counts == AnswerCounts(0, 0)


def test_one_vote_per_voter_per_answer_and_it_can_change(store: FeedbackStore) -> None:
    answer_id = store.record_answer(record())
    first = store.vote_answer(answer_id, "discord:1", "up")
    assert first.previous is None and first.counts == AnswerCounts(up=1, down=0)
    assert store.vote_answer(answer_id, "discord:1", "up").counts == AnswerCounts(1, 0)
    changed = store.vote_answer(answer_id, "discord:1", "down")
    assert changed.previous == "up" and changed.counts == AnswerCounts(0, 1)
    assert store.vote_answer(answer_id, "discord:2", "up").counts == AnswerCounts(1, 1)


def test_voters_are_stored_only_as_salted_hashes(tmp_path: Path) -> None:
    path = tmp_path / "feedback.sqlite"
    with FeedbackStore(path) as store:
        answer_id = store.record_answer(record())
        store.vote_answer(answer_id, "discord:424242424242", "up")
        stored_hash = store.voter_hash("discord:424242424242")
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("feedback"))
    assert b"424242424242" not in raw
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT voter FROM answer_votes").fetchone()[0] == stored_hash
    assert stored_hash != hash_voter("discord:424242424242", b"another salt....")
    with FeedbackStore(path) as reopened:  # the salt file makes the hash stable across restarts
        assert reopened.voter_hash("discord:424242424242") == stored_hash


def test_votes_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "feedback.sqlite"
    with FeedbackStore(path) as store:
        answer_id = store.record_answer(record())
        store.vote_answer(answer_id, "discord:1", "up")
    with FeedbackStore(path) as store:
        assert store.vote_answer(answer_id, "discord:1", "down").previous == "up"
        assert store.answer_counts(answer_id) == AnswerCounts(0, 1)


def test_unknown_answers_and_pairs_raise(store: FeedbackStore) -> None:
    with pytest.raises(UnknownAnswer):
        store.vote_answer("a-missing", "discord:1", "up")
    with pytest.raises(UnknownPair):
        store.vote_pair("p-missing", "discord:1", "base")
    half = store.record_answer(record(pair_id="p-half"))
    assert store.get_answer(half).pair_id == "p-half"
    with pytest.raises(UnknownPair):  # only one half of the pair was recorded
        store.vote_pair("p-half", "discord:1", "base")


def test_bad_values_are_refused(store: FeedbackStore) -> None:
    for name in ("V2", "v 2", "", "x" * 33, "v2/../base"):
        with pytest.raises(InvalidRecord, match=r"variant .* is not a model name"):
            store.record_answer(record(variant=name))
    with pytest.raises(InvalidRecord, match="answer_id"):
        store.record_answer(record(answer_id="has:colon"))
    with pytest.raises(InvalidRecord, match="end with the user"):
        store.record_answer(record(conversation=[{"role": "assistant", "content": "x"}]))
    answer_id = store.record_answer(record())
    with pytest.raises(InvalidRecord, match="already stored"):
        store.record_answer(record(answer_id=answer_id))
    with pytest.raises(InvalidRecord, match="rating"):
        store.vote_answer(answer_id, "discord:1", "sideways")  # type: ignore[arg-type]


def test_compare_pair_votes_and_summary_win_rate(store: FeedbackStore) -> None:
    pair_id = store.record_pair(record("base", "Any wax."), record("finetuned", "Warm wax."))
    pair = store.get_pair(pair_id)
    assert (pair.base.text, pair.finetuned.text) == ("Any wax.", "Warm wax.")
    store.vote_pair(pair_id, "discord:1", "finetuned")
    store.vote_pair(pair_id, "discord:2", "finetuned")
    store.vote_pair(pair_id, "discord:3", "base")
    outcome = store.vote_pair(pair_id, "discord:4", "both_bad")
    assert outcome.counts == PairCounts(base=1, finetuned=2, both_bad=1)
    changed = store.vote_pair(pair_id, "discord:3", "finetuned")
    assert changed.previous == "base" and changed.counts == PairCounts(0, 3, 1)

    other = AdapterRef("runs/b/adapter", "bbbb2222")
    old = store.record_pair(record("base", adapter=other), record("finetuned", adapter=other))
    store.vote_pair(old, "discord:1", "base")
    store.vote_answer(store.record_answer(record(adapter=other)), "discord:1", "up")

    current = store.summary(ADAPTER)
    assert (current.base, current.finetuned, current.both_bad) == (0, 3, 1)
    assert current.win_rate == 1.0 and current.decided == 3 and current.pairs_voted == 1
    assert (current.up, current.down) == (0, 0)
    everything = store.summary()
    assert everything.decided == 4 and everything.win_rate == pytest.approx(0.75)
    assert (everything.up, everything.pairs_voted, everything.answers) == (1, 2, 5)
    assert [p.pair_id for p in store.pairs(adapter_hash="bbbb2222")] == [old]


def test_web_answers_paired_after_the_fact(store: FeedbackStore) -> None:
    base = store.record_answer(record("base", answer_id="chatcmpl-1"))
    fine = store.record_answer(record("finetuned", answer_id="chatcmpl-2"))
    pair_id = store.pair_answers(base, fine)
    assert store.pair_answers(base, fine) == pair_id  # idempotent
    assert store.vote_pair(pair_id, "web:s1", "finetuned").counts == PairCounts(0, 1, 0)
    third = store.record_answer(record("finetuned", answer_id="chatcmpl-3"))
    with pytest.raises(InvalidRecord, match="another pair"):
        store.pair_answers(base, third)
    with pytest.raises(InvalidRecord, match="base answer and a finetuned"):
        store.pair_answers(third, base)


def test_adapter_hash_follows_the_weights(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert adapter_weights_hash(adapter) is None
    (adapter / "adapter_model.safetensors").write_bytes(b"weights v1")
    first = AdapterRef.from_path(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights v2")
    second = AdapterRef.from_path(adapter)
    assert first.path == second.path == str(adapter)
    assert first.hash and second.hash and first.hash != second.hash
    assert AdapterRef.from_path(None) == AdapterRef()


def test_writes_from_many_threads_all_land(store: FeedbackStore) -> None:
    answer_id = store.record_answer(record())

    def vote(n: int) -> None:
        store.vote_answer(answer_id, f"discord:{n}", "up" if n % 2 else "down")

    threads = [threading.Thread(target=vote, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.answer_counts(answer_id) == AnswerCounts(up=10, down=10)


async def test_async_store_keeps_order_and_never_blocks_the_loop(tmp_path: Path) -> None:
    store = await AsyncFeedbackStore.open(tmp_path / "feedback.sqlite")
    loop_thread = threading.get_ident()
    seen: list[int] = []
    original = store.store.record_answer

    def spy(rec: AnswerRecord) -> str:
        seen.append(threading.get_ident())
        return original(rec)

    store.store.record_answer = spy  # type: ignore[method-assign]
    rec = record()
    store.record_answer_soon(rec)  # queued, not awaited …
    vote = await store.vote_answer(rec.answer_id, "discord:1", "up")  # … yet lands first
    assert vote.counts == AnswerCounts(1, 0)
    assert seen and loop_thread not in seen
    pair_id = await store.record_pair(record("base"), record("finetuned"))
    assert (await store.vote_pair(pair_id, "discord:1", "base")).counts == PairCounts(1, 0, 0)
    assert (await store.summary(ADAPTER)).decided == 1
    with pytest.raises(UnknownAnswer):
        await store.vote_answer("a-gone", "discord:1", "up")
    await store.close()
    assert asyncio.get_running_loop().is_running()


def test_metrics_export_the_current_adapters_votes(store: FeedbackStore) -> None:
    from prometheus_client import generate_latest

    from bot.feedback import metrics

    pair_id = store.record_pair(record("base"), record("finetuned"))
    for n, choice in enumerate(("finetuned", "finetuned", "finetuned", "base")):
        store.vote_pair(pair_id, f"discord:{n}", choice)  # type: ignore[arg-type]
    metrics.publish(store.summary(ADAPTER))
    text = generate_latest().decode()
    assert "freeski_feedback_win_rate 0.75" in text
    assert "freeski_feedback_decided_votes 4.0" in text
    assert 'freeski_feedback_votes{kind="finetuned"} 3.0' in text


def test_feedback_db_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.feedback.store import feedback_db_from_env

    monkeypatch.delenv("FEEDBACK_DB", raising=False)
    assert feedback_db_from_env() == Path("data/feedback.sqlite")
    monkeypatch.setenv("FEEDBACK_DB", "~/votes.sqlite")
    assert feedback_db_from_env() == Path("~/votes.sqlite").expanduser()
    monkeypatch.setenv("FEEDBACK_DB", "off")
    assert feedback_db_from_env() is None


# ---- several adapters: any two served names in a pair ----------------------------------

V1 = AdapterRef("runs/v1/adapter", "1111aaaa")
V2 = AdapterRef("runs/v2/adapter", "2222bbbb")


def test_a_pair_is_any_two_served_models_and_a_vote_picks_a_side_a_tie_or_both_bad(
    store: FeedbackStore,
) -> None:
    pair_id = store.record_pair(
        record("v1", "Narrow waist.", adapter=V1), record("v2", "Soft flex.", adapter=V2)
    )
    pair = store.get_pair(pair_id)
    assert (pair.a.variant, pair.a.adapter, pair.b.variant, pair.b.adapter) == ("v1", V1, "v2", V2)
    for voter, choice in enumerate(("a", "b", "b", "tie", "both_bad")):
        outcome = store.vote_pair(pair_id, f"discord:{voter}", choice)  # type: ignore[arg-type]
    assert outcome.counts == PairCounts(a=1, b=2, both_bad=1, tie=1)
    assert store.vote_pair(pair_id, "discord:3", "a").previous == "tie"
    with pytest.raises(InvalidRecord, match="names neither model of this pair"):
        store.vote_pair(pair_id, "discord:9", "base")  # neither side is base
    with pytest.raises(InvalidRecord, match="choice"):
        store.vote_pair(pair_id, "discord:9", "v1")  # type: ignore[arg-type]
    with pytest.raises(InvalidRecord, match="two models"):
        store.record_pair(record("v1", adapter=V1), record("v1", adapter=V1))


def test_base_and_finetuned_votes_resolve_to_their_side_whichever_it_is(
    store: FeedbackStore,
) -> None:
    """Today's buttons say base / finetuned; the store keeps sides, and answers in their words."""
    shown_first = store.record_pair(record("finetuned"), record("base", "Any wax."))
    first = store.vote_pair(shown_first, "discord:1", "base")
    assert first.counts == PairCounts(a=0, b=1)  # base was side b here
    again = store.vote_pair(shown_first, "discord:1", "finetuned")
    assert (again.previous, again.counts) == ("base", PairCounts(a=1, b=0))
    today = store.record_pair(record("base", "Any wax."), record("finetuned"))
    store.vote_pair(today, "discord:1", "finetuned")
    counts = store.vote_pair(today, "discord:2", "both_bad").counts
    assert (counts.base, counts.finetuned, counts.both_bad) == (0, 1, 1)
    assert store.get_pair(today).finetuned.variant == "finetuned"


def test_answers_streamed_one_by_one_are_paired_as_shown(store: FeedbackStore) -> None:
    v2 = store.record_answer(record("v2", adapter=V2, answer_id="chatcmpl-v2"))
    base = store.record_answer(record("base", "Any wax.", answer_id="chatcmpl-base"))
    pair_id = store.pair_recorded(v2, base)
    assert store.pair_recorded(v2, base) == pair_id  # idempotent
    with pytest.raises(InvalidRecord, match="other way round"):
        store.pair_recorded(base, v2)
    pair = store.get_pair(pair_id)
    assert (pair.a.answer_id, pair.b.answer_id) == (v2, base)
    with pytest.raises(InvalidRecord, match="base answer and a finetuned"):
        store.pair_answers(v2, base)  # the web page's base/finetuned body stays strict


def test_summary_counts_an_adapters_votes_against_base_with_ties_as_half(
    store: FeedbackStore,
) -> None:
    versus_base = store.record_pair(
        record("base", "Any wax.", adapter=V2), record("v2", adapter=V2)
    )
    for voter, choice in enumerate(("b", "b", "a", "tie", "both_bad")):
        store.vote_pair(versus_base, f"discord:{voter}", choice)  # type: ignore[arg-type]
    versus_v1 = store.record_pair(record("v1", adapter=V1), record("v2", adapter=V2))
    store.vote_pair(versus_v1, "discord:1", "b")  # not a vote against base
    summary = store.summary(V2)
    assert (summary.finetuned, summary.base, summary.tie, summary.both_bad) == (2, 1, 1, 1)
    assert summary.decided == 4 and summary.win_rate == pytest.approx(2.5 / 4)
    assert summary.pairs_voted == 1
    assert store.summary(V1).decided == 0
    assert [p.pair_id for p in store.pairs(adapter_hash=V1.hash)] == [versus_v1]


def test_the_schema_checks_served_names_and_sides_itself(store: FeedbackStore) -> None:
    """A writer that skips AnswerRecord.validate still cannot store a name the board can't show."""
    db = sqlite3.connect(store.path)
    columns = (
        "answer_id, created_at, source, conversation, text, variant, model, settings, thread_key"
    )
    with pytest.raises(sqlite3.IntegrityError):
        db.execute(
            f"INSERT INTO answers ({columns}) VALUES ('x', 0, 'api', '[]', '', 'V2!', 'm', '{{}}', 't')"
        )
    with pytest.raises(sqlite3.IntegrityError):  # a pair id needs a side
        db.execute(
            f"INSERT INTO answers ({columns}, pair_id) VALUES"
            " ('x', 0, 'api', '[]', '', 'v2', 'm', '{}', 't', 'p-1')"
        )
    db.close()


def test_an_answer_is_recorded_under_the_adapter_that_wrote_it() -> None:
    """``finetuned`` resolves to the adapter behind it; base keeps the process's stamp."""
    from bot.feedback.provenance import Provenance
    from bot.serving.adapters import ServedAdapter
    from bot.serving.engine import Answer

    provenance = Provenance("tiny", ADAPTER)
    served = ServedAdapter("v2", "runs/v2/adapter", "2222bbbb")
    record = provenance.of_answer(QUESTION, Answer("x", "finetuned", adapter=served), "api")
    assert (record.variant, record.adapter) == ("v2", V2)
    base = provenance.of_answer(QUESTION, Answer("x", "base"), "api")
    assert (base.variant, base.adapter) == ("base", ADAPTER)  # as before several adapters
    unhashed = ServedAdapter("v2", "v2")  # an OpenAI server's adapter: no weights to hash here
    remote = provenance.of_answer(QUESTION, Answer("x", "v2", adapter=unhashed), "api")
    assert remote.adapter == ADAPTER  # the local copy hashed at start


# ---- schema 2 → 3 -------------------------------------------------------------------------

# The store as version 2 wrote it, with a /compare pair, its votes and a rated answer.
SCHEMA_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE answers (
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
CREATE UNIQUE INDEX answers_pair_variant ON answers (pair_id, variant)
    WHERE pair_id IS NOT NULL;
CREATE INDEX answers_adapter ON answers (adapter_hash);
CREATE TABLE answer_votes (
    answer_id  TEXT NOT NULL REFERENCES answers (answer_id) ON DELETE CASCADE,
    voter      TEXT NOT NULL,
    rating     TEXT NOT NULL CHECK (rating IN ('up', 'down')),
    updated_at REAL NOT NULL,
    PRIMARY KEY (answer_id, voter)
);
CREATE TABLE pair_votes (
    pair_id    TEXT NOT NULL,
    voter      TEXT NOT NULL,
    choice     TEXT NOT NULL CHECK (choice IN ('base', 'finetuned', 'both_bad')),
    updated_at REAL NOT NULL,
    PRIMARY KEY (pair_id, voter)
);
INSERT INTO meta VALUES ('schema_version', '2');
INSERT INTO answers VALUES
    ('a-base', 1, 'discord', '[{"role": "user", "content": "wax?"}]', 'Any wax.', 'base',
     'tiny', 'runs/a/adapter', 'aaaa1111', '{}', 'p-old', 't', '[]'),
    ('a-fine', 1, 'discord', '[{"role": "user", "content": "wax?"}]', 'Warm wax.', 'finetuned',
     'tiny', 'runs/a/adapter', 'aaaa1111', '{}', 'p-old', 't', '[]'),
    ('a-solo', 2, 'api', '[{"role": "user", "content": "skins?"}]', 'Nylon.', 'finetuned',
     'tiny', 'runs/a/adapter', 'aaaa1111', '{}', NULL, 'u', '[]');
INSERT INTO pair_votes VALUES ('p-old', 'v1', 'finetuned', 1), ('p-old', 'v2', 'finetuned', 1),
    ('p-old', 'v3', 'base', 1), ('p-old', 'v4', 'both_bad', 1);
INSERT INTO answer_votes VALUES ('a-solo', 'v1', 'up', 2), ('a-fine', 'v2', 'down', 2);
"""


SALT = b"schema two salt."


def schema_2_store(path: Path) -> Path:
    """SCHEMA_2 with its voters v1..v4 stored as version 2 stored them: hashed with SALT."""
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_2)
        for table in ("pair_votes", "answer_votes"):
            for n in range(1, 5):
                db.execute(
                    f"UPDATE {table} SET voter = ? WHERE voter = ?",
                    (hash_voter(f"discord:{n}", SALT), f"v{n}"),
                )
    db.close()
    return path


def test_a_schema_2_store_is_migrated_with_every_vote_kept(tmp_path: Path) -> None:
    path = schema_2_store(tmp_path / "feedback.sqlite")
    with FeedbackStore(path, salt=SALT) as store:
        old = store.get_pair("p-old")
        assert (old.a.answer_id, old.b.answer_id) == ("a-base", "a-fine")
        assert old.counts == PairCounts(base=1, finetuned=2, both_bad=1)
        assert store.answer_counts("a-solo") == AnswerCounts(up=1, down=0)
        assert store.answer_counts("a-fine") == AnswerCounts(up=0, down=1)  # not cascaded away
        # Today's Discord buttons on that old message still count, in their own words.
        changed = store.vote_pair("p-old", "discord:3", "finetuned")
        assert changed.previous == "base" and changed.counts == PairCounts(0, 3, 1)
        assert store.summary(ADAPTER).win_rate == 1.0
        # And the migrated store takes what version 2 refused.
        pair_id = store.record_pair(record("base"), record("v2", adapter=V2))
        store.vote_pair(pair_id, "discord:1", "tie")
    with sqlite3.connect(path) as db:
        (version,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        indexes = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
    db.close()
    assert version == "3"
    assert {"answers_pair_side", "answers_adapter"} <= indexes
    assert "answers_pair_variant" not in indexes


def test_a_failed_migration_leaves_the_store_as_it_was(tmp_path: Path, monkeypatch) -> None:
    from bot.feedback import store as store_module

    path = schema_2_store(tmp_path / "feedback.sqlite")
    steps = store_module.MIGRATIONS[2]
    monkeypatch.setitem(store_module.MIGRATIONS, 2, (*steps[:-1], "SELECT no_such_function()"))
    with pytest.raises(sqlite3.OperationalError):
        FeedbackStore(path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta").fetchone() == ("2",)
        assert db.execute(
            "SELECT COUNT(*) FROM pair_votes WHERE choice = 'finetuned'"
        ).fetchone() == (2,)
        assert db.execute("SELECT COUNT(*) FROM answer_votes").fetchone() == (2,)
    db.close()
    monkeypatch.undo()
    with FeedbackStore(path) as store:  # and the next start migrates it
        assert store.get_pair("p-old").counts.finetuned == 2


def test_a_store_from_a_newer_bot_is_refused_in_one_line(tmp_path: Path) -> None:
    from bot.feedback.records import UnusableStore

    path = tmp_path / "feedback.sqlite"
    FeedbackStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.close()
    with pytest.raises(UnusableStore, match=r"newer version of the bot .* upgrade the bot"):
        FeedbackStore(path)
