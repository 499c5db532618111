"""The question/answer dataset: store → cleaned prompt/completion rows → train/test JSONL + stats.

One thread gives one prompt (its title and opening post) and one row per reply
that answers it. Text pasted into several threads (shop ads, signatures,
copypasta) is found in a first pass over the whole store and kept out of every
thread, not only after its first copy. The split is by thread, so no question
is seen in training and then tested on; which split a thread lands in depends
only on the seed and its id, so crawling more threads later moves none of the
old ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from crawl.clean import EDITS, Cleaned, clean_text, normalise
from crawl.errors import CrawlError
from crawl.index import index_pending
from crawl.rules import MAX_CHARS, MIN_ANSWER_CHARS, judge_reply, text_key, thread_prompt
from crawl.store import Store, StoredPost, ThreadRow

# One line of train.jsonl / test.jsonl: trl's conversational prompt/completion pair and the
# post it came from. A plain dict, since it is written as JSON and read back by other stages.
Row = dict[str, Any]

# Drop rules in the order they are tried; stats.json lists every one, zero or not.
DROP_RULES = (
    "deleted",
    "empty",
    "image_only",
    "url_only",
    "emoji_only",
    "too_short",
    "too_long",
    "copypasta",
    "repeats_question",
    "by_question_author",
    "duplicate",
    "near_duplicate",
    "prompt_too_long",
)


@dataclass(frozen=True)
class DatasetOptions:
    test_fraction: float = 0.1
    seed: int = 0
    min_answer_chars: int = MIN_ANSWER_CHARS
    max_chars: int = MAX_CHARS
    tokenizer: str | None = None
    copypasta_threads: int = 3  # text in this many different threads is spam, not an answer
    context: int = 0  # passages from the search index in each prompt (crawl.layout)
    distractors: float = 0.2  # with context: share of rows shown only other threads' passages


def find_copypasta(posts_by_thread: Iterable[list[StoredPost]], threads: int) -> set[bytes]:
    """Keys of the texts posted, verbatim or nearly (the near-duplicate key), in ``threads``
    or more different threads: shop ads, signatures and copypasta, not answers."""
    seen_in: defaultdict[bytes, set[str]] = defaultdict(set)
    for posts in posts_by_thread:
        for post in posts:
            text = "" if post.deleted else clean_text(post.text).text
            if normalise(text):
                seen_in[text_key(text)].add(post.thread_id)
    return {key for key, thread_ids in seen_in.items() if len(thread_ids) >= threads}


class _Builder:
    """Turns threads into rows, keeping the counts stats.json reports."""

    def __init__(self, store: Store, options: DatasetOptions, copypasta: set[bytes]) -> None:
        self.store = store
        self.options = options
        self.copypasta = copypasta
        self.dropped: Counter[str] = Counter({rule: 0 for rule in DROP_RULES})
        self.edited: Counter[str] = Counter({name: 0 for name, _ in EDITS})
        self.seen_exact: set[str] = set()
        self.seen_near: set[str] = set()
        self.threads = 0
        self.posts = 0
        self.quote_context = 0

    def rows(self, thread: ThreadRow, posts: list[StoredPost]) -> list[Row]:
        self.threads += 1
        self.posts += len(posts)
        opening, replies = posts[0], posts[1:]
        if not opening.deleted:
            self._clean(opening)  # counts the question's edits
        base_prompt = thread_prompt(thread.title, opening)
        by_id = {post.id: post for post in posts}
        rows = []
        for reply in replies:
            reason, answer = self._answer(reply, base_prompt, opening)
            context = self._quote_context(reply, posts, by_id) if reason is None else ""
            prompt = base_prompt + context
            if reason is None and len(prompt) > self.options.max_chars:
                reason = "prompt_too_long"
            if reason is not None:
                self.dropped[reason] += 1
                continue
            # Only a kept answer makes later copies duplicates, and only a kept row counts.
            self.seen_exact.add(answer)
            self.seen_near.add(normalise(answer))
            self.quote_context += bool(context)
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": answer}],
                    "thread_id": thread.id,
                    "post_id": reply.id,
                    "source_url": self.store.post_url(thread, reply),
                }
            )
        return rows

    def _clean(self, post: StoredPost) -> Cleaned:
        cleaned = clean_text(post.text, quotes=len(post.quotes), signature=post.signature)
        self.edited.update(cleaned.edits)
        return cleaned

    def _answer(
        self, reply: StoredPost, prompt: str, opening: StoredPost
    ) -> tuple[str | None, str]:
        """(the drop rule that rejects ``reply``, or None; its cleaned text)."""
        verdict = judge_reply(
            reply,
            prompt=prompt,
            opening=opening,
            min_chars=self.options.min_answer_chars,
            max_chars=self.options.max_chars,
            is_copypasta=lambda text: text_key(text) in self.copypasta,
        )
        self.edited.update(verdict.edits)
        reason, text = verdict.reason, verdict.text
        if reason is None and text in self.seen_exact:
            reason = "duplicate"
        if reason is None and normalise(text) in self.seen_near:
            reason = "near_duplicate"
        return reason, text

    def _quote_context(
        self, reply: StoredPost, posts: list[StoredPost], by_id: dict[str, StoredPost]
    ) -> str:
        """A reply to another reply is answered in the light of it: keep the quote in the prompt."""
        opening = posts[0]
        for quote in reply.quotes:
            text = clean_text(quote.get("text") or "").text
            quoted = by_id.get(quote.get("post_id") or "")
            if quoted is None and not quote.get("post_id"):
                quoted = _quoted_by_text(text, posts[: posts.index(reply)])
            if quoted is opening or quote.get("post_id") == opening.id:
                continue  # already the question
            author = quote.get("author") or (quoted.author if quoted else None) or "someone"
            if text:
                return f"\n\n{author} wrote:\n{text}"
        return ""


def _quoted_by_text(text: str, earlier: list[StoredPost]) -> StoredPost | None:
    """The latest earlier post holding the quoted text, for a quote the page gave no post id."""
    key = normalise(text)
    if not key:
        return None
    for post in reversed(earlier):
        if key in normalise(clean_text(post.text).text):
            return post
    return None


def add_context(db: str | Path, rows: list[Row], options: DatasetOptions) -> dict[str, Any]:
    """Ground every row's prompt in ``options.context`` passages, as the bot will at answer time.

    The row's own reply, and any copy of it, is never in its context: the model
    must learn to answer from what a new asker would be shown, which may include
    the thread's other replies. A seeded ``options.distractors`` share of rows is
    shown only other threads' passages, so the model also learns to answer when
    the context does not help. Returns what ``stats.json`` records.
    """
    from crawl.layout import LAYOUT, render_question
    from crawl.search import Retriever

    with_source = distractor_rows = 0
    with Retriever.open(db, copypasta_threads=options.copypasta_threads) as retriever:
        for row in tqdm(rows, unit="row", desc="context", disable=None):
            question = row["prompt"][0]["content"]
            answer = row["completion"][0]["content"]
            distractor = split_key(row["post_id"], options.seed + 1) < options.distractors
            passages = retriever.search(
                question,
                options.context,
                exclude_posts={row["post_id"]},
                exclude_keys={text_key(answer)},
                exclude_threads={row["thread_id"]} if distractor else (),
            )
            row["prompt"][0]["content"] = render_question(question, passages)
            row["context_post_ids"] = [p.post_id for p in passages]
            distractor_rows += distractor
            with_source += any(p.thread_id == row["thread_id"] for p in passages)
    return {
        "k": options.context,
        "layout": LAYOUT,
        "distractors": options.distractors,
        "rows_distractor_only": distractor_rows,
        "rows_with_own_thread": with_source,
    }


def split_key(thread_id: str, seed: int) -> float:
    """A thread's uniform draw in [0, 1) for ``seed``: a pure function of the two."""
    digest = hashlib.sha256(f"{seed}:{thread_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_threads(thread_ids: Iterable[str], test_fraction: float, seed: int) -> set[str]:
    """The test threads: those whose draw falls under ``test_fraction``.

    A threshold rather than "the first N of a shuffle" keeps a thread's split
    independent of the others, so a bigger crawl later moves no old thread from
    test into train (no leak between dataset versions). At least one thread is
    kept on each side when there are two or more.
    """
    ids = sorted(set(thread_ids), key=lambda thread_id: (split_key(thread_id, seed), thread_id))
    test = {thread_id for thread_id in ids if split_key(thread_id, seed) < test_fraction}
    if len(ids) >= 2 and test_fraction > 0 and not test:
        test = {ids[0]}
    if len(ids) >= 2 and len(test) == len(ids):
        test.discard(ids[-1])
    return test


def percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> int:
        """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
        position = math.ceil(round(q * len(ordered), 9))  # round: 0.7 * 10 is 7.000000000000001
        return ordered[max(1, position) - 1]

    return {
        "min": ordered[0],
        "p50": rank(0.5),
        "p90": rank(0.9),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 1),
    }


def _length_stats(rows: list[Row], measure: Callable[[str], int]) -> dict[str, dict[str, float]]:
    return {
        "prompt": percentiles([measure(r["prompt"][0]["content"]) for r in rows]),
        "completion": percentiles([measure(r["completion"][0]["content"]) for r in rows]),
    }


def _token_counter(name: str) -> Callable[[str], int]:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CrawlError(
            f"--tokenizer {name}: cannot load it ({first_line}); give a local tokenizer directory"
        ) from None
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _sort_key(thread_id: str) -> tuple[int, int, str]:
    return (0, int(thread_id), "") if thread_id.isdigit() else (1, 0, thread_id)


def build_dataset(db: str | Path, out_dir: str | Path, options: DatasetOptions) -> dict[str, Any]:
    """Write ``train.jsonl``, ``test.jsonl`` and ``stats.json`` into ``out_dir``; returns the stats."""
    if not 0 <= options.test_fraction < 1:
        raise CrawlError(f"--test-fraction {options.test_fraction}: give a number in [0, 1)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CrawlError(f"--out {out} is a file: give a directory")
    if options.context < 0 or not 0 <= options.distractors <= 1:
        raise CrawlError(
            f"--context {options.context} --distractors {options.distractors}: give K ≥ 0 "
            "and a fraction in [0, 1]"
        )
    if options.copypasta_threads < 2:
        raise CrawlError(
            f"--copypasta-threads {options.copypasta_threads}: give 2 or more (threads a text "
            "must appear in to be dropped as copypasta)"
        )
    count_tokens = _token_counter(options.tokenizer) if options.tokenizer else None
    with Store.open(db, create=False) as store:
        threads = sorted(store.threads(), key=lambda t: _sort_key(t.id))
        copypasta = find_copypasta((store.posts(t.id) for t in threads), options.copypasta_threads)
        builder = _Builder(store, options, copypasta)
        rows: list[Row] = []
        for thread in tqdm(threads, unit="thread", desc="dataset", disable=None):
            posts = store.posts(thread.id)
            if posts and posts[0].page == 1 and posts[0].position == 1:
                rows.extend(builder.rows(thread, posts))
        markup = store.markup_report()
        if options.context and rows:
            index_pending(store)
    if builder.threads == 0:
        raise CrawlError(
            f"the store {db} holds no thread with its opening post: run `python -m crawl fetch` first"
        )
    if not rows:
        top = ", ".join(f"{rule} {n}" for rule, n in builder.dropped.most_common(3) if n)
        raise CrawlError(f"every reply in {db} was dropped ({top}): nothing to write")

    context_stats = add_context(db, rows, options) if options.context else None
    test_ids = split_threads((r["thread_id"] for r in rows), options.test_fraction, options.seed)
    splits = {
        "train": [r for r in rows if r["thread_id"] not in test_ids],
        "test": [r for r in rows if r["thread_id"] in test_ids],
    }
    stats: dict[str, Any] = {
        "threads": builder.threads,
        "posts": builder.posts,
        "rows": len(rows),
        "splits": {
            name: {"rows": len(split), "threads": len({r["thread_id"] for r in split})}
            for name, split in splits.items()
        },
        "dropped": dict(builder.dropped),
        "edited": dict(builder.edited),
        "quote_context": builder.quote_context,
        "markup": markup,
        "context": context_stats,
        "lengths": {"chars": _length_stats(rows, len)},
        "options": asdict(options),
    }
    if count_tokens is not None:
        stats["lengths"]["tokens"] = _length_stats(rows, count_tokens)

    out.mkdir(parents=True, exist_ok=True)
    files = {out / f"{name}.jsonl": "".join(map(_jsonl, split)) for name, split in splits.items()}
    files[out / "stats.json"] = json.dumps(stats, indent=2, ensure_ascii=False) + "\n"
    _write_atomically(files)
    return stats


def _jsonl(row: Row) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def _write_atomically(files: dict[Path, str]) -> None:
    """Write every file beside its final name, then rename each over it.

    Readers see whole files only. The renames come last, back to back, so a
    crash while writing leaves the previous dataset as it was, never a new
    ``train.jsonl`` beside an old ``test.jsonl`` whose split may put the same
    threads on both sides.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            staged.append((tmp, path))
            with tmp.open("w", encoding="utf-8") as handle:  # umask applies (mkstemp: 0600)
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
