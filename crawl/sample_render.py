"""Render a forum described in a compact YAML file into static pages in the site's markup.

The bundled sample forum (``crawl/sample_forum``) and the test fixtures are
produced this way, so their HTML follows one template, the markup described in
``docs/crawl.md`` ("What is known of newschoolers.com"), and a content edit
never means hand-editing forty pages. What is served and parsed is the rendered
HTML, committed beside the YAML; ``python -m crawl.sample_render CONTENT.yaml
OUT_DIR`` regenerates it.

``--markup verified`` renders only what was verified on the live site: listing
rows ``a.thread`` with an ``h2``, post text in bare ``div.post-body`` elements
(quoted text inside, before the reply), the ``<title>`` and absolute
``page=N`` links. No post containers, ids, authors, dates, pagination block,
signatures or deletion notes: what a crawl gets if every guess is wrong.

Layout written under OUT_DIR (what :mod:`crawl.sample_site` serves)::

    robots.txt
    forum/<id>/<Slug>/page-<N>.html, past-end.html   listing pages, empty listing
    forum/thread/<id>/<Slug>/page-<N>.html           thread pages
"""

from __future__ import annotations

import argparse
import html
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from crawl.newschoolers import slugify

CANONICAL = "https://www.newschoolers.com"
BARE_HOST = "https://newschoolers.com"
FIRST_POST_ID = 4_800_001
EPOCH = datetime(2023, 1, 5, 7, 55, 40)

# A mapping from the content YAML, as yaml.safe_load returns it.
YamlMapping = dict[str, Any]


@dataclass(frozen=True)
class _Thread:
    id: int
    title: str
    sticky: bool
    posts: list[YamlMapping]
    index: int

    @property
    def slug(self) -> str:
        return slugify(self.title)

    def path(self) -> str:
        return f"/forum/thread/{self.id}/{self.slug}"


def php_escape(text: str) -> str:
    """Escape like PHP's ``htmlspecialchars(ENT_QUOTES)``: the site's ``&#039;`` entities."""
    return html.escape(text, quote=False).replace('"', "&quot;").replace("'", "&#039;")


def posted(moment: datetime) -> str:
    """``Jan 8th 2024 at 7:55:40am``, the site's date format."""
    day = moment.day
    suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    hour = moment.hour % 12 or 12
    ampm = "am" if moment.hour < 12 else "pm"
    return f"{moment:%b} {day}{suffix} {moment.year} at {hour}:{moment:%M:%S}{ampm}"


MARKUPS = ("full", "verified")


def render(content_path: Path, out_dir: Path, markup: str = "full") -> int:
    """Write the pages for ``content_path`` into ``out_dir`` (replaced); returns the page count."""
    if markup not in MARKUPS:
        raise ValueError(f"markup {markup!r}: give one of {', '.join(MARKUPS)}")
    verified = markup == "verified"
    spec = yaml.safe_load(content_path.read_text(encoding="utf-8"))
    forum = spec["forum"]
    threads = [
        _Thread(int(t["id"]), t["title"], bool(t.get("sticky")), t["posts"], i)
        for i, t in enumerate(spec["threads"])
    ]
    by_id = {t.id: t for t in threads}
    spec_by_id = {int(t["id"]): t for t in spec["threads"]}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / "robots.txt").write_text(spec["robots"], encoding="utf-8")
    pages = 1

    forum_path = f"/forum/{forum['id']}/{forum['slug']}"
    layout = spec.get("listing") or _default_listing(threads, int(forum["threads_per_page"]))
    listing_dir = out_dir / forum_path.lstrip("/")
    listing_dir.mkdir(parents=True)
    for number, rows in enumerate(layout, start=1):
        body = "\n".join(_listing_row(row, by_id, verified) for row in rows)
        page = _listing_page(forum, forum_path, body, number, len(layout), verified)
        (listing_dir / f"page-{number}.html").write_text(page, encoding="utf-8")
        pages += 1
    (listing_dir / "past-end.html").write_text(
        _listing_page(forum, forum_path, "", len(layout) + 1, len(layout), verified),
        encoding="utf-8",
    )

    post_id = FIRST_POST_ID
    per_page = int(spec["posts_per_page"])
    for thread in threads:
        ids = list(range(post_id, post_id + len(thread.posts)))
        post_id += len(thread.posts)
        if spec_by_id[thread.id].get("missing"):
            continue  # listed, but the site answers 404 for it
        chunks = [range(i, min(i + per_page, len(ids))) for i in range(0, len(ids), per_page)]
        thread_dir = out_dir / thread.path().lstrip("/")
        thread_dir.mkdir(parents=True)
        for number, chunk in enumerate(chunks, start=1):
            if verified:
                posts_html = "\n".join(_verified_post(thread, i) for i in chunk)
            else:
                posts_html = "\n".join(_post(thread, forum, ids, i) for i in chunk)
            page = _thread_page(thread, forum, posts_html, number, len(chunks), verified)
            (thread_dir / f"page-{number}.html").write_text(page, encoding="utf-8")
            pages += 1
    return pages


