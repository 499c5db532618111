"""Forum stores built in a test, thread by thread, without a crawl."""

from __future__ import annotations

from pathlib import Path

from crawl.site import Post, ThreadLink, ThreadPage
from crawl.store import PageRecord, Store


def add_thread(store: Store, thread_id: str, title: str, posts: list[dict]) -> None:
    """Store a one-page thread; each post dict gives text and optionally author/quotes/..."""
    url = f"http://forum.test/forum/thread/{thread_id}/t"
    listing = PageRecord(
        url=f"http://forum.test/forum/1/F?page={thread_id}", kind="listing", number=1, state="ok"
    )
    store.save_listing(listing, "forum/1/F", [(ThreadLink(thread_id, url, title), url)])
    parsed = [
        Post(
            post_id=f"{thread_id}{i:03d}",
            position=i + 1,
            author=p.get("by", f"user{i}"),
            created=None,
            html="<div></div>",
            text=p.get("text", ""),
            quotes=tuple(p.get("quotes", ())),
            signature=p.get("sig", ""),
            edited=False,
            deleted=p.get("deleted", False),
        )
        for i, p in enumerate(posts)
    ]
    page = ThreadPage(thread_id, title, parsed, has_next=False, author=parsed[0].author)
    record = PageRecord(url=url, kind="thread", thread_id=thread_id, number=1, state="ok")
    store.save_thread_page(record, page)


def make_store(tmp_path: Path, threads: dict[str, tuple[str, list[dict]]]) -> Path:
    db = tmp_path / "forum.sqlite"
    with Store.open(db) as store:
        for thread_id, (title, posts) in threads.items():
            add_thread(store, thread_id, title, posts)
    return db
