"""What the crawler needs from a forum site, and nothing about any particular one.

The crawler walks listings and thread pages through this interface only; every
URL rule and selector of a real site lives in that site's module (see
:mod:`crawl.newschoolers`). Adding a forum is one new module registered in
:mod:`crawl.site_loader`, with no change to the crawler, the store or the
dataset builder. Site modules import this interface; nothing here imports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


class ParseError(Exception):
    """Nothing on a page could be read; the crawl records it and goes on."""


@dataclass(frozen=True)
class Markup:
    """How a page met the site module's selectors, so a wrong guess about the markup shows.

    A site module parses what it can and says here what it had to work around:
    the crawl reports it once per run, the store keeps it per page, and
    ``python -m crawl check`` prints it for one page.
    """

    # Elements each selector matched on the page, for the selectors guessed (assumed) and
    # those seen on the real site (verified).
    assumed: Mapping[str, int] = field(default_factory=dict)
    verified: Mapping[str, int] = field(default_factory=dict)
    # Names of the fallbacks the page needed, e.g. "posts:div.post-body".
    fallbacks: tuple[str, ...] = ()
    # Posts read out of another post whose unclosed tags had swallowed them.
    recovered: int = 0


@dataclass(frozen=True)
class ThreadLink:
    """One row of a forum listing."""

    thread_id: str
    url: str
    title: str
    sticky: bool = False


@dataclass(frozen=True)
class ListingPage:
    """A page of a forum's thread listing; no threads means the listing has ended."""

    threads: list[ThreadLink]
    has_next: bool
    page_count: int | None = None
    markup: Markup = field(default_factory=Markup)


@dataclass(frozen=True)
class Quote:
    """An earlier post quoted at the top of a reply."""

    post_id: str | None
    author: str | None
    text: str


@dataclass(frozen=True)
class Post:
    """One post as the site shows it.

    ``text`` is the post's own text (quotes and signature held apart) exactly as
    the reader sees it, bbcode and "edited on" lines included: what to keep is
    the dataset builder's decision, made and counted there. ``position`` is the
    post's number in the thread when the page shows one, else its place on the
    page: either way, page then position is reading order.
    """

    post_id: str
    position: int
    author: str | None
    created: str | None
    html: str
    text: str
    quotes: tuple[Quote, ...] = ()
    signature: str = ""
    edited: bool = False
    deleted: bool = False


@dataclass(frozen=True)
class ThreadPage:
    """One page of a thread."""

    thread_id: str
    title: str
    posts: list[Post]
    has_next: bool
    page_count: int | None = None
    author: str | None = None  # of the opening post, on a thread's first page
    created: str | None = None
    markup: Markup = field(default_factory=Markup)


class ForumSite(Protocol):
    """A forum's URL rules and page parsers."""

    name: str
    default_forum_url: str
    canonical_hosts: frozenset[str]

    def check_forum_url(self, url: str) -> str:
        """Return the forum's name (e.g. ``forum/1/Ski-Gabber``) or raise ValueError saying why not."""
        ...

    def listing_url(self, forum_url: str, page: int) -> str:
        """The URL of listing page ``page`` (1-based) of the forum at ``forum_url``."""
        ...

    def thread_url(self, thread_url: str, page: int) -> str:
        """The URL of page ``page`` (1-based) of the thread whose first page is ``thread_url``."""
        ...

    def parse_listing(self, html: str, url: str) -> ListingPage:
        """Parse a listing page; raises :class:`ParseError` on an unexpected layout."""
        ...

    def parse_thread(self, html: str, url: str) -> ThreadPage:
        """Parse a thread page; raises :class:`ParseError` when nothing in it can be read."""
        ...

    def page_kind(self, html: str, url: str) -> str | None:
        """``"listing"`` or ``"thread"`` for a page (by its URL, else its content), or None."""
        ...