def _default_listing(threads: list[_Thread], per_page: int) -> list[list[int]]:
    sticky = [t.id for t in threads if t.sticky]
    normal = [t.id for t in threads if not t.sticky]
    return [sticky + normal[i : i + per_page] for i in range(0, len(normal), per_page)]


def _listing_row(row: int | str, by_id: dict[int, _Thread], verified: bool) -> str:
    """One listing row; ``"<id>:bare"`` links to the slugless URL the site redirects."""
    thread_id, _, variant = str(row).partition(":")
    thread = by_id[int(thread_id)]
    host = BARE_HOST if thread.index % 7 == 3 else CANONICAL
    href = f"{host}/forum/thread/{thread.id}" if variant == "bare" else host + thread.path()
    if verified:
        return f'<a class="thread" href="{href}">\n  <h2>{php_escape(thread.title)}</h2>\n</a>'
    classes = "thread sticky" if thread.sticky else "thread"
    replies = len(thread.posts) - 1
    return (
        f'<a class="{classes}" href="{href}">\n'
        f"  <h2>{php_escape(thread.title)}</h2>\n"
        f'  <span class="thread-meta">by {php_escape(thread.posts[0]["by"])} · {replies} replies</span>\n'
        "</a>"
    )


def _head(
    title: str, canonical: str, prev_url: str | None, next_url: str | None, verified: bool
) -> str:
    links = [f'<link rel="canonical" href="{canonical}">']
    if prev_url:
        links.append(f'<link rel="prev" href="{prev_url}">')
    if next_url:
        links.append(f'<link rel="next" href="{next_url}">')
    if verified:
        links = []
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n" + "".join(f"{link}\n" for link in links) + "</head>\n<body>\n"
        '<div class="guest-banner">Welcome to Newschoolers! <a href="https://www.newschoolers.com/join">'
        "Join the community</a> to post, vote and follow your favourite skiers.</div>\n"
    )


def _page_url(path: str, number: int) -> str:
    return CANONICAL + path + ("" if number == 1 else f"?page={number}")


def _pagination(path: str, number: int, count: int, verified: bool) -> str:
    if count <= 1:
        return ""
    links = []
    for n in range(1, count + 1):
        current = ' class="current"' if n == number and not verified else ""
        links.append(f'<a href="{_page_url(path, n)}"{current}>{n}</a>')
    if number < count:
        attributes = "" if verified else ' class="next" rel="next"'
        links.append(f'<a{attributes} href="{_page_url(path, number + 1)}">Next &raquo;</a>')
    if verified:
        return f"<div>{' '.join(links)}</div>\n"
    return f'<div class="pagination" data-page="{number}" data-pages="{count}">{" ".join(links)}</div>\n'


def _listing_page(
    forum: YamlMapping, path: str, rows: str, number: int, count: int, verified: bool
) -> str:
    prev_url = _page_url(path, number - 1) if number > 1 else None
    next_url = _page_url(path, number + 1) if number < count else None
    head = _head(
        f"{forum['name']} - Forum - Newschoolers.com",
        _page_url(path, number),
        prev_url,
        next_url,
        verified,
    )
    pagination = _pagination(path, number, count, verified) if number <= count else ""
    if verified:
        return head + f"<main>\n<div>\n{rows}\n</div>\n{pagination}</main>\n</body>\n</html>\n"
    return (
        head
        + f'<main id="forum" data-forum-id="{forum["id"]}">\n<h1 class="forum-title">{forum["name"]}</h1>\n'
        + f'<div class="threads">\n{rows}\n</div>\n{pagination}</main>\n</body>\n</html>\n'
    )


