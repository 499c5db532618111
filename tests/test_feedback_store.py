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
        with pytest.raises(InvalidRecord, match="variant .* is not a model name"):
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
