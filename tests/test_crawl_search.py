"""The forum store's search index: built as pages arrive or rebuilt, the same; never a dropped post."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crawl.__main__ import main
from crawl.crawler import CrawlOptions, crawl
from crawl.dataset import DatasetOptions, build_dataset
from crawl.fetcher import FetchOptions
from crawl.index import index_pending
from crawl.layout import CONTEXT_HEADING, LAYOUT, render_question
from crawl.newschoolers import NewschoolersSite
from crawl.rules import text_key
from crawl.sample_site import SAMPLE_FORUM_DIR, serve_forum
from crawl.search import IndexUnavailable, Passage, Retriever, query_terms
from crawl.store import Store
from tests.forum_store import make_store

pytestmark = pytest.mark.timeout(120)
FAST = FetchOptions(concurrency=2, delay=0, timeout=5, max_tries=2, backoff=0.01)
QUESTIONS = (
    "how long should park skis be for me",
    "is the slopes premium app worth paying for",
    "my goggles fog up what do I do",
    "what wax for very cold snow",
    "toes go numb in my boots",
)


def passages_of(db: Path) -> list[tuple]:
    with closing(sqlite3.connect(db)) as raw:
        return raw.execute(
            "SELECT post_id, thread_id, title, text, author, url, text_key FROM passages "
            "ORDER BY post_id"
        ).fetchall()


def results(db: Path) -> list[list[tuple[str, float]]]:
    with Retriever.open(db) as retriever:
        return [[(p.post_id, p.score) for p in retriever.search(q, 4)] for q in QUESTIONS]


@pytest.fixture(scope="module")
def crawled(tmp_path_factory) -> Path:
    """The bundled sample forum, crawled over loopback: indexed page by page as it arrived."""
    db = tmp_path_factory.mktemp("search") / "forum.sqlite"

    async def run() -> None:
        async with serve_forum(SAMPLE_FORUM_DIR) as base:
            options = CrawlOptions(forum_url=base + "/forum/1/Ski-Gabber", progress=False)
            with Store.open(db) as store:
                await crawl(NewschoolersSite(), store, options, FAST)

    import asyncio

    asyncio.run(run())
    return db


def test_the_index_built_during_the_crawl_equals_a_rebuilt_one(crawled, tmp_path, capsys):
    during = passages_of(crawled)
    found = results(crawled)
    copy = tmp_path / "copy.sqlite"
    with closing(sqlite3.connect(crawled)) as source, closing(sqlite3.connect(copy)) as target:
        source.backup(target)
    assert main(["index", "--db", str(copy), "--rebuild"]) == 0
    assert "indexed" in capsys.readouterr().out
    assert passages_of(copy) == during and len(during) > 50
    assert results(copy) == found and all(found)
    assert main(["index", "--db", str(copy)]) == 0  # nothing changed: nothing to do
    assert capsys.readouterr().out.startswith("indexed 0 passages from 0 threads")


def test_passages_are_the_dataset_answers_text_for_text(crawled, tmp_path):
    build_dataset(crawled, tmp_path / "ds", DatasetOptions(test_fraction=0.2))
    rows = [
        json.loads(line)
        for split in ("train", "test")
        for line in (tmp_path / "ds" / f"{split}.jsonl").read_text().splitlines()
    ]
    answers = {row["post_id"]: row["completion"][0]["content"] for row in rows}
    passages = {row[0]: row[3] for row in passages_of(crawled)}
    # Every training answer is searchable with its very text. Beside them the index holds only
    # copies (of an answer: one key, one source; of a shop ad: copypasta, filtered when found).
    assert all(passages.get(post_id) == text for post_id, text in answers.items())
    answer_keys = {text_key(t) for t in answers.values()}
    extra = {text for post_id, text in passages.items() if post_id not in answers}
    copypasta = {text for text in extra if text_key(text) not in answer_keys}
    assert copypasta and all("SkiShop Outlet".casefold() in t.casefold() for t in copypasta)
    with Retriever.open(crawled) as retriever:
        found = retriever.search("skishop outlet 30% off park skis tuning kits shipping", 5)
    assert found and not {p.text for p in found} & copypasta


def test_deleted_and_dropped_posts_are_never_returned(tmp_path):
    ad = "Zorblax Outlet sells wax and tuning kits, thirty percent off this week only!"
    db = make_store(
        tmp_path,
        {
            "1": (
                "Zorblax wax question",
                [
                    {"text": "Which zorblax wax should I buy for cold days?", "by": "asker"},
                    {"text": "Zorblax deleted answer about cold wax", "deleted": True},
                    {"text": "This post was edited on Jan 2"},
                    {"text": "[URL]https://zorblax.example/wax[/URL]"},
                    {"text": "thanks, zorblax cold wax it is then, great help", "by": "asker"},
                    {"text": ad},
                    {"text": "Use a hard green zorblax wax below minus ten, scrape it thin."},
                ],
            ),
            "2": ("Zorblax skis", [{"text": "zorblax skis any good?"}, {"text": ad}]),
            "3": ("Zorblax boots", [{"text": "zorblax boots sizing?"}, {"text": ad}]),
        },
    )
    with Store.open(db) as store:
        index_pending(store, progress=False)
    with Retriever.open(db) as retriever:
        found = retriever.search("zorblax cold wax deleted edited outlet thanks", 10)
    assert [p.text for p in found] == [
        "Use a hard green zorblax wax below minus ten, scrape it thin."
    ]
    assert found[0].url.endswith("#post-1006") and found[0].title == "Zorblax wax question"


def test_one_long_thread_cannot_fill_every_slot(tmp_path):
    replies = [
        {"text": f"Grind number {i}: a quibbit base grind for quibbit snow."} for i in range(6)
    ]
    db = make_store(
        tmp_path,
        {
            "1": ("Quibbit grinds", [{"text": "which quibbit grind?"}, *replies]),
            "2": ("Other", [{"text": "question"}, {"text": "A quibbit grind works for park too."}]),
        },
    )
    with Store.open(db) as store:
        index_pending(store, progress=False)
    with Retriever.open(db) as retriever:
        found = retriever.search("quibbit grind", 3)
    assert sorted(p.thread_id for p in found) == ["1", "1", "2"]


@pytest.mark.parametrize(
    "question",
    [
        '"',
        "park skis*",
        'NEAR(park skis, 2) AND "wax" OR NOT -boots',
        "title: park skis",
        "((park) skis",
        "- - -",
        "!@#$%^&*()_+{}|:<>?~`-=[]\\;',./" * 60,
        "",
    ],
)
def test_fts_syntax_in_a_question_is_searched_as_words(crawled, question):
    with Retriever.open(crawled) as retriever:
        found = retriever.search(question, 3)
    assert len(found) <= 3
    if "park" in question:
        assert found and all(isinstance(p, Passage) for p in found)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_no_text_makes_the_search_raise(crawled_db_for_hypothesis, text):
    crawled_db_for_hypothesis.search(text, 3)


@pytest.fixture(scope="module")
def crawled_db_for_hypothesis(crawled):
    with Retriever.open(crawled) as retriever:
        yield retriever


def test_a_store_that_cannot_be_searched_says_what_to_do(tmp_path, crawled):
    with pytest.raises(IndexUnavailable, match=r"no forum store at .*crawl fetch"):
        Retriever.open(tmp_path / "missing.sqlite")
    (tmp_path / "junk.sqlite").write_text("not a database")
    with pytest.raises(IndexUnavailable, match="not a readable forum store"):
        Retriever.open(tmp_path / "junk.sqlite")
    old = tmp_path / "old.sqlite"
    with closing(sqlite3.connect(crawled)) as source, closing(sqlite3.connect(old)) as target:
        source.backup(target)
        target.executescript("DROP TABLE passage_index; DROP TABLE passages;")
    with pytest.raises(IndexUnavailable, match=r"no search index.*python -m crawl index --db"):
        Retriever.open(old)


def test_dataset_context_never_shows_a_row_its_own_answer(crawled, tmp_path):
    out = tmp_path / "ds"
    stats = build_dataset(crawled, out, DatasetOptions(context=3, distractors=0.3, seed=1))
    rows = [
        json.loads(line)
        for split in ("train", "test")
        for line in (out / f"{split}.jsonl").read_text().splitlines()
    ]
    with closing(sqlite3.connect(crawled)) as raw:
        key_of = dict(raw.execute("SELECT post_id, text_key FROM passages"))
        thread_of = dict(raw.execute("SELECT post_id, thread_id FROM passages"))
    distractor_only = 0
    for row in rows:
        prompt, answer = row["prompt"][0]["content"], row["completion"][0]["content"]
        shown = row["context_post_ids"]
        assert 0 < len(shown) <= 3 and CONTEXT_HEADING in prompt
        assert row["post_id"] not in shown and answer not in prompt
        assert all(key_of[post_id] != text_key(answer) for post_id in shown)
        distractor_only += all(thread_of[post_id] != row["thread_id"] for post_id in shown)
    assert stats["context"]["k"] == 3 and stats["context"]["layout"] == LAYOUT
    assert 0 < stats["context"]["rows_distractor_only"] <= distractor_only < len(rows)
    assert stats["context"]["rows_with_own_thread"] > len(rows) // 2


def test_the_layout_puts_the_question_first_and_numbers_the_passages():
    passage = Passage(
        post_id="9",
        thread_id="1",
        title="Wax for cold snow",
        text="Green wax below minus ten. " * 60,
        url="u",
        thread_url="t",
        author="waxer",
        created=None,
        score=1.0,
        excerpt="Green wax below minus ten.",
    )
    rendered = render_question("Which wax?", [passage, passage])
    assert rendered.startswith(
        "Which wax?\n\n" + CONTEXT_HEADING + "\n[1] Wax for cold snow (waxer): "
    )
    assert "\n[2] " in rendered and len(rendered) < 1400
    assert render_question("Which wax?", []) == "Which wax?"


def test_words_in_too_many_passages_are_left_out_but_one_is_always_kept(tmp_path, monkeypatch):
    threads = {
        str(i): (
            f"Thread {i}",
            [{"text": "a question"}, {"text": f"Powder days are fun, says rider {i}."}],
        )
        for i in range(1, 7)
    }
    threads["9"] = (
        "Zorbex",
        [{"text": "what is it"}, {"text": "Zorbex is a cold snow wax, the blue one."}],
    )
    db = make_store(tmp_path, threads)
    with Store.open(db) as store:
        index_pending(store, progress=False)
    with Retriever.open(db) as retriever:  # within the budget: every word is searched
        assert len(retriever.search("powder zorbex", 3)) == 3
    monkeypatch.setattr("crawl.search.MATCH_BUDGET", 3)  # "powder" is in 6 passages: too common
    with Retriever.open(db) as retriever:
        assert [p.thread_id for p in retriever.search("powder zorbex", 3)] == ["9"]
        assert len(retriever.search("powder", 3)) == 3  # the rarest word is kept even over it


def test_single_characters_are_no_search_terms():
    """A height like 5'6 must not pull in every thread that mentions a 5 or a 6."""
    assert query_terms("I'm 5'6 and 130 lbs, what length for park skis?") == [
        "130",
        "lbs",
        "length",
        "park",
        "skis",
    ]
