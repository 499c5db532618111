"""The dataset builder: each cleaning rule on a case made for it, the split, the files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from crawl import dataset as dataset_module
from crawl.clean import clean_text, content_drop, normalise, repeats
from crawl.dataset import DROP_RULES, DatasetOptions, build_dataset, split_threads
from crawl.errors import CrawlError
from crawl.site import Post, Quote, ThreadLink, ThreadPage
from crawl.store import PageRecord, Store
from tests.forum_store import make_store

GOOD = "Wax it every five days and scrape it thin, then brush tip to tail."
AD = "SkiShop Outlet: 30% off all wax and tuning kits this week, free shipping over $50!"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


QUESTION = {"by": "asker", "text": "How often should I wax my skis when I ski every weekend?"}


def test_each_drop_rule_drops_the_case_made_for_it(tmp_path):
    replies = [
        {"deleted": True},
        {"text": "**This post was edited on Nov 11th 2022 at 11:34:16am"},  # empty once cleaned
        {"text": "[img]https://images.newschoolers.com/a.jpg[/img]"},
        {"text": "https://images.newschoolers.com/images/pow.png"},
        {"text": "[URL]https://youtu.be/abc[/URL]"},
        {"text": "🤙🤙 🔥"},
        {"text": "this"},
        {"text": "Long answer. " * 40},  # too_long at --max-chars 300
        {"text": "how often should I wax my skis when I ski every weekend"},
        {"by": "asker", "text": "Thanks, that is exactly what I was looking for!"},
        {"text": GOOD},
        {"text": GOOD},  # an exact duplicate
        {"text": GOOD.upper().replace(",", " ;")},  # the same, shouted
        {"by": "shop", "text": AD},  # also in thread 2: two threads is copypasta here
    ]
    long_question = {"by": "q", "text": "Which skis? " * 40}
    db = make_store(
        tmp_path,
        {
            "1": ("Waxing", [QUESTION, *replies]),
            "2": (
                "Long",
                [
                    long_question,
                    {"text": "A 100 underfoot twin tip does everything."},
                    {"by": "shop2", "text": AD.lower()},
                ],
            ),
        },
    )
    options = DatasetOptions(test_fraction=0, max_chars=300, copypasta_threads=2)
    stats = build_dataset(db, tmp_path / "out", options)
    assert stats["dropped"] == {
        "deleted": 1,
        "empty": 1,
        "image_only": 2,
        "url_only": 1,
        "emoji_only": 1,
        "too_short": 1,
        "too_long": 1,
        "copypasta": 2,
        "repeats_question": 1,
        "by_question_author": 1,
        "duplicate": 1,
        "near_duplicate": 1,
        "prompt_too_long": 1,
    }
    assert set(stats["dropped"]) == set(DROP_RULES)
    rows = read_rows(tmp_path / "out/train.jsonl")
    assert [r["completion"][0]["content"] for r in rows] == [GOOD]
    assert rows[0]["prompt"] == [{"role": "user", "content": f"Waxing\n\n{QUESTION['text']}"}]
    assert rows[0]["thread_id"] == "1" and rows[0]["post_id"] == "1011"
    assert rows[0]["source_url"] == "http://forum.test/forum/thread/1/t#post-1011"
    assert stats["rows"] == 1 and stats["threads"] == 2 and stats["posts"] == 18


def test_an_answer_dropped_for_its_long_prompt_does_not_make_a_later_copy_a_duplicate(tmp_path):
    """Thread 1's question is too long, so its reply is no row; the same reply under a
    question that fits is the first copy kept, not a duplicate of a row never written."""
    db = make_store(
        tmp_path,
        {
            "1": ("Long", [{"by": "q", "text": "Which skis? " * 40}, {"text": GOOD}]),
            "2": ("Waxing", [QUESTION, {"text": GOOD}]),
        },
    )
    stats = build_dataset(db, tmp_path / "out", DatasetOptions(test_fraction=0, max_chars=300))
    assert stats["dropped"]["prompt_too_long"] == 1 and stats["dropped"]["duplicate"] == 0
    assert [r["thread_id"] for r in read_rows(tmp_path / "out/train.jsonl")] == ["2"]


def test_the_title_is_cleaned_like_the_question(tmp_path):
    """The prompt is title + question: no control string or bbcode may enter through the title."""
    title = "[b]Wax[/b] &amp; [INST]scrapers[/INST]</s>"
    db = make_store(tmp_path, {"1": (title, [QUESTION, {"text": GOOD}])})
    build_dataset(db, tmp_path / "out", DatasetOptions(test_fraction=0))
    (row,) = read_rows(tmp_path / "out/train.jsonl")
    assert row["prompt"][0]["content"] == f"Wax & scrapers\n\n{QUESTION['text']}"


@pytest.mark.parametrize(
    ("raw", "expected", "rule"),
    [
        (
            "It&amp;#039;s fine, don&#039;t worry about it",
            "It's fine, don't worry about it",
            "entities",
        ),
        (
            "Wax every five days.\n\n**This post was edited on Nov 11th 2022 at 11:34:16am",
            "Wax every five days.",
            "edited_line",
        ),
        (
            "**This thread was edited on Oct 21st 2020 at 8:21:07pm\nSee above.",
            "See above.",
            "edited_line",
        ),
        (
            "[quote=bob][quote]older[/quote]Get the 108s[/quote]The 100s are better in trees.",
            "The 100s are better in trees.",
            "quoted_block",
        ),
        (
            "> get the 108s\nThe 100s are better in trees.",
            "The 100s are better in trees.",
            "quoted_block",
        ),
        (
            "Get a boot fitter first.\n--\nslushmachine | Line Vision 108",
            "Get a boot fitter first.",
            "signature",
        ),
        (
            "[INST] answer [/INST] <s>Keep your weight forward.</s>",
            "answer Keep your weight forward.",
            "control_strings",
        ),
        (
            "<|im_start|>assistant\nKeep your weight forward.<|im_end|>",
            "assistant\nKeep your weight forward.",
            "control_strings",
        ),
        (
            "<|start_header_id|>user<|end_header_id|> Stay low.<|eot_id|><|reserved_special_token_3|>",
            "user Stay low.",
            "control_strings",
        ),
        (
            "<start_of_turn>model Lean forward<end_of_turn> <｜end▁of▁sentence｜>[SYSTEM_PROMPT]",
            "model Lean forward",
            "control_strings",
        ),
        (
            "[b]Wax[/b] often, see [url=https://x.test/wax]the wax guide[/url] or [URL]https://youtu.be/w[/URL][img]https://i.test/a.jpg[/img]",
            "Wax often, see the wax guide or https://youtu.be/w",
            "bbcode",
        ),
        (
            "Keep it flat.<br>Then <span class='x'>pop</span>. I <3 pow",
            "Keep it flat.\nThen pop. I <3 pow",
            "html",
        ),
        (
            "Most important is variety, mix\nwide angle shots\u00a0with follow cam.\n\n\n\nNext  paragraph.\u200b",
            "Most important is variety, mix wide angle shots with follow cam.\n\nNext paragraph.",
            "whitespace",
        ),
    ],
)
def test_each_edit_rule_on_its_case(raw: str, expected: str, rule: str):
    cleaned = clean_text(raw)
    assert cleaned.text == expected
    assert rule in cleaned.edits


def test_quotes_and_signatures_the_parser_held_apart_count_under_their_rules():
    cleaned = clean_text("Fine text here.", quotes=1, signature="my sig")
    assert cleaned.edits == ["quoted_block", "signature"]
    assert clean_text("Fine text here.").edits == []


@pytest.mark.parametrize(
    ("text", "had_image", "reason"),
    [
        ("", False, "empty"),
        ("", True, "image_only"),
        ("https://www.newschoolers.com/videos/watch/1/Edit", False, "url_only"),
        ("https://images.newschoolers.com/x/y.jpg", False, "image_only"),
        ("🤙 !!", False, "emoji_only"),
        ("Look at https://youtu.be/x for the trick", False, None),
    ],
)
def test_content_drops(text, had_image, reason):
    cleaned = clean_text(text)
    cleaned.had_image = cleaned.had_image or had_image
    assert content_drop(cleaned) == reason


def test_repeats_and_near_duplicate_key():
    question = "Which wax for cold snow below minus ten?"
    assert repeats("which wax for cold snow below minus ten", question)
    assert not repeats("Green wax below minus ten.", question)
    assert normalise("Wax it!!  Every DAY 🤙") == "wax it every day"


def test_a_reply_to_a_reply_keeps_the_quoted_post_as_context(tmp_path):
    quote_of_reply = Quote("1001", "bob", "Just crank your DIN to 12.")
    quote_of_question = Quote("1000", "asker", QUESTION["text"])
    db = make_store(
        tmp_path,
        {
            "1": (
                "DIN",
                [
                    QUESTION,
                    {"by": "bob", "text": "Just crank your DIN to 12."},
                    {"text": "Please do not, set it by the chart.", "quotes": [quote_of_reply]},
                    {"text": "Every four to six days on snow.", "quotes": [quote_of_question]},
                ],
            )
        },
    )
    stats = build_dataset(db, tmp_path / "out", DatasetOptions(test_fraction=0))
    rows = {r["post_id"]: r for r in read_rows(tmp_path / "out/train.jsonl")}
    assert rows["1002"]["prompt"][0]["content"] == (
        f"DIN\n\n{QUESTION['text']}\n\nbob wrote:\nJust crank your DIN to 12."
    )
    assert rows["1002"]["completion"][0]["content"] == "Please do not, set it by the chart."
    assert rows["1003"]["prompt"][0]["content"] == f"DIN\n\n{QUESTION['text']}"
    assert stats["quote_context"] == 1 and stats["edited"]["quoted_block"] == 2


def many_threads(count: int) -> dict[str, tuple[str, list[dict]]]:
    return {
        str(100 + n): (
            f"Question {n}",
            [
                {"by": "asker", "text": f"What should I know about topic {n}?"},
                {"text": f"First useful answer about topic {n}, with detail."},
                {"text": f"Second useful answer about topic {n}, different."},
            ],
        )
        for n in range(count)
    }


def test_split_is_by_thread_and_the_same_seed_writes_the_same_files(tmp_path):
    db = make_store(tmp_path, many_threads(40))
    options = DatasetOptions(test_fraction=0.25, seed=3)
    stats = build_dataset(db, tmp_path / "a", options)
    build_dataset(db, tmp_path / "b", options)
    for name in ("train.jsonl", "test.jsonl", "stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train_rows = read_rows(tmp_path / "a/train.jsonl")
    test_rows = read_rows(tmp_path / "a/test.jsonl")
    train = {r["thread_id"] for r in train_rows}
    test = {r["thread_id"] for r in test_rows}
    assert train.isdisjoint(test) and len(train | test) == 40
    assert 3 <= len(test) <= 20  # a quarter of 40, give or take the draw
    assert stats["splits"]["test"] == {"rows": len(test_rows), "threads": len(test)}
    assert len(train_rows) + len(test_rows) == stats["rows"] == 80

    build_dataset(db, tmp_path / "c", DatasetOptions(test_fraction=0.25, seed=4))
    assert {r["thread_id"] for r in read_rows(tmp_path / "c/test.jsonl")} != test


def test_crawling_more_threads_moves_no_old_thread_out_of_test():
    old = [str(n) for n in range(300)]
    before = split_threads(old, 0.1, seed=0)
    after = split_threads([*old, *(str(n) for n in range(300, 400))], 0.1, seed=0)
    assert before <= after and 10 <= len(before) <= 60
    assert len(split_threads(["1", "2"], 0.1, seed=0)) == 1  # both sides get one
    assert len(split_threads(["1", "2"], 0.99, seed=0)) == 1
    assert split_threads(old, 0.0, seed=0) == set()


def test_a_failed_write_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    db = make_store(tmp_path, many_threads(5))
    out = tmp_path / "out"
    build_dataset(db, out, DatasetOptions(test_fraction=0.2))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dataset_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        build_dataset(db, out, DatasetOptions(test_fraction=0.2, seed=9))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # and no temp file left


def test_a_crash_writing_test_jsonl_leaves_no_new_train_beside_the_old_test(tmp_path, monkeypatch):
    """A new seed's train.jsonl next to the old seed's test.jsonl would share threads."""
    db = make_store(tmp_path, many_threads(5))
    out = tmp_path / "out"
    build_dataset(db, out, DatasetOptions(test_fraction=0.2))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    synced = []

    def fsync_then_crash(fd: int) -> None:
        synced.append(fd)
        if len(synced) == 2:  # train.jsonl is written; test.jsonl is not
            raise OSError("disk full")

    monkeypatch.setattr(dataset_module.os, "fsync", fsync_then_crash)
    with pytest.raises(OSError, match="disk full"):
        build_dataset(db, out, DatasetOptions(test_fraction=0.2, seed=9))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # and no temp file left


def test_dataset_files_get_the_usual_permissions(tmp_path):
    """Readable by whoever the umask allows (the trainer may run as another user), not 0600."""
    db = make_store(tmp_path, many_threads(3))
    previous = os.umask(0o022)
    try:
        build_dataset(db, tmp_path / "out", DatasetOptions(test_fraction=0))
    finally:
        os.umask(previous)
    for name in ("train.jsonl", "test.jsonl", "stats.json"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name


def test_stats_report_lengths(tmp_path):
    db = make_store(tmp_path, many_threads(3))
    stats = build_dataset(db, tmp_path / "out", DatasetOptions(test_fraction=0))
    completion = stats["lengths"]["chars"]["completion"]
    lengths = sorted(
        len(r["completion"][0]["content"]) for r in read_rows(tmp_path / "out/train.jsonl")
    )
    assert completion["min"] == lengths[0] and completion["max"] == lengths[-1]
    assert (
        completion["p50"] == lengths[len(lengths) // 2 - 1]
        or completion["p50"] == lengths[len(lengths) // 2]
    )
    assert "tokens" not in stats["lengths"]
    assert json.loads((tmp_path / "out/stats.json").read_text()) == stats


def test_percentiles_are_nearest_rank():
    """The p-th percentile of 1..10 is the value ceil(p * 10): p50 is 5, p90 is 9."""
    from crawl.dataset import percentiles

    tens = percentiles(list(range(10, 0, -1)))
    assert (tens["min"], tens["p50"], tens["p90"], tens["p95"], tens["max"]) == (1, 5, 9, 10, 10)
    assert percentiles([7])["p50"] == 7 and percentiles([1, 2, 3, 4])["p50"] == 2
    assert percentiles([]) == {}


def test_token_lengths_with_a_tokenizer(tmp_path, tiny_model_dir):
    db = make_store(tmp_path, many_threads(3))
    stats = build_dataset(
        db, tmp_path / "out", DatasetOptions(test_fraction=0, tokenizer=str(tiny_model_dir))
    )
    tokens = stats["lengths"]["tokens"]["completion"]
    chars = stats["lengths"]["chars"]["completion"]
    assert 0 < tokens["min"] <= tokens["max"] < chars["max"]


def test_expected_failures_are_crawl_errors(tmp_path):
    with pytest.raises(CrawlError, match="no forum store at"):
        build_dataset(tmp_path / "missing.sqlite", tmp_path / "out", DatasetOptions())
    empty = tmp_path / "empty.sqlite"
    Store.open(empty).close()
    with pytest.raises(CrawlError, match="no thread with its opening post"):
        build_dataset(empty, tmp_path / "out", DatasetOptions())
    db = make_store(tmp_path, {"1": ("T", [QUESTION, {"text": "ok"}])})
    with pytest.raises(CrawlError, match=r"every reply .* was dropped \(too_short 1\)"):
        build_dataset(db, tmp_path / "out", DatasetOptions())
    with pytest.raises(CrawlError, match="tokenizer /nonexistent: cannot load it"):
        build_dataset(db, tmp_path / "out", DatasetOptions(tokenizer="/nonexistent"))
    assert not (tmp_path / "out").exists()


def ad_threads(copies: int) -> dict[str, tuple[str, list[dict]]]:
    """Threads that each get one good answer; the first ``copies`` also get the shop's ad,
    written a little differently each time (case, punctuation)."""
    variants = [AD, AD.upper(), AD.replace(":", " -").replace("!", "!!"), AD.lower()]
    threads = many_threads(4)
    for n, thread_id in enumerate(sorted(threads)[:copies]):
        threads[thread_id][1].append({"by": f"shop{n}", "text": variants[n]})
    return threads


def test_text_pasted_into_three_threads_is_copypasta_and_every_copy_is_dropped(tmp_path):
    db = make_store(tmp_path, ad_threads(3))
    stats = build_dataset(db, tmp_path / "out", DatasetOptions(test_fraction=0))
    answers = [r["completion"][0]["content"] for r in read_rows(tmp_path / "out/train.jsonl")]
    assert not any("skishop" in answer.lower() for answer in answers)
    assert stats["dropped"]["copypasta"] == 3 and stats["dropped"]["duplicate"] == 0
    assert stats["rows"] == len(answers) == 8  # the two real answers of each thread
    assert stats["options"]["copypasta_threads"] == 3


@pytest.mark.parametrize(("copies", "threshold"), [(2, 3), (3, 4)])
def test_text_in_fewer_threads_than_the_threshold_is_only_deduplicated(tmp_path, copies, threshold):
    db = make_store(tmp_path, ad_threads(copies))
    options = DatasetOptions(test_fraction=0, copypasta_threads=threshold)
    stats = build_dataset(db, tmp_path / "out", options)
    assert stats["dropped"]["copypasta"] == 0
    assert stats["dropped"]["near_duplicate"] == copies - 1  # the first copy is kept
    answers = [r["completion"][0]["content"] for r in read_rows(tmp_path / "out/train.jsonl")]
    assert answers.count(AD) == 1


def test_the_same_text_repeated_within_one_thread_is_not_copypasta(tmp_path):
    threads = many_threads(3)
    threads["100"][1].extend({"by": f"u{n}", "text": AD} for n in range(3))
    stats = build_dataset(make_store(tmp_path, threads), tmp_path / "out", DatasetOptions())
    assert stats["dropped"]["copypasta"] == 0 and stats["dropped"]["duplicate"] == 2


def test_a_copypasta_threshold_below_two_is_refused(tmp_path):
    db = make_store(tmp_path, many_threads(2))
    with pytest.raises(CrawlError, match="--copypasta-threads 1: give 2 or more"):
        build_dataset(db, tmp_path / "out", DatasetOptions(copypasta_threads=1))


def test_a_quote_without_a_post_id_is_matched_to_the_quoted_post_by_its_text(tmp_path):
    """Pages that show no post ids still say what a reply answers: the question (no context
    added) or an earlier reply (kept as context, by its author when the page names one)."""
    of_question = Quote(None, None, QUESTION["text"])
    of_reply = Quote(None, "bob", "crank your DIN to 12")
    db = make_store(
        tmp_path,
        {
            "1": (
                "DIN",
                [
                    QUESTION,
                    {"by": "bob", "text": "Just crank your DIN to 12."},
                    {"text": "Please do not, set it by the chart.", "quotes": [of_reply]},
                    {"text": "Every four to six days on snow.", "quotes": [of_question]},
                ],
            )
        },
    )
    stats = build_dataset(db, tmp_path / "out", DatasetOptions(test_fraction=0))
    rows = {
        r["post_id"]: r["prompt"][0]["content"] for r in read_rows(tmp_path / "out/train.jsonl")
    }
    assert rows["1002"] == f"DIN\n\n{QUESTION['text']}\n\nbob wrote:\ncrank your DIN to 12"
    assert rows["1003"] == f"DIN\n\n{QUESTION['text']}"
    assert stats["quote_context"] == 1


def test_an_opening_post_repeated_atop_every_page_stays_the_question(tmp_path):
    """Some forums show the opening post again at the top of each page of a thread."""
    url = "http://forum.test/forum/thread/9/t"
    listing = PageRecord(url="http://forum.test/forum/1/F", kind="listing", number=1, state="ok")

    def post(post_id: str, position: int, text: str) -> Post:
        return Post(post_id, position, f"user{post_id}", None, "<div></div>", text)

    opening = post("op", 1, QUESTION["text"])
    pages = [
        [opening, post("r1", 2, GOOD), post("r2", 3, GOOD + " Every time.")],
        [opening, post("r3", 2, GOOD + " Or more."), post("r4", 3, GOOD + " Or less.")],
        [opening, post("r5", 2, GOOD + " Or never.")],
    ]
    db = tmp_path / "forum.sqlite"
    with Store.open(db) as store:
        store.save_listing(listing, "forum/1/F", [(ThreadLink("9", url, "Waxing"), url)])
        for number, posts in enumerate(pages, start=1):
            page = ThreadPage("9", "Waxing", posts, has_next=number < len(pages))
            record = PageRecord(
                url=f"{url}?page={number}", kind="thread", thread_id="9", number=number, state="ok"
            )
            store.save_thread_page(record, page)
        stored = [(p.id, p.page, p.position) for p in store.posts("9")]
    stats = build_dataset(db, tmp_path / "out", DatasetOptions(test_fraction=0))

    assert stored[0] == ("op", 1, 1)
    assert [r["post_id"] for r in read_rows(tmp_path / "out" / "train.jsonl")] == [
        "r1",
        "r2",
        "r3",
        "r4",
        "r5",
    ]
    assert stats["threads"] == 1 and stats["rows"] == 5
