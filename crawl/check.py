"""``python -m crawl check``: what the parser makes of one page, before a long crawl trusts it.

Much of the site's markup is a guess (see docs/crawl.md). A crawl that meets a
wrong guess falls back to the verified anchors and says so at its end; this
command says it up front, for one listing or thread page fetched politely
(robots.txt obeyed) or read from a saved file, so an operator can fix a
selector before spending hours on a crawl.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from crawl.errors import CrawlError
from crawl.fetcher import Fetcher, FetchOptions, origin_of
from crawl.site import ForumSite, ListingPage, Markup, ParseError, ThreadPage

SHOWN_ROWS = 5
EXCERPT = 70


def is_url(target: str) -> bool:
    return urlsplit(target).scheme in ("http", "https")


async def fetch_page(url: str, options: FetchOptions) -> tuple[str, str]:
    """(the page's HTML, the URL it was served from), or a CrawlError saying why not."""
    async with Fetcher.open(origin_of(url), options) as fetcher:
        result = await fetcher.fetch(url)
    if result.state == "disallowed":
        raise CrawlError(
            f"robots.txt of {origin_of(url)} disallows {url} for this user agent: "
            "check a page the crawl may fetch"
        )
    if result.state != "ok":
        raise CrawlError(f"cannot fetch {url} ({result.error or result.state})")
    return result.text, result.final_url


def read_saved(path: Path, url: str | None) -> tuple[str, str]:
    """(a saved page's HTML, the URL to parse it as: ``url`` when given, else the file's)."""
    if not path.is_file():
        raise CrawlError(f"{path} is neither a file nor an http(s) URL: give a saved page or a URL")
    return path.read_text(encoding="utf-8", errors="replace"), url or path.resolve().as_uri()


def check_page(site: ForumSite, html: str, url: str) -> str:
    """The report on one page: what the parser found, and which selectors held or fell back."""
    kind = site.page_kind(html, url)
    if kind is None:
        raise CrawlError(
            f"{url}: neither a listing nor a thread page as far as the parser can tell "
            "(no listing rows, no post bodies); a saved page: give its URL with --url"
        )
    try:
        page = site.parse_thread(html, url) if kind == "thread" else site.parse_listing(html, url)
    except ParseError as exc:
        raise CrawlError(f"{url}: nothing could be read as a {kind} page: {exc}") from None
    lines = [f"{kind} page {url}"]
    if isinstance(page, ThreadPage):
        lines += _thread_lines(page)
    else:
        lines += _listing_lines(page)
    return "\n".join(lines + _markup_lines(page.markup))


def _thread_lines(page: ThreadPage) -> list[str]:
    posts = page.posts
    count = len(posts)
    lines = [
        f"  title: {page.title}  (thread {page.thread_id})",
        f"  posts: {count}  authors: {sum(p.author is not None for p in posts)}/{count}  "
        f"dates: {sum(p.created is not None for p in posts)}/{count}  "
        f"quotes: {sum(len(p.quotes) for p in posts)}  edited: {sum(p.edited for p in posts)}  "
        f"deleted: {sum(p.deleted for p in posts)}  "
        f"signatures: {sum(bool(p.signature) for p in posts)}",
        f"  recovered: {page.markup.recovered} posts read out of posts that swallowed them",
        f"  next page: {'yes' if page.has_next else 'no'}  page count: {page.page_count or '?'}",
    ]
    for post in posts[:SHOWN_ROWS]:
        text = " ".join(post.text.split())
        excerpt = text if len(text) <= EXCERPT else text[: EXCERPT - 1] + "…"
        quoted = f" [quotes {len(post.quotes)}]" if post.quotes else ""
        lines.append(
            f"    #{post.position} {post.post_id} {post.author or '(no author)'} "
            f"{post.created or '(no date)'}{quoted}: {excerpt or '(no text)'}"
        )
    if count > SHOWN_ROWS:
        lines.append(f"    … {count - SHOWN_ROWS} more")
    return lines


def _listing_lines(page: ListingPage) -> list[str]:
    threads = page.threads
    lines = [
        f"  threads: {len(threads)}  sticky: {sum(t.sticky for t in threads)}  "
        f"next page: {'yes' if page.has_next else 'no'}  page count: {page.page_count or '?'}"
    ]
    lines += [f"    {t.thread_id} {t.title}  {t.url}" for t in threads[:SHOWN_ROWS]]
    if len(threads) > SHOWN_ROWS:
        lines.append(f"    … {len(threads) - SHOWN_ROWS} more")
    return lines


def _markup_lines(markup: Markup) -> list[str]:
    rows = [("verified", s, n) for s, n in markup.verified.items()]
    rows += [("assumed", s, n) for s, n in markup.assumed.items()]
    width = max(len(selector) for _, selector, _ in rows)
    lines = ["selectors (verified: seen on the live site; assumed: a guess to check):"]
    for kind, selector, count in rows:
        note = "   matched nothing" if count == 0 else ""
        lines.append(f"  {kind:<8}  {selector:<{width}}  {count:>3}{note}")
    lines.append(f"fallbacks used: {', '.join(markup.fallbacks) or 'none'}")
    return lines