def _thread_page(
    thread: _Thread, forum: YamlMapping, posts: str, number: int, count: int, verified: bool
) -> str:
    path = thread.path()
    prev_url = _page_url(path, number - 1) if number > 1 else None
    next_url = _page_url(path, number + 1) if number < count else None
    title = php_escape(thread.title)
    head = _head(
        f"{title} - {forum['name']} - Newschoolers.com",
        _page_url(path, number),
        prev_url,
        next_url,
        verified,
    )
    pagination = _pagination(path, number, count, verified)
    if verified:  # no heading: the title is only in <title>
        return head + f"<main>\n<div>\n{posts}\n</div>\n{pagination}</main>\n</body>\n</html>\n"
    return (
        head
        + f'<main id="thread" data-thread-id="{thread.id}">\n<h1 class="thread-title">{title}</h1>\n'
        + pagination
        + f'<div class="posts">\n{posts}\n</div>\n{pagination}</main>\n</body>\n</html>\n'
    )


def _body_html(text: str, raw_html: bool) -> str:
    text = text.strip("\n")
    return text if raw_html else php_escape(text).replace("\n", "<br />\n")


def _moment(thread: _Thread, index: int) -> datetime:
    return EPOCH + timedelta(days=3 * thread.index, minutes=41 * index, seconds=7 * thread.id % 60)


def _edit_notice(index: int, moment: datetime) -> str:
    what = "thread" if index == 0 else "post"
    return f"<br />\n<br />\n**This {what} was edited on {posted(moment + timedelta(hours=2, minutes=13))}"


def _verified_post(thread: _Thread, index: int) -> str:
    """A post as far as it is verified: its text in a ``div.post-body``, any quote first."""
    post = thread.posts[index]
    body = ""
    if not post.get("deleted"):  # how the site marks a deleted post is not known
        if "quote" in post:
            quoted = int(post["quote"]) - 1
            quoted_text = post.get("quote_text") or thread.posts[quoted]["text"]
            body += (
                f"<blockquote>{php_escape(thread.posts[quoted]['by'])} wrote:<br />\n"
                f"{_body_html(quoted_text, bool(post.get('quote_html')))}</blockquote>\n"
            )
        body += _body_html(post["text"], bool(post.get("html")))
        if post.get("edited"):
            body += _edit_notice(index, _moment(thread, index))
    return f'<div class="post-body">{body}</div>'


def _post(thread: _Thread, forum: YamlMapping, ids: list[int], index: int) -> str:
    post = thread.posts[index]
    post_id = ids[index]
    moment = _moment(thread, index)
    author = php_escape(post["by"])
    classes = ["post"]
    if index == 0:
        classes.append("first-post")
    if post.get("deleted"):
        classes.append("post-deleted")
        body = '<em class="deleted-note">This post was deleted by a moderator.</em>'
    else:
        body = ""
        if "quote" in post:
            quoted = int(post["quote"]) - 1
            quoted_text = post.get("quote_text") or thread.posts[quoted]["text"]
            body += (
                f'<blockquote class="quote" data-post-id="{ids[quoted]}">'
                f'<div class="quote-author">{php_escape(thread.posts[quoted]["by"])} wrote:</div>'
                f"{_body_html(quoted_text, bool(post.get('quote_html')))}</blockquote>\n"
            )
        body += _body_html(post["text"], bool(post.get("html")))
        if post.get("edited"):
            body += _edit_notice(index, moment)
    sig = f'\n  <div class="sig">{_body_html(post["sig"], False)}</div>' if post.get("sig") else ""
    karma = (post_id * 7) % 13
    return (
        f'<div class="{" ".join(classes)}" id="post-{post_id}" data-post-id="{post_id}">\n'
        f'  <div class="post-header"><a class="username" href="{CANONICAL}/u/{author}/">{author}</a>'
        f'<div class="post-date">Posted: {posted(moment)}</div>'
        f'<a class="post-number" href="{CANONICAL}{thread.path()}#post-{post_id}">#{index + 1}</a></div>\n'
        f'  <div class="post-body">{body}</div>{sig}\n'
        f'  <div class="post-footer"><a href="{CANONICAL}/forum/reply/{thread.id}/?quote={post_id}">Quote</a> '
        f'<a href="{CANONICAL}/forum/print/{post_id}/">Print</a> '
        f'<span class="karma">{karma}</span></div>\n</div>'
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crawl.sample_render", description=__doc__)
    parser.add_argument("content", type=Path, help="the forum's YAML content file")
    parser.add_argument("out", type=Path, help="directory to write the pages to (replaced)")
    parser.add_argument(
        "--markup",
        choices=MARKUPS,
        default="full",
        help="full: the assumed markup too; verified: only what was seen on the live site",
    )
    args = parser.parse_args(argv)
    count = render(args.content, args.out, args.markup)
    print(f"rendered {count} files into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
