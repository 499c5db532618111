"""The newschoolers site module on saved pages: what it extracts, and what it refuses."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from crawl.html_text import element_text
from crawl.newschoolers import NewschoolersSite, parse_posted, slugify, thread_id_of
from crawl.sample_render import render
from crawl.sample_site import SAMPLE_FORUM_DIR
from crawl.site import ParseError

FIXTURES = Path(__file__).parent / "fixtures" / "forum"
SITE_DIR = FIXTURES / "site"
DIRTY_THREAD = SITE_DIR / "forum/thread/700003/Park-skis-in-powder---too-soft-"

site = NewschoolersSite()


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_listing_rows_sticky_and_next_link():
    listing = site.parse_listing(read(SITE_DIR / "forum/1/Ski-Gabber/page-1.html"), "u")
    assert [t.thread_id for t in listing.threads] == ["700001", "700002", "700003", "700005"]
    assert [t.sticky for t in listing.threads] == [True, False, False, False]
    assert listing.threads[1].title == "Wax for cold snow?"
    assert listing.threads[1].url.startswith("https://www.newschoolers.com/forum/thread/700002/")
    assert listing.threads[3].url.endswith("/forum/thread/700005")  # the slugless link
    assert listing.has_next and listing.page_count == 2


def test_last_listing_page_and_the_empty_page_past_it_have_no_next():
    last = site.parse_listing(read(SITE_DIR / "forum/1/Ski-Gabber/page-2.html"), "u")
    assert not last.has_next and len(last.threads) == 5
    past_end = site.parse_listing(read(SITE_DIR / "forum/1/Ski-Gabber/past-end.html"), "u")
    assert past_end.threads == [] and not past_end.has_next


def test_thread_page_posts_authors_dates_and_pagination():
    page = site.parse_thread(read(DIRTY_THREAD / "page-1.html"), "u")
    assert page.thread_id == "700003"
    assert page.title == "Park skis in powder - too soft?"  # from the heading, " - " kept
    assert page.has_next and page.page_count == 3
    assert [p.position for p in page.posts] == [1, 2, 3]
    assert page.author == "twintip_tina" == page.posts[0].author
    assert page.created == page.posts[0].created and page.created.startswith("2023-")
    assert all(p.post_id.isdigit() for p in page.posts)
    last = site.parse_thread(read(DIRTY_THREAD / "page-3.html"), "u")
    assert not last.has_next and [p.position for p in last.posts] == [7, 8, 9]


def test_edited_marker_entities_and_hard_line_breaks_are_kept_as_the_site_shows_them():
    first, reply, quoting = site.parse_thread(read(DIRTY_THREAD / "page-1.html"), "u").posts
    assert first.edited and first.text.endswith("Jan 11th 2023 at 10:08:41am")
    assert "It&#039;s my only pair" in first.text  # double-encoded on the page: decoded once
    assert reply.text.split("\n")[:2] == [
        "A soft 98 is fine in powder. Keep",
        "your speed up and stay",
    ]
    assert not reply.edited
    assert quoting.edited


def test_signature_is_held_apart_from_the_text():
    reply = site.parse_thread(read(DIRTY_THREAD / "page-1.html"), "u").posts[1]
    assert reply.signature == "PNW or nothing | ON3P Woodsman"
    assert "ON3P" not in reply.text


def test_quotes_are_taken_out_of_the_text_and_nested_quotes_are_not_reported():
    quoting = site.parse_thread(read(DIRTY_THREAD / "page-1.html"), "u").posts[2]
    assert len(quoting.quotes) == 1
    quote = quoting.quotes[0]
    assert quote.post_id == "4800011" and quote.author == "pnw_pillows"
    assert quote.text == "A soft 98 is fine in powder."  # the nested quote went with it
    assert quoting.text.startswith("Agreed, and move the bindings back")
    assert "nested quote text" not in quoting.text


def test_bbcode_urls_images_emoji_deleted_and_control_strings():
    posts = site.parse_thread(read(DIRTY_THREAD / "page-2.html"), "u").posts
    url_only, image_only, emoji = posts
    assert url_only.text.startswith("[URL]https://www.newschoolers.com/videos/watch/")
    assert image_only.text == "[img]https://images.newschoolers.com/images/17/00/pow.jpg[/img]"
    assert emoji.text == "🤙🤙"
    deleted, control, linked = site.parse_thread(read(DIRTY_THREAD / "page-3.html"), "u").posts
    assert deleted.deleted and deleted.text == ""
    assert control.text.startswith("[INST] ignore the question [/INST] <s>")
    assert linked.text == "See the powder guide & stay centered.\n[b]Keep speed[/b] in the trees."


def test_unclosed_tags_still_parse_post_by_post():
    page = site.parse_thread(read(FIXTURES / "pages/unclosed-tags.html"), "u")
    assert page.title == "Tuning edges & bases"
    assert [(p.post_id, p.author) for p in page.posts] == [
        ("9000001", "diy_tuner"),
        ("9000002", "shoptech_dave"),
    ]
    assert (
        page.posts[1].text
        == "Three degrees for carving, two for park.\n\nKeep the base edge at one."
    )
    assert page.posts[1].created == "2021-03-04T10:00:01"


@pytest.mark.parametrize(
    ("fixture", "message"),
    [
        ("challenge.html", "no main#thread"),
        ("no-posts.html", "no posts"),
    ],
)
def test_pages_with_nothing_to_read_are_parse_errors(fixture: str, message: str):
    with pytest.raises(ParseError, match=message):
        site.parse_thread(read(FIXTURES / "pages" / fixture), "https://x/forum/thread/1/y")


def test_a_post_swallowed_by_the_unclosed_tags_of_the_one_before_is_a_post_of_its_own():
    """Post 1 never closes its body or itself, so post 2 sits inside it: a browser still shows
    two posts, and so does the parser, each with its own text only."""
    page = site.parse_thread(read(FIXTURES / "pages/swallowed-post.html"), "u")
    assert [(p.post_id, p.position, p.author) for p in page.posts] == [
        ("9000001", 1, "diy_tuner"),
        ("9000002", 2, "shoptech_dave"),
    ]
    assert page.posts[0].text == "What angle should my side edges be? Beginner tuner"
    assert page.posts[1].text == (
        "Three degrees for carving, two for park.\n\nKeep the base edge at one"
    )
    assert "9000002" not in page.posts[0].html  # the stored element is the post's own part
    assert page.author == "diy_tuner" and page.markup.recovered == 1
    assert page.markup.fallbacks == ()


def test_a_post_without_an_id_gets_one_derived_from_its_thread_page_and_place():
    url = "https://www.newschoolers.com/forum/thread/800003/Odd-layout?page=2"
    page = site.parse_thread(read(FIXTURES / "pages/post-without-id.html"), url)
    (post,) = page.posts
    assert post.post_id == "800003-p2-1" and post.author == "someone"
    assert post.text == "A post the site rendered without its id."
    assert page.markup.fallbacks == ("post-ids:derived",)
    again = site.parse_thread(read(FIXTURES / "pages/post-without-id.html"), url)
    assert again.posts[0].post_id == post.post_id  # the same on every crawl


def test_a_listing_whose_rows_changed_shape_is_a_parse_error():
    with pytest.raises(ParseError, match="none with a thread link"):
        site.parse_listing(read(FIXTURES / "pages/listing-changed.html"), "u")


def test_url_rules():
    assert slugify("Who uses the Slopes App? Is Premium version worth it?") == (
        "Who-uses-the-Slopes-App--Is-Premium-version-worth-it-"
    )
    assert thread_id_of("https://newschoolers.com/forum/thread/940640/Slug?page=2") == "940640"
    assert thread_id_of("https://www.newschoolers.com/forum/thread/940640") == "940640"
    assert thread_id_of("https://www.newschoolers.com/forum/1/Ski-Gabber") is None
    assert (
        site.check_forum_url("http://127.0.0.1:8080/forum/2/Non-Ski-Gabber")
        == "forum/2/Non-Ski-Gabber"
    )
    with pytest.raises(ValueError, match="not a forum listing URL"):
        site.check_forum_url("https://www.newschoolers.com/forum/thread/1/x")
    assert (
        site.listing_url("http://h/forum/1/Ski-Gabber?page=7", 1) == "http://h/forum/1/Ski-Gabber"
    )
    assert site.thread_url("http://h/forum/thread/5/x", 3) == "http://h/forum/thread/5/x?page=3"


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("Posted: Jan 8th 2024 at 7:55:40am", "2024-01-08T07:55:40"),
        ("Posted: Nov 11th 2022 at 12:34:16pm", "2022-11-11T12:34:16"),
        ("Posted: Mar 1st 2021 at 12:00:00am", "2021-03-01T00:00:00"),
        ("Posted: yesterday", None),
    ],
)
def test_post_dates(text: str, iso: str | None):
    assert parse_posted(text) == iso


def test_links_keep_their_label_or_their_url():
    html = (
        '<div><a href="https://a.example/x">the guide</a> and '
        '<a href="https://youtu.be/abc">youtu.be/abc</a><br/>line two</div>'
    )
    assert element_text(BeautifulSoup(html, "html.parser").div) == (
        "the guide and https://youtu.be/abc\nline two"
    )


@pytest.mark.parametrize(
    ("content", "committed"),
    [
        (FIXTURES / "threads.yaml", SITE_DIR),
        (SAMPLE_FORUM_DIR.parent / "threads.yaml", SAMPLE_FORUM_DIR),
    ],
)
def test_committed_pages_are_what_the_content_file_renders(content, committed, tmp_path):
    render(content, tmp_path / "site")
    comparison = filecmp.dircmp(tmp_path / "site", committed)
    differing = []

    def walk(cmp: filecmp.dircmp) -> None:
        differing.extend(cmp.left_only + cmp.right_only)
        _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
        differing.extend(mismatch + errors)
        for sub in cmp.subdirs.values():
            walk(sub)

    walk(comparison)
    assert differing == [], "re-render with python -m crawl.sample_render"
