"""newschoolers.com: every URL rule and selector the crawler relies on, in one place.

What is verified and what is assumed about the markup is listed in
``docs/crawl.md`` ("What to check on the live site"); the selectors below are
named after that list so an operator who finds a difference changes one
constant here and nothing else.
"""

from __future__ import annotations

import re
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

from bs4 import BeautifulSoup, Tag

from crawl.html_text import element_text
from crawl.site import ListingPage, ParseError, Post, Quote, ThreadLink, ThreadPage

# --- URL rules (verified) -------------------------------------------------------------
DEFAULT_FORUM_URL = "https://www.newschoolers.com/forum/1/Ski-Gabber"
CANONICAL_HOSTS = frozenset({"www.newschoolers.com", "newschoolers.com"})
FORUM_PATH = re.compile(r"^/forum/(\d+)/([^/?#]+)/?$")
THREAD_PATH = re.compile(r"^/forum/thread/(\d+)(?:/([^/?#]*))?/?$")
PAGE_PARAM = "page"

# --- listing page -------------------------------------------------------------------
LISTING_ROW = "a.thread"  # verified: <a class="thread" href=ABSOLUTE><h2>title</h2>
LISTING_ROW_TITLE = "h2"  # verified
STICKY_CLASS = "sticky"  # assumed: a.thread.sticky on every listing page

# --- thread page (assumed unless noted) ---------------------------------------------
THREAD_MAIN = "main#thread"  # carries data-thread-id
THREAD_ID_ATTR = "data-thread-id"
THREAD_TITLE = "h1.thread-title"  # verified that the title must come from the heading
POST = "div.posts > div.post"
POST_ELEMENT = "div.post"
POST_ID_ATTR = "data-post-id"
FIRST_POST_CLASS = "first-post"
DELETED_POST_CLASS = "post-deleted"
DELETED_NOTE = "em.deleted-note"
POST_AUTHOR = "div.post-header a.username"
POST_DATE = "div.post-header div.post-date"  # "Posted: Jan 8th 2024 at 7:55:40am"
POST_NUMBER = "div.post-header a.post-number"  # "#3"
POST_BODY = "div.post-body"  # verified
SIGNATURE = "div.sig"
QUOTE = "blockquote.quote"  # carries data-post-id of the quoted post
QUOTE_AUTHOR = "div.quote-author"  # "name wrote:"

# --- pagination (assumed), on listings and threads ----------------------------------
PAGINATION = "div.pagination"  # data-page / data-pages
NEXT_LINK = "a.next"
HEAD_NEXT = "link[rel~=next]"

# Verified: the last line of an edited body, literal asterisks included.
EDITED_LINE = re.compile(r"^\*{0,2}\s*This (?:post|thread) was edited on .+$", re.I)
_POSTED = re.compile(
    r"([A-Z][a-z]{2})[a-z]*\.? (\d{1,2})(?:st|nd|rd|th)? (\d{4}) at (\d{1,2}):(\d{2}):(\d{2}) ?([ap]m)",
    re.I,
)


def slugify(title: str) -> str:
    """The site's slug rule (verified): every non-alphanumeric character becomes ``-``, no collapsing."""
    return re.sub(r"[^A-Za-z0-9]", "-", title)


def parse_posted(text: str) -> str | None:
    """``"Posted: Jan 8th 2024 at 7:55:40am"`` → ``"2024-01-08T07:55:40"``; None when unrecognised."""
    match = _POSTED.search(text)
    if not match:
        return None
    month, day, year, hour, minute, second, ampm = match.groups()
    try:
        stamp = datetime.strptime(
            f"{month.title()} {day} {year} {hour}:{minute}:{second} {ampm.upper()}",
            "%b %d %Y %I:%M:%S %p",
        )
    except ValueError:
        return None
    return stamp.isoformat()


def _with_page(url: str, page: int) -> str:
    parts = urlsplit(url)
    query = "" if page == 1 else f"{PAGE_PARAM}={page}"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def thread_id_of(url: str) -> str | None:
    match = THREAD_PATH.match(urlsplit(url).path)
    return match.group(1) if match else None


