"""``python -m bot feedback export``: majority per pair, drops counted, thread split, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.feedback.export import ExportOptions, export_feedback
from bot.feedback.records import AdapterRef, AnswerRecord
from bot.feedback.store import FeedbackStore

CURRENT = AdapterRef("runs/sft/adapter", "cur0000000000000")
OLD = AdapterRef("runs/old/adapter", "old0000000000000")
SYSTEM = {"role": "system", "content": "You are a ski shop expert."}


def conversation(question: str) -> list[dict[str, str]]:
    return [SYSTEM, {"role": "user", "content": question}]


def answer(variant: str, text: str, question: str, adapter: AdapterRef = CURRENT) -> AnswerRecord:
    return AnswerRecord(
        conversation=conversation(question),
        text=text,
        variant=variant,  # type: ignore[arg-type]
        model="tiny",
        source="discord",
        adapter=adapter,
        settings={"temperature": 0.7},
    )


def pair(store: FeedbackStore, question: str, votes: dict[str, int], adapter=CURRENT) -> str:
    pair_id = store.record_pair(
        answer("base", f"base says {question}", question, adapter),
        answer("finetuned", f"finetuned says {question}", question, adapter),
    )
    voter = 0
    for choice, n in votes.items():
        for _ in range(n):
            voter += 1
            store.vote_pair(pair_id, f"discord:{voter}", choice)  # type: ignore[arg-type]
    return pair_id


def rated(store: FeedbackStore, question: str, up: int, down: int) -> str:
    answer_id = store.record_answer(answer("finetuned", f"answer to {question}", question))
    for voter in range(up + down):
        store.vote_answer(answer_id, f"discord:{voter}", "up" if voter < up else "down")
    return answer_id


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "feedback.sqlite"
    with FeedbackStore(path) as store:
        pair(store, "wax for slush?", {"finetuned": 2, "base": 1})
        pair(store, "park skis?", {"base": 2})
        pair(store, "boot flex?", {"base": 1, "finetuned": 1})
        pair(store, "helmet?", {"both_bad": 2, "finetuned": 1})
        pair(store, "goggles?", {})
        pair(store, "old adapter?", {"finetuned": 3}, adapter=OLD)
        for n in range(8):
            pair(store, f"question {n}?", {"finetuned": 1})
        rated(store, "wax for slush?", up=2, down=0)  # same thread as the first pair
        rated(store, "edge angle?", up=0, down=1)
        rated(store, "tune?", up=1, down=1)
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rows(out: Path, name: str) -> list[dict]:
    return read(out / "train" / name) + read(out / "test" / name)


def test_majority_per_pair_with_ties_and_both_bad_left_out_and_counted(db: Path, tmp_path: Path):
    out = tmp_path / "export"
    stats = export_feedback(db, out, ExportOptions(adapter_hash=CURRENT.hash, test_fraction=0.3))
    prefs = rows(out, "preferences.jsonl")
    by_question = {r["prompt"][-1]["content"]: r for r in prefs}
    assert set(by_question) == {"wax for slush?", "park skis?"} | {
        f"question {n}?" for n in range(8)
    }
    slush = by_question["wax for slush?"]
    assert slush["prompt"] == conversation("wax for slush?"), "the prompt is what the model saw"
    assert slush["chosen"] == [{"role": "assistant", "content": "finetuned says wax for slush?"}]
    assert slush["rejected"] == [{"role": "assistant", "content": "base says wax for slush?"}]
    assert by_question["park skis?"]["chosen"][0]["content"] == "base says park skis?"
    assert stats["preferences"]["dropped"] == {"both_bad": 1, "no_votes": 1, "tie": 1}
    assert stats["preferences"]["winners"] == {"base": 1, "finetuned": 9}
    assert stats["pairs"] == 13, "the old adapter's pair is not even considered"
    assert stats["adapters_in_db"] == {CURRENT.hash: 29, OLD.hash: 2}

    ratings = rows(out, "ratings.jsonl")
    labels = {r["prompt"][-1]["content"]: r["label"] for r in ratings}
    assert labels == {"wax for slush?": True, "edge angle?": False}
    assert stats["ratings"]["dropped"]["tie"] == 1
    assert stats["ratings"]["labels"] == {"up": 1, "down": 1}
    assert ratings[0]["completion"][0]["role"] == "assistant"


def test_split_is_by_thread_and_deterministic(db: Path, tmp_path: Path):
    first, second = tmp_path / "a", tmp_path / "b"
    options = ExportOptions(test_fraction=0.3, seed=7)
    stats = export_feedback(db, first, options)
    export_feedback(db, second, options)
    for relative in ("train/preferences.jsonl", "test/preferences.jsonl", "stats.json"):
        assert (first / relative).read_bytes() == (second / relative).read_bytes()
    assert (
        stats["preferences"]["splits"]["test"] >= 1 and stats["preferences"]["splits"]["train"] >= 1
    )
    test_threads = {r["thread_key"] for r in read(first / "test" / "preferences.jsonl")}
    train_threads = {r["thread_key"] for r in read(first / "train" / "preferences.jsonl")}
    assert not test_threads & train_threads
    for split in ("train", "test"):  # a thread's rating sits on the same side as its pair
        prefs = {r["thread_key"] for r in read(first / split / "preferences.jsonl")}
        other = "test" if split == "train" else "train"
        assert not prefs & {r["thread_key"] for r in read(first / other / "ratings.jsonl")}


def test_min_votes_drops_thin_pairs(db: Path, tmp_path: Path):
    stats = export_feedback(db, tmp_path / "out", ExportOptions(min_votes=3))
    assert stats["preferences"]["kept"] == 2  # 2-1 on the current adapter, 3-0 on the old one
    assert stats["preferences"]["dropped"]["too_few_votes"] == 10
    assert stats["ratings"]["kept"] == 0


def test_rows_are_what_trl_expects(db: Path, tmp_path: Path):
    from trl.data_utils import is_conversational

    out = tmp_path / "out"
    export_feedback(db, out, ExportOptions())
    pref = read(out / "train" / "preferences.jsonl")[0]
    rating = rows(out, "ratings.jsonl")[0]
    assert is_conversational(pref) and is_conversational(rating)
    assert isinstance(rating["label"], bool)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "bot", "feedback", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_cli_writes_the_files_and_refuses_in_one_line(db: Path, tmp_path: Path):
    out = tmp_path / "cli"
    done = run_cli("export", "--db", str(db), "--out", str(out), "--adapter-hash", CURRENT.hash)
    assert done.returncode == 0, done.stderr
    assert "10 preference pairs" in done.stdout
    assert {p.name for p in out.iterdir()} == {"train", "test", "stats.json"}
    assert {p.name for p in (out / "train").iterdir()} == {"preferences.jsonl", "ratings.jsonl"}

    missing = run_cli("export", "--db", str(tmp_path / "nope.sqlite"), "--out", str(out))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "no such file" in missing.stderr
    assert not (tmp_path / "nope.sqlite").exists(), "export must not create a store"

    empty = tmp_path / "empty.sqlite"
    FeedbackStore(empty).close()
    nothing = run_cli("export", "--db", str(empty), "--out", str(out))
    assert nothing.returncode == 2 and "no usable votes" in nothing.stderr
    assert nothing.stderr.strip().count("\n") == 0


def test_a_usage_mistake_is_one_line(capsys: pytest.CaptureFixture[str]):
    from bot.feedback.cli import main

    assert main(["export", "--min-votes", "many"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: argument --min-votes") and "\n" not in error
    assert error.endswith("(see python -m bot feedback export --help)")


def test_pairs_between_any_two_models_export_the_majoritys_side(tmp_path: Path):
    v1 = AdapterRef("runs/v1/adapter", "v1v1v1v1v1v1v1v1")
    v2 = AdapterRef("runs/v2/adapter", "v2v2v2v2v2v2v2v2")
    path = tmp_path / "feedback.sqlite"
    with FeedbackStore(path) as store:
        outcomes = {
            "v2 wins?": ("b", "b", "a"),
            "v1 wins?": ("a", "a", "tie"),
            "tied?": ("tie", "tie", "a"),
            "shown base first?": ("b",),
        }
        for question, choices in outcomes.items():
            first, second = ("base", "v2") if question == "shown base first?" else ("v1", "v2")
            pair_id = store.record_pair(
                answer(
                    first, f"{first} says {question}", question, v1 if first == "v1" else CURRENT
                ),
                answer(second, f"{second} says {question}", question, v2),
            )
            for n, choice in enumerate(choices):
                store.vote_pair(pair_id, f"discord:{n}", choice)  # type: ignore[arg-type]
    out = tmp_path / "out"
    stats = export_feedback(path, out, ExportOptions(test_fraction=0))
    prefs = {r["prompt"][-1]["content"]: r for r in rows(out, "preferences.jsonl")}
    assert set(prefs) == {"v2 wins?", "v1 wins?", "shown base first?"}
    won = prefs["v2 wins?"]
    assert won["chosen"] == [{"role": "assistant", "content": "v2 says v2 wins?"}]
    assert won["rejected"] == [{"role": "assistant", "content": "v1 says v2 wins?"}]
    assert won["winner"] == "v2" and won["votes"] == {"a": 1, "b": 2, "tie": 0, "both_bad": 0}
    assert won["sides"]["a"] == {"model": "v1", "adapter_hash": v1.hash}
    assert prefs["v1 wins?"]["chosen"][0]["content"] == "v1 says v1 wins?"
    assert prefs["shown base first?"]["rejected"][0]["content"] == "base says shown base first?"
    assert stats["preferences"]["dropped"] == {"tie": 1}  # a "tie" majority is no preference
    assert stats["preferences"]["winners"] == {"v1": 1, "v2": 2}
    # --adapter-hash keeps the pairs that adapter answered in, on either side.
    only_v1 = export_feedback(path, tmp_path / "v1", ExportOptions(adapter_hash=v1.hash))
    assert only_v1["pairs"] == 3
