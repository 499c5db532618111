"""The answer measures of `python -m finetune evaluate`, on texts whose answer is known."""

from __future__ import annotations

import pytest

from finetune.answer_quality import answer_stats, leaks, repeated_ngram_share, rouge_l, words
from finetune.report import loss_verdict

LOOP = "He is one of the best skiers of all time. " * 4


def test_a_looping_answer_repeats_most_of_its_phrases_and_a_forum_answer_none():
    assert repeated_ngram_share(LOOP) > 0.7
    assert repeated_ngram_share("Get the 108s, they float and still pop off side hits.") == 0.0
    assert repeated_ngram_share("Too short.") == 0.0


@pytest.mark.parametrize(
    ("text", "leaked"),
    [
        ("Wax it. [INST] next question", True),
        ("Wax it.<|im_end|>", True),
        ("Wax it.\n**This post was edited on Nov 11th 2022 at 11:34:16am", True),
        ("Wax it every five days, more in spring.", False),
    ],
)
def test_leaks_are_the_dataset_cleaning_rules(text: str, leaked: bool):
    assert leaks(text) is leaked


def test_rouge_l_is_one_for_the_forum_answer_and_low_for_another():
    forum = ["Stay centered and keep your speed up in deep snow."]
    assert rouge_l(forum, forum) == pytest.approx(1.0)
    assert rouge_l(["The capital of France is Paris."], forum) < 0.2


def test_answer_stats_count_lengths_stops_and_leaks():
    stats = answer_stats(
        ["one two three", LOOP, "a b [INST]"],
        ended=[True, False, True],
        references=["one two three", "x", "y"],
    )
    assert stats.answers == 3
    assert stats.median_words == len(words("a b INST"))
    assert stats.ended_on_own == 2
    assert stats.leaked == 1
    assert 0 < stats.rouge_l < 1
    forum = answer_stats(["one two", "three four five"])
    assert forum.ended_on_own is None and forum.rouge_l is None and forum.median_words == 2.5


@pytest.mark.parametrize(
    ("base", "finetuned", "says"),
    [
        (4.45, 3.77, "held-out loss 4.45 → 3.77: the adapter learned the forum"),
        (4.58, 7.35, "held-out loss 4.58 → 7.35: got worse: lower the learning rate"),
        (4.50, 4.48, "barely moved"),
    ],
)
def test_the_verdict_line(base: float, finetuned: float, says: str):
    assert says in loss_verdict(base, finetuned)
