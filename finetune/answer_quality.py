"""Whether answers read like the forum's: length, stopping, looping, leaks and overlap.

Held-out loss says the adapter fits the forum's text; these say what a reader
notices. The reference run's finetuned answers were long, never stopped,
looped ("He is one of the best skiers of all time. He is one of the best…")
and carried edit notices and ``[INST]`` into their text. Each of those has a
number here, computed the same way for the forum's own answers, so every
figure has the forum's value beside it.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

REPEAT_NGRAM = 4  # a phrase this long said twice in one answer is a loop, not style
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def repeated_ngram_share(text: str, n: int = REPEAT_NGRAM) -> float:
    """The share of the answer's n-grams that already occurred earlier in it (0 = no loop)."""
    tokens = words(text)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def leaks(text: str) -> bool:
    """Whether the answer carries text the dataset's cleaning removes from posts.

    The same rules as ``python -m crawl dataset`` (template control tokens,
    edit notices): a model that writes them learned them from uncleaned data.
    """
    from crawl.clean import CONTROL_STRING, EDITED_LINE

    return bool(CONTROL_STRING.search(text) or EDITED_LINE.search(text))


def rouge_l(answers: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of each answer against the forum's answer to the same question."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(reference, answer)["rougeL"].fmeasure
        for answer, reference in zip(answers, references, strict=True)
    ]
    return statistics.fmean(scores) if scores else 0.0


@dataclass(frozen=True)
class AnswerStats:
    answers: int
    median_words: float
    ended_on_own: int | None  # None for the forum's answers: they always end
    repeated_ngram_share: float  # mean over answers
    leaked: int  # answers with a control token or an edit notice
    rouge_l: float | None  # None for the forum itself

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def answer_stats(
    texts: Sequence[str],
    *,
    ended: Sequence[bool] | None = None,
    references: Sequence[str] | None = None,
) -> AnswerStats:
    """The figures for one set of answers; ``references`` (the forum's) adds ROUGE-L."""
    return AnswerStats(
        answers=len(texts),
        median_words=float(statistics.median(len(words(t)) for t in texts)) if texts else 0.0,
        ended_on_own=sum(ended) if ended is not None else None,
        repeated_ngram_share=statistics.fmean(map(repeated_ngram_share, texts)) if texts else 0.0,
        leaked=sum(map(leaks, texts)),
        rouge_l=rouge_l(texts, references) if references is not None else None,
    )


def stats_table(columns: dict[str, AnswerStats]) -> list[str]:
    """Markdown rows comparing answer sets (e.g. forum, base, finetuned) side by side."""

    def row(label: str, cell: Callable[[AnswerStats], str]) -> str:
        return f"| {label} | " + " | ".join(cell(s) for s in columns.values()) + " |"

    def ended(s: AnswerStats) -> str:
        return "always" if s.ended_on_own is None else f"{s.ended_on_own} of {s.answers}"

    return [
        "| | " + " | ".join(columns) + " |",
        "| --- |" + " --- |" * len(columns),
        row("median length (words)", lambda s: f"{s.median_words:g}"),
        row("ended on their own (not at the length cap)", ended),
        row(
            f"repeated {REPEAT_NGRAM}-word phrases (mean share)",
            lambda s: f"{s.repeated_ngram_share:.0%}",
        ),
        row("answers with control tokens or edit notices", lambda s: str(s.leaked)),
        row(
            "ROUGE-L F1 against the forum's answer",
            lambda s: "—" if s.rouge_l is None else f"{s.rouge_l:.3f}",
        ),
    ]
