"""Keeping the store's search index in step with its posts.

A thread's passages are recomputed whole from its stored posts whenever a page
of it arrives (``crawl fetch``) or on demand (``crawl index``): the same
function either way, so an index built as pages came in and one rebuilt from
scratch are the same index. Each thread is committed on its own, so an
interrupted ``crawl index`` keeps what it did and goes on from there.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from crawl.clean import clean_text, normalise
from crawl.rules import judge_reply, text_key, thread_prompt
from crawl.store import Store, ThreadRow


@dataclass
class IndexSummary:
    threads: int = 0
    passages: int = 0

    def describe(self, db: object) -> str:
        return f"indexed {self.passages} passages from {self.threads} threads in {db}"


def index_thread(store: Store, thread: ThreadRow) -> int:
    """Replace ``thread``'s passages with those its stored posts give now; returns how many."""
    posts = store.posts(thread.id)
    passages: list[dict[str, object]] = []
    if posts and posts[0].page == 1 and posts[0].position == 1:
        opening = posts[0]
        prompt = thread_prompt(thread.title, opening)
        title = clean_text(thread.title).text
        for reply in posts[1:]:
            verdict = judge_reply(reply, prompt=prompt, opening=opening)
            if verdict.reason is not None:
                continue
            passages.append(
                {
                    "post_id": reply.id,
                    "thread_id": thread.id,
                    "title": title,
                    "text": verdict.text,
                    "author": reply.author,
                    "created": reply.created,
                    "url": store.post_url(thread, reply),
                    "text_key": text_key(verdict.text),
                }
            )
    # The copypasta rule counts every readable post's text, as the dataset's first pass does.
    keys = []
    for post in posts:
        text = "" if post.deleted else clean_text(post.text).text
        if normalise(text):
            keys.append((post.id, text_key(text)))
    store.replace_passages(thread.id, passages, keys)
    return len(passages)


def index_pending(store: Store, *, progress: bool | None = None) -> IndexSummary:
    """Index every thread whose posts changed since it was last indexed.

    ``progress``: a bar on or off; ``None`` shows one when stderr is a terminal.
    """
    summary = IndexSummary()
    pending = store.unindexed_threads()
    disable = None if progress is None else not progress
    for thread in tqdm(pending, unit="thread", desc="index", disable=disable):
        summary.passages += index_thread(store, thread)
        summary.threads += 1
    return summary
