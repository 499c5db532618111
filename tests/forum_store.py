"""Forum stores for tests: built thread by thread without a crawl, or the sample forum crawled.

``crawl_sample_forum`` builds one the way an operator does (``python -m crawl
serve-sample`` and ``crawl fetch``), so grounding is tested against the index
``fetch`` keeps, not a hand-made table.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from crawl.site import Post, ThreadLink, ThreadPage
from crawl.store import PageRecord, Store

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def serve_sample(site_dir: Path | None = None) -> Iterator[str]:
    """``python -m crawl serve-sample`` in a subprocess; yields the forum URL it prints."""
    argv = [sys.executable, "-m", "crawl", "serve-sample", "--port", "0"]
    if site_dir is not None:
        argv += ["--dir", str(site_dir)]
    server = subprocess.Popen(
        argv,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("serving sample forum at http://127.0.0.1:"), line
        yield line.split(" at ", 1)[1].strip()
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0


def crawl_sample_forum(db: Path) -> Path:
    """Serve the sample forum on 127.0.0.1, crawl it into ``db`` with no delay; returns ``db``."""
    with serve_sample() as forum_url:
        # A process of its own: the fixture may be first asked for inside a running event loop.
        argv = ["fetch", "--forum-url", forum_url, "--db", str(db), "--delay", "0"]
        crawl = subprocess.run(
            [sys.executable, "-m", "crawl", *argv], cwd=REPO, capture_output=True, text=True
        )
        assert crawl.returncode == 0, crawl.stderr[-2000:]
    return db


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
