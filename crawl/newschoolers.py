"""newschoolers.com: every URL rule and selector the crawler relies on, in one place.

What is verified and what is assumed about the markup is listed in
``docs/crawl.md`` ("What is known of newschoolers.com"); the selectors below are
named after that list so an operator who finds a difference changes one
constant here and nothing else.

Only part of the markup was seen on the real site, so the parser trusts the
guesses only as far as they match: where an assumed container is missing it
falls back to the verified anchors (posts from ``div.post-body`` in document
order, the title from ``<title>``, the next page from an absolute
``page=N+1`` link) and says so in the page's :class:`~crawl.site.Markup`. A
post whose unclosed tags swallowed the posts after it is read as a browser
shows it: every post element is a post of its own, with the posts nested in
it taken out of its text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime
from urllib.parse import parse_qs, urlsplit, urlunsplit

from bs4 import BeautifulSoup, Tag

from crawl.html_text import element_text
from crawl.site import ListingPage, Markup, ParseError, Post, Quote, ThreadLink, ThreadPage

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
PAGE_HEADING = "h1"  # fallback: the page's heading, whatever its class
POST_LIST = "div.posts"
POST_ELEMENT = "div.post"
POST_ID_ATTR = "data-post-id"  # or id="post-<N>"
FIRST_POST_CLASS = "first-post"
DELETED_POST_CLASS = "post-deleted"
DELETED_NOTE = "em.deleted-note"
POST_AUTHOR = "div.post-header a.username"
POST_DATE = "div.post-header div.post-date"  # "Posted: Jan 8th 2024 at 7:55:40am"
POST_NUMBER = "div.post-header a.post-number"  # "#3"
POST_BODY = "div.post-body"  # verified
POST_FOOTER = "div.post-footer"  # quote/print links and karma: never post text
SIGNATURE = "div.sig"
QUOTE = "blockquote.quote"  # carries data-post-id of the quoted post
QUOTE_FALLBACK = "blockquote"
QUOTE_AUTHOR = "div.quote-author"  # "name wrote:"

# --- pagination (assumed), on listings and threads ----------------------------------
PAGINATION = "div.pagination"  # data-page / data-pages
NEXT_LINK = "a.next"
HEAD_NEXT = "link[rel~=next]"
NEXT_BY_URL = "absolute link to page=N+1"  # verified: the next page's URL ends in page=N

# What a page needed when a guess did not hold; the names are stable (store, stats.json).
FALLBACK_THREAD_ID = "thread-id:url"
FALLBACK_TITLE_HEADING = "title:h1"
FALLBACK_TITLE_TAG = "title:<title>"
FALLBACK_POSTS = "posts:div.post-body"
FALLBACK_POST_IDS = "post-ids:derived"
FALLBACK_QUOTES = "quotes:blockquote"
FALLBACK_NEXT = "next:page-link"

# Verified: the last line of an edited body, literal asterisks included.
EDITED_LINE = re.compile(r"^\*{0,2}\s*This (?:post|thread) was edited on .+$", re.I)
QUOTE_AUTHOR_LINE = re.compile(r"^(\S.{0,60}?)\s+wrote:?$")
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


def page_number_of(url: str) -> int:
    """The ``page=N`` of a URL; 1 when it has none."""
    values = parse_qs(urlsplit(url).query).get(PAGE_PARAM, [])
    return int(values[0]) if values and values[0].isdigit() and int(values[0]) > 0 else 1


def derived_post_id(thread_id: str, page: int, index: int) -> str:
    """An id for a post the page shows without one: the same post gets it on every crawl."""
    return f"{thread_id}-p{page}-{index}"


def title_from_title_tag(text: str) -> str:
    """``"A - B - Ski Gabber - Newschoolers.com"`` → ``"A - B"``: a title may hold `` - `` itself."""
    parts = text.split(" - ")
    if len(parts) >= 3:
        return " - ".join(parts[:-2]).strip()
    return parts[0].strip()


class _Tally:
    """Counts what each selector matched and which fallbacks a page needed."""

    def __init__(self) -> None:
        self.assumed: dict[str, int] = {}
        self.verified: dict[str, int] = {}
        self.fallbacks: list[str] = []
        self.recovered = 0

    def guess(self, selector: str, count: int) -> int:
        self.assumed[selector] = self.assumed.get(selector, 0) + count
        return count

    def seen(self, selector: str, count: int) -> int:
        self.verified[selector] = self.verified.get(selector, 0) + count
        return count

    def fell_back(self, name: str) -> None:
        if name not in self.fallbacks:
            self.fallbacks.append(name)

    def markup(self) -> Markup:
        return Markup(
            assumed=dict(self.assumed),
            verified=dict(self.verified),
            fallbacks=tuple(self.fallbacks),
            recovered=self.recovered,
        )


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

    def page_kind(self, html: str, url: str) -> str | None:
        path = urlsplit(url).path
        if THREAD_PATH.match(path):
            return "thread"
        if FORUM_PATH.match(path):
            return "listing"
        soup = BeautifulSoup(html, "html.parser")
        if soup.select_one(POST_BODY) is not None:
            return "thread"
        if soup.select_one(LISTING_ROW) is not None:
            return "listing"
        return None

    def parse_listing(self, html: str, url: str) -> ListingPage:
        soup = BeautifulSoup(html, "html.parser")
        tally = _Tally()
        rows = soup.select(LISTING_ROW)
        tally.seen(LISTING_ROW, len(rows))
        threads: list[ThreadLink] = []
        for row in rows:
            href = str(row.get("href") or "")
            thread_id = thread_id_of(href)
            heading = row.select_one(LISTING_ROW_TITLE)
            if thread_id is None or heading is None:
                continue
            sticky = STICKY_CLASS in (row.get("class") or [])
            tally.guess(f"{LISTING_ROW}.{STICKY_CLASS}", int(sticky))
            threads.append(ThreadLink(thread_id, href, element_text(heading), sticky))
        tally.seen(f"{LISTING_ROW} {LISTING_ROW_TITLE}", len(threads))
        if rows and not threads:
            raise ParseError(
                f"{len(rows)} {LISTING_ROW} rows but none with a thread link and an <h2> title"
            )
        listing_path = urlsplit(url).path.rstrip("/")

        def same_listing(href: str) -> bool:
            path = urlsplit(href).path.rstrip("/")
            if FORUM_PATH.match(listing_path):
                return path == listing_path
            return FORUM_PATH.match(path) is not None  # a saved page: its own URL is unknown

        _, pages, has_next = _next_page(soup, soup, url, tally, same_listing)
        return ListingPage(
            threads=threads,
            has_next=bool(threads) and has_next,
            page_count=pages,
            markup=tally.markup(),
        )

    def parse_thread(self, html: str, url: str) -> ThreadPage:
        soup = BeautifulSoup(html, "html.parser")
        tally = _Tally()
        main = soup.select_one(THREAD_MAIN)
        tally.guess(THREAD_MAIN, int(main is not None))
        scope = main if main is not None else soup
        bodies = scope.select(POST_BODY)
        tally.seen(POST_BODY, len(bodies))
        if not bodies:
            if main is None:
                raise ParseError(
                    f"no {THREAD_MAIN} and no {POST_BODY}: not a thread page, or the layout changed"
                )
            raise ParseError(f"no posts: no {POST_ELEMENT} and no {POST_BODY}")

        thread_id = str(main.get(THREAD_ID_ATTR) or "").strip() if main is not None else ""
        tally.guess(f"{THREAD_MAIN}[{THREAD_ID_ATTR}]", int(bool(thread_id)))
        if not thread_id:
            thread_id = thread_id_of(url) or ""
            if not thread_id:
                raise ParseError(
                    f"no thread id: no {THREAD_ID_ATTR} on {THREAD_MAIN} and none in the URL {url}"
                )
            tally.fell_back(FALLBACK_THREAD_ID)
        title = _thread_title(soup, scope, tally)
        page, pages, has_next = _next_page(
            soup, scope, url, tally, lambda href: thread_id_of(href) == thread_id
        )

        containers = [el for el in scope.select(f"{POST_LIST} {POST_ELEMENT}") if _has_body(el)]
        tally.guess(f"{POST_LIST} {POST_ELEMENT}", len(containers))
        container_ids = {id(container) for container in containers}
        if containers and all(_inside(body, container_ids) for body in bodies):
            posts, first = _posts_from_containers(containers, thread_id, page, tally)
        else:
            tally.fell_back(FALLBACK_POSTS)
            for selector in (POST_AUTHOR, POST_DATE, POST_NUMBER):  # for the report only
                tally.guess(selector, len(scope.select(selector)))
            posts, first = _posts_from_bodies(bodies, thread_id, page, tally), None
        return ThreadPage(
            thread_id=thread_id,
            title=title,
            posts=posts,
            has_next=has_next,
            page_count=pages,
            author=first.author if first else None,
            created=first.created if first else None,
            markup=tally.markup(),
        )


def _thread_title(soup: BeautifulSoup, scope: Tag, tally: _Tally) -> str:
    """The heading's title (verified: titles hold `` - ``), else the page's ``<title>``."""
    title_el = scope.select_one(THREAD_TITLE)
    tally.guess(THREAD_TITLE, int(title_el is not None))
    title = element_text(title_el) if title_el is not None else ""
    title_tag = soup.title.get_text(" ", strip=True) if soup.title is not None else ""
    tally.seen("<title>", int(bool(title_tag)))
    if title:
        return title
    heading = scope.select_one(PAGE_HEADING)
    heading_text = element_text(heading) if heading is not None else ""
    # A heading <title> does not start with is the site's logo or a banner, not the thread's.
    if heading_text and (not title_tag or title_tag.startswith(heading_text)):
        tally.fell_back(FALLBACK_TITLE_HEADING)
        return heading_text
    if title_tag and title_from_title_tag(title_tag):
        tally.fell_back(FALLBACK_TITLE_TAG)
        return title_from_title_tag(title_tag)
    raise ParseError(f"no thread title ({THREAD_TITLE}, <{PAGE_HEADING}> or <title>)")


def _next_page(
    soup: BeautifulSoup, scope: Tag, url: str, tally: _Tally, same_pages: Callable[[str], bool]
) -> tuple[int, int | None, bool]:
    """(this page's number, the page count, whether a next page exists) from the assumed
    pagination, else from any absolute link to ``page=N+1`` of the same thread or listing
    (verified); the number is the pagination's, else the URL's."""
    element = soup.select_one(PAGINATION)
    tally.guess(PAGINATION, int(element is not None))
    current = _int_attr(element, "data-page") if element is not None else None
    pages = _int_attr(element, "data-pages") if element is not None else None
    next_link = tally.guess(NEXT_LINK, len(scope.select(NEXT_LINK)))
    head_next = tally.guess(HEAD_NEXT, len(soup.select(HEAD_NEXT)))
    assumed = bool(next_link or head_next) or (
        current is not None and pages is not None and current < pages
    )
    number = current if current is not None else page_number_of(url)
    wanted = number + 1
    page_host = urlsplit(url).netloc
    by_link = False
    for link in soup.select("a[href], link[href]"):
        href = str(link.get("href") or "")
        parts = urlsplit(href)
        if parts.scheme not in ("http", "https"):
            continue  # verified: the site's page links are absolute
        if parts.hostname not in CANONICAL_HOSTS and parts.netloc != page_host:
            continue
        if same_pages(href) and page_number_of(href) == wanted:
            by_link = True
            break
    tally.seen(NEXT_BY_URL, int(by_link))
    if by_link and not assumed:
        tally.fell_back(FALLBACK_NEXT)
    return number, pages, assumed or by_link


def _int_attr(element: Tag, name: str) -> int | None:
    value = str(element.get(name) or "").strip()
    return int(value) if value.isdigit() else None


def _has_body(element: Tag) -> bool:
    return element.select_one(POST_BODY) is not None


def _inside(element: Tag, ids: set[int]) -> bool:
    """Whether ``element`` sits inside one of the elements whose ``id()`` is in ``ids``."""
    return any(id(parent) in ids for parent in element.parents)


def _separate(elements: list[Tag], tally: _Tally) -> None:
    """Take every element out of any other it sits in (innermost first), as a browser shows
    posts that a post's unclosed tags swallowed: one after the other, each with its own text."""
    ids = {id(element) for element in elements}
    for element in reversed(elements):
        if _inside(element, ids):
            tally.recovered += 1
            element.extract()


def _posts_from_containers(
    containers: list[Tag], thread_id: str, page: int, tally: _Tally
) -> tuple[list[Post], Post | None]:
    first_is_opening = FIRST_POST_CLASS in (containers[0].get("class") or [])
    tally.guess(f"{POST_ELEMENT}.{FIRST_POST_CLASS}", int(first_is_opening))
    _separate(containers, tally)
    posts: list[Post] = []
    seen: set[str] = set()
    for index, element in enumerate(containers, start=1):
        post_id = str(element.get(POST_ID_ATTR) or "").strip()
        if not post_id:
            post_id = str(element.get("id") or "").removeprefix("post-")
        tally.guess(f"{POST_ELEMENT}[{POST_ID_ATTR}]", int(post_id.isdigit()))
        if not post_id.isdigit():
            tally.fell_back(FALLBACK_POST_IDS)
            post_id = derived_post_id(thread_id, page, index)
        if post_id in seen:
            continue
        seen.add(post_id)
        body = element.select_one(POST_BODY)
        if body is None:
            continue  # its only body was a swallowed post's, now a post of its own
        number = _text_of(element, POST_NUMBER, tally).lstrip("#").strip()
        following = posts[-1].position + 1 if posts else index
        position = int(number) if number.isdigit() else following
        author = _text_of(element, POST_AUTHOR, tally) or None
        created = parse_posted(_text_of(element, POST_DATE, tally))
        deleted = DELETED_POST_CLASS in (element.get("class") or [])
        posts.append(
            _post_from_body(element, body, post_id, position, author, created, deleted, tally)
        )
    return posts, posts[0] if first_is_opening else None


def _posts_from_bodies(bodies: list[Tag], thread_id: str, page: int, tally: _Tally) -> list[Post]:
    """Posts from the verified ``div.post-body`` alone: no ids, authors or dates on the page."""
    _separate(bodies, tally)
    return [
        _post_from_body(
            body, body, derived_post_id(thread_id, page, index), index, None, None, False, tally
        )
        for index, body in enumerate(bodies, start=1)
    ]


def _post_from_body(
    element: Tag,
    body: Tag,
    post_id: str,
    position: int,
    author: str | None,
    created: str | None,
    deleted: bool,
    tally: _Tally,
) -> Post:
    """One post from its own part of the page (``element``, the posts nested in it removed)."""
    html = str(element)
    for footer in element.select(POST_FOOTER):
        footer.decompose()  # swallowed into the body by an unclosed tag, it is still no text
    signature_el = element.select_one(SIGNATURE)
    tally.guess(SIGNATURE, int(signature_el is not None))
    signature = ""
    if signature_el is not None:
        signature = element_text(signature_el)
        signature_el.decompose()
    deleted = deleted or body.select_one(DELETED_NOTE) is not None
    tally.guess(f"{POST_ELEMENT}.{DELETED_POST_CLASS}, {DELETED_NOTE}", int(deleted))
    if deleted:
        return Post(post_id, position, author, created, html, "", signature=signature, deleted=True)
    quotes = tuple(_take_quotes(body, tally))
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


def _take_quotes(body: Tag, tally: _Tally) -> list[Quote]:
    """Remove the reply's top-level quotes from ``body`` and return them.

    A quote nested inside a quote is what the quoted post itself quoted: it is
    dropped with its parent, not reported as quoted by this reply. Without the
    assumed ``blockquote.quote``, any ``<blockquote>`` in the body is a quote
    (verified: quoted text sits inside the reply's body, before its own text).
    """
    selector = QUOTE
    blocks = _top_level(body, body.select(QUOTE))
    tally.guess(QUOTE, len(blocks))
    if not blocks:
        blocks = _top_level(body, body.select(QUOTE_FALLBACK))
        if blocks:
            selector = QUOTE_FALLBACK
            tally.fell_back(FALLBACK_QUOTES)
    quotes: list[Quote] = []
    for block in blocks:
        author_el = block.select_one(f":scope > {QUOTE_AUTHOR}")
        author = None
        if author_el is not None:
            author = re.sub(r"\s+wrote:?\s*$", "", element_text(author_el)) or None
            author_el.decompose()
        for nested in block.select(selector):
            nested.decompose()
        text = element_text(block)
        if author is None:  # "name wrote:" as the quote's first line, whatever its markup
            first, _, rest = text.partition("\n")
            match = QUOTE_AUTHOR_LINE.match(first.strip())
            if match:
                author, text = match.group(1), rest.strip()
        quoted_id = str(block.get(POST_ID_ATTR) or "").strip() or None
        quotes.append(Quote(quoted_id, author, text))
        block.decompose()
    return quotes


def _top_level(body: Tag, blocks: list[Tag]) -> list[Tag]:
    return [
        block
        for block in blocks
        if not any(parent.name == "blockquote" for parent in _parents_until(block, body))
    ]


def _parents_until(element: Tag, stop: Tag) -> Iterator[Tag]:
    for parent in element.parents:
        if parent is stop:
            return
        yield parent


def _text_of(element: Tag, selector: str, tally: _Tally) -> str:
    found = element.select_one(selector)
    tally.guess(selector, int(found is not None))
    return element_text(found) if found is not None else ""
