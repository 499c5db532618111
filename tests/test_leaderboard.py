"""The leaderboard: Wilson intervals, head-to-head tallies, the Bradley–Terry fit, the CLI."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bot.feedback.leaderboard import (
    Z_95,
    HeadToHead,
    bradley_terry,
    head_to_heads,
    leaderboard,
    read_leaderboard,
    wilson,
)
from bot.feedback.records import AdapterRef, AnswerRecord, ModelRef, ModelVotes, PairTally
from bot.feedback.store import FeedbackStore

BASE = ModelRef("base")
V1 = ModelRef("v1", "1111aaaa2222bbbb")
V2 = ModelRef("v2", "3333cccc4444dddd")
V2_RETRAINED = ModelRef("v2", "5555eeee6666ffff")
QUESTION = [{"role": "user", "content": "Twin tips for a first park day?"}]


# ---- intervals -----------------------------------------------------------------------


def test_wilson_interval_matches_its_closed_forms_and_the_textbook_case() -> None:
    assert wilson(0, 0) is None
    z2 = Z_95**2
    none_of_ten = wilson(0, 10)
    assert none_of_ten is not None
    assert none_of_ten.low == 0 and none_of_ten.high == pytest.approx(z2 / (10 + z2))
    all_of_ten = wilson(10, 10)
    assert all_of_ten is not None
    assert all_of_ten.low == pytest.approx(10 / (10 + z2))
    assert all_of_ten.high == pytest.approx(1)
    eight = wilson(8, 10)
    assert eight is not None
    assert (round(eight.low, 4), round(eight.high, 4)) == (0.4902, 0.9433)
    two = wilson(2, 10)  # the mirror image of 8 of 10
    assert two is not None
    assert two.low == pytest.approx(1 - eight.high) and two.high == pytest.approx(1 - eight.low)


# ---- head to head --------------------------------------------------------------------


def test_pairs_shown_either_way_round_are_one_head_to_head_and_nothing_is_hidden() -> None:
    tallies = [
        PairTally(V2, V1, a_wins=2, b_wins=0, ties=0, both_bad=0),  # v2 shown first
        PairTally(V1, V2, a_wins=3, b_wins=1, ties=2, both_bad=1),
        PairTally(V1, V1, a_wins=5),  # a model against itself says nothing
    ]
    (h,) = head_to_heads(tallies)
    assert (h.model, h.opponent) == (V1, V2)
    assert (h.wins, h.losses, h.ties, h.both_bad) == (3, 3, 2, 1)
    assert (h.votes, h.decided) == (9, 8)
    assert h.win_rate == pytest.approx((3 + 2 / 2) / 8)  # a tie is half a win
    assert h.interval == wilson(4, 8)
    flipped = h.flipped()
    assert (flipped.model, flipped.wins, flipped.losses) == (V2, 3, 3)


def test_only_both_bad_votes_give_no_win_rate_but_are_shown() -> None:
    h = HeadToHead(V1, BASE, both_bad=4)
    assert (h.votes, h.decided, h.win_rate, h.interval) == (4, 0, None, None)
    board = leaderboard([ModelVotes(V1, 4, 0, 0), ModelVotes(BASE, 4, 0, 0)], [])
    assert board.ranking == []


# ---- Bradley–Terry -------------------------------------------------------------------


def gradient(results: list[HeadToHead], strength: dict[ModelRef, float], prior: float):
    """d log-likelihood / d log p_i of the penalised BT likelihood: zero at its maximum."""
    grad = {m: prior / 2 - prior * p / (p + 1) for m, p in strength.items()}
    for h in results:
        pi, pj = strength[h.model], strength[h.opponent]
        grad[h.model] += h.score - h.decided * pi / (pi + pj)
        grad[h.opponent] += (h.decided - h.score) - h.decided * pj / (pi + pj)
    return grad


def test_the_fit_is_the_maximum_of_its_likelihood() -> None:
    v3 = ModelRef("v3", "7777")
    results = [
        HeadToHead(V1, BASE, wins=7, losses=2, ties=1, both_bad=3),
        HeadToHead(V2, BASE, wins=9, losses=1),
        HeadToHead(V2, V1, wins=4, losses=3, ties=2),
        HeadToHead(v3, V1, wins=0, losses=5),
        HeadToHead(v3, BASE, wins=1, losses=1, ties=4),
    ]
    strength = bradley_terry(results, prior=1.0)
    assert set(strength) == {BASE, V1, V2, v3}
    for model, g in gradient(results, strength, 1.0).items():
        assert abs(g) < 1e-7, (model, g)
    order = sorted(strength, key=strength.__getitem__, reverse=True)
    assert order == [V2, V1, BASE, v3]


def test_two_models_recover_the_odds_and_an_unbeaten_model_stays_finite() -> None:
    # With (almost) no prior the MLE of p_a / p_b is a's wins over b's: 3 to 1.
    strength = bradley_terry([HeadToHead(V1, V2, wins=3, losses=1)], prior=1e-9)
    assert strength[V1] / strength[V2] == pytest.approx(3, rel=1e-4)
    # Even results: both equal to the reference.
    even = bradley_terry([HeadToHead(V1, V2, wins=2, losses=2, ties=2)])
    assert even[V1] == pytest.approx(1) and even[V2] == pytest.approx(1)
    unbeaten = bradley_terry([HeadToHead(V1, BASE, wins=6)])
    assert math.isfinite(unbeaten[V1]) and unbeaten[V1] > 1 > unbeaten[BASE] > 0
    with pytest.raises(ValueError, match="prior"):
        bradley_terry([], prior=0)


def test_the_board_ranks_orients_and_reports_against_base() -> None:
    votes = [
        ModelVotes(BASE, 10, 2, 6),
        ModelVotes(V1, 6, 3, 1),
        ModelVotes(V2, 5, 4, 0),
        ModelVotes(ModelRef("v9", "9999"), 2, 0, 0),  # answered, never compared
    ]
    tallies = [
        PairTally(BASE, V1, a_wins=1, b_wins=5, ties=2, both_bad=1),
        PairTally(BASE, V2, a_wins=0, b_wins=6),
        PairTally(V1, V2, a_wins=1, b_wins=3),
    ]
    board = leaderboard(votes, tallies)
    assert [r.model for r in board.ranking] == [V2, V1, BASE]
    assert [r.comparisons for r in board.ranking] == [10, 12, 14]
    assert board.ranking[0].rating > 1000 > board.ranking[-1].rating
    # Each pair once, the better-ranked model first.
    assert [(h.model, h.opponent) for h in board.head_to_heads] == [
        (V2, V1),
        (V2, BASE),
        (V1, BASE),
    ]
    assert {(h.model.name, h.wins, h.losses, h.ties, h.both_bad) for h in board.against_base()} == {
        ("v1", 5, 1, 2, 1),
        ("v2", 6, 0, 0, 0),
    }
    standing = {s.model: s for s in board.standings}
    assert standing[BASE].up_rate == pytest.approx(0.25)
    assert standing[V2].up_interval == wilson(4, 4)

    text = board.to_text()
    assert "v1@1111aaaa" in text and "not ranked (no decided comparison yet): v9@9999" in text
    data = board.to_json()
    assert [r["name"] for r in data["ranking"]] == ["v2", "v1", "base"]
    first = data["pairs"][0]
    assert (first["model"]["label"], first["opponent"]["label"]) == ("v2@3333cccc", "v1@1111aaaa")
    assert first["interval"] == [pytest.approx(x) for x in (wilson(3, 4).low, wilson(3, 4).high)]  # type: ignore[union-attr]


# ---- read from a real store ----------------------------------------------------------


def answer(name: str, adapter: AdapterRef, text: str | None = None) -> AnswerRecord:
    return AnswerRecord(
        conversation=QUESTION,
        text=text or f"{name} says: take it slow",
        variant=name,
        model="tiny",
        source="discord",
        adapter=adapter,
    )


def ref(model: ModelRef) -> AdapterRef:
    return AdapterRef(f"runs/{model.name}/adapter", model.weights)


def compare(store: FeedbackStore, a: ModelRef, b: ModelRef, *choices: str) -> str:
    pair_id = store.record_pair(answer(a.name, ref(a)), answer(b.name, ref(b)))
    for n, choice in enumerate(choices):
        store.vote_pair(pair_id, f"discord:{n}", choice)  # type: ignore[arg-type]
    return pair_id


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "feedback.sqlite"
    with FeedbackStore(path) as store:
        compare(store, BASE, V1, "b", "b", "a", "tie", "both_bad")
        compare(store, V2, BASE, "a", "a", "a")
        compare(store, V1, V2, "b", "tie")
        compare(store, BASE, V2_RETRAINED, "a")  # v2 re-pointed at new weights
        rated = store.record_answer(answer("v1", ref(V1)))
        store.vote_answer(rated, "discord:1", "up")
        store.vote_answer(rated, "discord:2", "down")
        store.vote_answer(rated, "discord:3", "up")
    return path


def test_the_store_counts_what_the_board_ranks(db: Path) -> None:
    with FeedbackStore(db) as store:
        board = read_leaderboard(store)
    by_model = {s.model: s for s in board.standings}
    assert set(by_model) == {BASE, V1, V2, V2_RETRAINED}
    assert (by_model[V1].answers, by_model[V1].up, by_model[V1].down) == (3, 2, 1)
    assert by_model[BASE].answers == 3
    against_base = {h.model: h for h in board.against_base()}
    assert (against_base[V1].wins, against_base[V1].losses) == (2, 1)
    assert (against_base[V1].ties, against_base[V1].both_bad) == (1, 1)
    assert (against_base[V2].wins, against_base[V2].losses) == (3, 0)
    assert (against_base[V2_RETRAINED].wins, against_base[V2_RETRAINED].losses) == (0, 1)
    (v1_v2,) = [h for h in board.head_to_heads if {h.model, h.opponent} == {V1, V2}]
    oriented = v1_v2 if v1_v2.model == V2 else v1_v2.flipped()
    assert oriented == HeadToHead(V2, V1, wins=1, losses=0, ties=1, both_bad=0)
    assert board.ranking[0].model == V2


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "bot", "feedback", "leaderboard", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_cli_prints_the_tables_and_json_and_refuses_in_one_line(db: Path, tmp_path: Path) -> None:
    shown = run_cli("--db", str(db))
    assert shown.returncode == 0, shown.stderr
    for heading in ("Models", "Head to head", "Ranking"):
        assert heading in shown.stdout
    assert "v2@5555eeee" in shown.stdout and "v2@3333cccc" in shown.stdout

    as_json = run_cli("--db", str(db), "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["ranking"][0]["label"] == "v2@3333cccc"
    assert {p["both_bad"] for p in data["pairs"]} >= {1}

    missing = run_cli("--db", str(tmp_path / "nope.sqlite"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert missing.stderr.strip().count("\n") == 0
    assert not (tmp_path / "nope.sqlite").exists()

    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, just some words " * 100)
    other = tmp_path / "crawl.sqlite"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        raw.execute("CREATE TABLE threads (id INTEGER)")
    for wrong in (text, other):
        refused = run_cli("--db", str(wrong))
        assert refused.returncode == 2, refused.stderr
        assert "is not a feedback store" in refused.stderr
        assert refused.stderr.strip().count("\n") == 0
    with sqlite3.connect(other) as raw:  # left as it was
        tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_master")}
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert tables == {"meta", "threads", "sqlite_autoindex_meta_1"}


def test_an_empty_store_says_so(tmp_path: Path) -> None:
    path = tmp_path / "empty.sqlite"
    FeedbackStore(path).close()
    with FeedbackStore(path) as store:
        assert read_leaderboard(store).to_text() == "No answers recorded yet.\n"


async def test_status_gets_each_adapters_results_against_base_off_the_loop(db: Path) -> None:
    from bot.feedback.aio import AsyncFeedbackStore

    store = await AsyncFeedbackStore.open(db)
    try:
        rows = {h.model.label: h for h in (await store.leaderboard()).against_base()}
    finally:
        await store.close()
    assert set(rows) == {"v1@1111aaaa", "v2@3333cccc", "v2@5555eeee"}
    v1 = rows["v1@1111aaaa"]
    assert (v1.wins, v1.losses, v1.ties, v1.both_bad) == (2, 1, 1, 1)
    assert v1.win_rate == pytest.approx(2.5 / 4) and v1.interval == wilson(2.5, 4)
