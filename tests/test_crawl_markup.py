"""The parser against markup it did not expect: broken pages, and the live site's guesses wrong.

The forum here (tests/fixtures/forum-markup) is rendered twice, with the full markup
and with only what is verified of the live site, and each is crawled over loopback
into a store and a dataset: both must give the same question/answer pairs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from crawl.crawler import CrawlOptions, CrawlSummary, crawl
from crawl.dataset import DatasetOptions, build_dataset
from crawl.fetcher import FetchOptions
from crawl.newschoolers import NewschoolersSite
from crawl.sample_render import render
from crawl.sample_site import serve_forum
from crawl.site import ParseError
from crawl.store import Store

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).parent / "fixtures"
CONTENT = FIXTURES / "forum-markup" / "threads.yaml"
LISTING = "/forum/1/Ski-Gabber"
FAST = FetchOptions(concurrency=2, delay=0, timeout=5, max_tries=2, backoff=0.01)
BROKEN_THREAD = "710002"  # page 1: reply #2 swallows the three posts after it
AD = "skishop outlet"

site = NewschoolersSite()


async def crawl_base(base: str, db: Path) -> CrawlSummary:
    with Store.open(db) as store:
        return await crawl(
            site, store, CrawlOptions(forum_url=base + LISTING, progress=False), FAST
        )


async def crawl_site(site_dir: Path, db: Path) -> CrawlSummary:
    async with serve_forum(site_dir) as base:
        return await crawl_base(base, db)


def qa_pairs(out: Path) -> set[tuple[str, str]]:
    rows = [
        json.loads(line)
        for name in ("train.jsonl", "test.jsonl")
        for line in (out / name).read_text(encoding="utf-8").splitlines()
    ]
    return {(r["prompt"][0]["content"], r["completion"][0]["content"]) for r in rows}


@dataclass(frozen=True)
class Crawled:
    db: Path
    summary: CrawlSummary
    stats: dict
    pairs: set[tuple[str, str]]


@pytest.fixture(scope="module")
def crawled(tmp_path_factory) -> dict[str, Crawled]:
    """The forum in each markup, rendered, crawled and turned into a dataset once."""
    root = tmp_path_factory.mktemp("markup")
    result = {}
    for markup in ("full", "verified"):
        render(CONTENT, root / markup, markup)
        db = root / f"{markup}.sqlite"
        summary = asyncio.run(crawl_site(root / markup, db))
        stats = build_dataset(db, root / f"{markup}-dataset", DatasetOptions(test_fraction=0.2))
        result[markup] = Crawled(db, summary, stats, qa_pairs(root / f"{markup}-dataset"))
    return result


def posts_of(db: Path, thread_id: str) -> list[tuple]:
    with Store.open(db, create=False) as store:
        return [(p.page, p.id, p.author, p.text) for p in store.posts(thread_id)]


# --- one broken page ------------------------------------------------------------------


@pytest.mark.parametrize("markup", ["full", "verified"])
def test_a_first_page_whose_early_post_swallows_the_rest_loses_no_post(crawled, markup):
    done = crawled[markup]
    posts = posts_of(done.db, BROKEN_THREAD)
    assert [page for page, *_ in posts] == [1, 1, 1, 1, 1, 2, 2, 2]
    texts = [text for *_, text in posts]
    assert texts[1] == (
        "Half a degree for groomers and hardpack, one degree if you ski mostly soft snow and "
        "park.\n\nSpoiler: most factory tunes are at one degree anyway."
    )  # its own text, none of the three posts it swallowed
    assert texts[2].startswith("Half a degree. One degree feels vague")
    assert texts[3].startswith("One degree in the park") and texts[4].startswith("Whatever")
    assert done.summary.pages_recovered == 1 and done.summary.posts_recovered == 3
    assert "1 page recovered (3 posts" in done.summary.describe()
    assert done.summary.errors == 0
    markup_stats = done.stats["markup"]
    assert markup_stats["recovered_pages"] == 1 and markup_stats["recovered_posts"] == 3
    assert markup_stats["parse_errors"] == 0


def test_the_broken_threads_later_page_is_paired_with_its_question(crawled):
    question = (
        "Tuning - base bevel 0.5 or 1 degree?\n\nSetting up my own tuning bench. Should the base "
        "bevel be half a degree or one degree for all mountain skis?"
    )
    answers = {answer for prompt, answer in crawled["full"].pairs if prompt == question}
    assert answers == {
        "Half a degree for groomers and hardpack, one degree if you ski mostly soft snow and "
        "park.\n\nSpoiler: most factory tunes are at one degree anyway.",
        "Half a degree. One degree feels vague on ice and you cannot take bevel back off.",
        "One degree in the park so rails do not catch your edges, and detune the tips as well.",
        "Whatever you pick, use a guide and a file, and check the bevel with a true bar first.",
        "Start at one degree: it is easy to go to half a degree later, impossible to go back.",
    }
    quoting = [p for p, a in crawled["full"].pairs if a.startswith("Agreed, on east coast")]
    assert quoting == [
        f"{question}\n\nracer_rick wrote:\nHalf a degree. One degree feels vague on ice and "
        "you cannot take bevel back off."
    ]  # page 2's reply to a page-1 reply keeps the quoted reply as context


# --- the verified markup only ---------------------------------------------------------


def test_a_forum_with_only_the_verified_markup_gives_the_same_dataset(crawled):
    full, verified = crawled["full"], crawled["verified"]
    assert len(full.pairs) == 14
    assert verified.pairs == full.pairs
    assert verified.stats["splits"] == full.stats["splits"]
    assert not any(AD in answer.lower() for _, answer in full.pairs)
    assert full.stats["dropped"]["copypasta"] == verified.stats["dropped"]["copypasta"] == 3
    assert full.stats["dropped"]["duplicate"] == 1  # two threads only: the first copy is kept


def test_without_the_assumed_markup_posts_come_from_their_bodies_in_page_order(crawled):
    posts = posts_of(crawled["verified"].db, "710003")
    assert [(page, post_id, author) for page, post_id, author, _ in posts] == [
        (1, "710003-p1-1", None),
        (1, "710003-p1-2", None),
        (1, "710003-p1-3", None),
        (1, "710003-p1-4", None),
    ]
    with Store.open(crawled["verified"].db, create=False) as store:
        (quoting,) = [p for p in store.posts("710003") if p.quotes]
        threads = {t.id: t for t in store.threads()}
    assert quoting.text.startswith("A warm fluoro-free wax")  # the quote held apart
    assert quoting.quotes[0]["author"] == "slush_sam"  # from its "name wrote:" line
    assert threads[BROKEN_THREAD].title == "Tuning - base bevel 0.5 or 1 degree?"  # from <title>


def test_the_crawl_says_which_guesses_matched_nothing_and_which_fallbacks_it_used(crawled):
    verified = crawled["verified"].summary
    assert {"div.posts div.post", "div.post-header a.username", "main#thread"} <= set(
        verified.matched_nothing
    )
    assert dict(verified.fallbacks) == {
        "next:page-link": 2,  # listing page 1 and the broken thread's page 1
        "posts:div.post-body": 7,
        "quotes:blockquote": 2,
        "thread-id:url": 7,
        "title:<title>": 7,
    }
    report = verified.describe().splitlines()[1]
    assert report.startswith("markup of the 9 pages parsed: assumed selectors that matched")
    assert "posts:div.post-body on 7 pages" in report and "python -m crawl check" in report
    assert crawled["verified"].stats["markup"]["fallbacks"] == dict(verified.fallbacks)
    assert set(crawled["verified"].stats["markup"]["matched_nothing"]) == set(
        verified.matched_nothing
    )
    full = crawled["full"].summary
    assert not full.fallbacks and "div.posts div.post" not in full.matched_nothing


def test_the_store_records_per_page_what_the_markup_needed(crawled):
    with closing(sqlite3.connect(crawled["verified"].db)) as db:
        rows = db.execute(
            "SELECT url, recovered, fallbacks, selectors FROM pages WHERE kind = 'thread'"
        ).fetchall()
    by_path = {url.split("/forum/", 1)[1]: rest for url, *rest in rows}
    assert len(by_path) == 7
    recovered, fallbacks, selectors = by_path["thread/710002/Tuning---base-bevel-0-5-or-1-degree-"]
    assert recovered == 3
    assert sum(r for r, _, _ in by_path.values()) == 3
    assert "posts:div.post-body" in json.loads(fallbacks)
    assert json.loads(selectors)["div.posts div.post"] == 0


async def test_derived_post_ids_are_the_same_on_every_crawl(crawled, tmp_path, caplog):
    root = crawled["verified"].db.parent
    with caplog.at_level(logging.WARNING, logger="crawl.crawler"):
        await crawl_site(root / "verified", tmp_path / "again.sqlite")
    said = [r.getMessage().split(" needed the fallback ")[1].split(" ")[0] for r in caplog.records]
    assert sorted(said) == sorted(crawled["verified"].summary.fallbacks)  # each once a run
    with (
        Store.open(crawled["verified"].db, create=False) as first,
        Store.open(tmp_path / "again.sqlite", create=False) as again,
    ):
        first_ids = [p.id for t in first.threads() for p in first.posts(t.id)]
        assert first_ids == [p.id for t in again.threads() for p in again.posts(t.id)]


# --- a listing that changes layout mid-crawl ------------------------------------------


async def test_a_listing_page_that_loses_its_rows_mid_crawl_is_an_error_not_the_end(tmp_path):
    site_dir = tmp_path / "site"
    render(CONTENT, site_dir)
    listing_dir = site_dir / LISTING.lstrip("/")
    normal_page_2 = (listing_dir / "page-2.html").read_text(encoding="utf-8")
    shutil.copy(FIXTURES / "forum/pages/listing-new-layout.html", listing_dir / "page-2.html")
    db = tmp_path / "f.sqlite"

    async with serve_forum(site_dir) as base:
        summary = await crawl_base(base, db)
        with Store.open(db, create=False) as store:
            page_2 = store.page(f"{base}{LISTING}?page=2")
        # The layout is back: the next run asks for the listing page again and finishes.
        (listing_dir / "page-2.html").write_text(normal_page_2, encoding="utf-8")
        rerun = await crawl_base(base, db)

    assert summary.listing_error == (
        f"{base}{LISTING}?page=2: no thread rows, although the previous listing page had rows "
        "and a next page: the listing layout changed? (run `python -m crawl check` on this URL)"
    )
    assert f"the listing stopped early: {base}{LISTING}?page=2" in summary.describe()
    assert summary.threads == 4 and summary.errors == 1  # page 1's threads are crawled
    assert page_2 is not None and page_2.state == "parse_error"
    assert rerun.listing_error is None and rerun.threads == 6
    assert rerun.pages_fetched == 1 + 2  # listing page 2 again, and the two threads it lists


def test_the_last_listing_page_is_still_the_end():
    """An empty listing reached without a promise of a next page ends the walk quietly."""
    past_end = site.parse_listing(
        (FIXTURES / "forum/site/forum/1/Ski-Gabber/past-end.html").read_text(), "u"
    )
    assert past_end.threads == [] and not past_end.has_next


# --- the fallbacks, one by one --------------------------------------------------------

THREAD_URL = "https://www.newschoolers.com/forum/thread/940640/Slug?page=2"


def page(body: str, title: str = "Is - it worth it? - Ski Gabber - Newschoolers.com") -> str:
    return f"<html><head><title>{title}</title></head><body>{body}</body></html>"


def test_the_title_comes_from_the_heading_else_from_title_without_its_last_two_parts():
    bodies = '<div class="post-body">one</div><div class="post-body">two</div>'
    from_title = site.parse_thread(page(bodies), THREAD_URL)
    assert from_title.title == "Is - it worth it?"
    assert "title:<title>" in from_title.markup.fallbacks
    from_heading = site.parse_thread(page(f"<h1>Is - it worth it?</h1>{bodies}"), THREAD_URL)
    assert from_heading.title == "Is - it worth it?"
    assert "title:h1" in from_heading.markup.fallbacks
    logo = site.parse_thread(page(f"<h1>Newschoolers</h1>{bodies}"), THREAD_URL)
    assert logo.title == "Is - it worth it?"  # a heading <title> does not name is not the title


def test_the_next_page_is_any_absolute_link_to_page_n_plus_1_of_the_same_thread():
    bodies = '<div class="post-body">one</div>'
    other = '<a href="https://www.newschoolers.com/forum/thread/111/Other?page=3">other</a>'
    relative = '<a href="/forum/thread/940640/Slug?page=3">3</a>'
    assert not site.parse_thread(page(bodies + other + relative), THREAD_URL).has_next
    bare_host = '<a href="https://newschoolers.com/forum/thread/940640/Slug?page=3">3</a>'
    found = site.parse_thread(page(bodies + bare_host), THREAD_URL)
    assert found.has_next and "next:page-link" in found.markup.fallbacks
    previous = '<a href="https://www.newschoolers.com/forum/thread/940640/Slug">1</a>'
    assert not site.parse_thread(page(bodies + previous), THREAD_URL).has_next


def test_a_thread_page_without_an_id_anywhere_is_a_parse_error_that_says_so():
    with pytest.raises(ParseError, match="no thread id"):
        site.parse_thread(page('<div class="post-body">one</div>'), "file:///saved/page.html")