class NewschoolersSite:
    """The :class:`crawl.site.ForumSite` for newschoolers.com and copies of it."""

    name = "newschoolers"
    default_forum_url = DEFAULT_FORUM_URL
    canonical_hosts = CANONICAL_HOSTS

    def check_forum_url(self, url: str) -> str:
        parts = urlsplit(url)
        match = FORUM_PATH.match(parts.path)
        if parts.scheme not in ("http", "https") or not parts.netloc or not match:
            raise ValueError(
                f"{url!r} is not a forum listing URL: give one like {DEFAULT_FORUM_URL}"
            )
        return f"forum/{match.group(1)}/{match.group(2)}"

    def listing_url(self, forum_url: str, page: int) -> str:
        return _with_page(forum_url, page)

    def thread_url(self, thread_url: str, page: int) -> str:
        return _with_page(thread_url, page)

    def parse_listing(self, html: str, url: str) -> ListingPage:
        soup = BeautifulSoup(html, "html.parser")
        rows = soup.select(LISTING_ROW)
        threads: list[ThreadLink] = []
        for row in rows:
            href = str(row.get("href") or "")
            thread_id = thread_id_of(href)
            heading = row.select_one(LISTING_ROW_TITLE)
            if thread_id is None or heading is None:
                continue
            sticky = STICKY_CLASS in (row.get("class") or [])
            threads.append(ThreadLink(thread_id, href, element_text(heading), sticky))
        if rows and not threads:
            raise ParseError(
                f"{len(rows)} {LISTING_ROW} rows but none with a thread link and an <h2> title"
            )
        current, pages = _pagination(soup)
        has_next = bool(threads) and (
            soup.select_one(NEXT_LINK) is not None
            or soup.select_one(HEAD_NEXT) is not None
            or (current is not None and pages is not None and current < pages)
        )
        return ListingPage(threads=threads, has_next=has_next, page_count=pages)

    def parse_thread(self, html: str, url: str) -> ThreadPage:
        soup = BeautifulSoup(html, "html.parser")
        main = soup.select_one(THREAD_MAIN)
        if main is None:
            raise ParseError(f"no {THREAD_MAIN} element: not a thread page, or the layout changed")
        thread_id = str(main.get(THREAD_ID_ATTR) or thread_id_of(url) or "")
        if not thread_id:
            raise ParseError(f"no {THREAD_ID_ATTR} on {THREAD_MAIN} and no id in the URL")
        title_el = main.select_one(THREAD_TITLE)
        title = element_text(title_el) if title_el is not None else ""
        if not title:
            raise ParseError(f"no thread title ({THREAD_TITLE})")
        post_els = main.select(POST)
        if not post_els:
            raise ParseError(f"no posts ({POST})")
        posts: list[Post] = []
        for index, element in enumerate(post_els):
            fallback = posts[-1].position + 1 if posts else index + 1
            posts.append(_parse_post(element, fallback))
        first = posts[0] if FIRST_POST_CLASS in (post_els[0].get("class") or []) else None
        current, pages = _pagination(soup)
        has_next = (
            main.select_one(NEXT_LINK) is not None
            or soup.select_one(HEAD_NEXT) is not None
            or (current is not None and pages is not None and current < pages)
        )
        return ThreadPage(
            thread_id=thread_id,
            title=title,
            posts=posts,
            has_next=has_next,
            page_count=pages,
            author=first.author if first else None,
            created=first.created if first else None,
        )


def _pagination(soup: BeautifulSoup) -> tuple[int | None, int | None]:
    element = soup.select_one(PAGINATION)
    if element is None:
        return None, None
    return _int_attr(element, "data-page"), _int_attr(element, "data-pages")


def _int_attr(element: Tag, name: str) -> int | None:
    value = str(element.get(name) or "").strip()
    return int(value) if value.isdigit() else None


def _parse_post(element: Tag, fallback_position: int) -> Post:
    html = str(element)
    post_id = str(element.get(POST_ID_ATTR) or "").strip()
    if not post_id:
        post_id = str(element.get("id") or "").removeprefix("post-")
    if not post_id.isdigit():
        raise ParseError(f"a post without {POST_ID_ATTR} (post #{fallback_position} on the page)")
    body = element.select_one(POST_BODY)
    if body is None:
        raise ParseError(f"post {post_id} has no {POST_BODY}")
    if element.select_one(POST_ELEMENT) is not None:
        raise ParseError(f"post {post_id} contains another post: unclosed tags swallowed it")
    number = _text_of(element, POST_NUMBER).lstrip("#").strip()
    position = int(number) if number.isdigit() else fallback_position
    author = _text_of(element, POST_AUTHOR) or None
    created = parse_posted(_text_of(element, POST_DATE))
    signature_el = element.select_one(SIGNATURE)
    signature = ""
    if signature_el is not None and body not in signature_el.parents:
        signature = element_text(signature_el)
    deleted = DELETED_POST_CLASS in (element.get("class") or []) or (
        body.select_one(DELETED_NOTE) is not None
    )
    if deleted:
        return Post(post_id, position, author, created, html, "", signature=signature, deleted=True)
    quotes = tuple(_take_quotes(body))
    text = element_text(body)
    last_line = text.rsplit("\n", 1)[-1]
    return Post(
        post_id=post_id,
        position=position,
        author=author,
        created=created,
        html=html,
        text=text,
        quotes=quotes,
        signature=signature,
        edited=bool(EDITED_LINE.match(last_line.strip())),
    )


def _take_quotes(body: Tag) -> list[Quote]:
    """Remove the reply's top-level quotes from ``body`` and return them.

    A quote nested inside a quote is what the quoted post itself quoted: it is
    dropped with its parent, not reported as quoted by this reply.
    """
    top_level = [
        block
        for block in body.select(QUOTE)
        if not any(parent.name == "blockquote" for parent in _parents_until(block, body))
    ]
    quotes: list[Quote] = []
    for block in top_level:
        author_el = block.select_one(f":scope > {QUOTE_AUTHOR}")
        author = None
        if author_el is not None:
            author = re.sub(r"\s+wrote:?\s*$", "", element_text(author_el)) or None
            author_el.decompose()
        for nested in block.select(QUOTE):
            nested.decompose()
        quoted_id = str(block.get(POST_ID_ATTR) or "").strip() or None
        quotes.append(Quote(quoted_id, author, element_text(block)))
        block.decompose()
    return quotes


def _parents_until(element: Tag, stop: Tag):
    for parent in element.parents:
        if parent is stop:
            return
        yield parent


def _text_of(element: Tag, selector: str) -> str:
    found = element.select_one(selector)
    return element_text(found) if found is not None else ""
