"""The knowledge check: does an answer state what the forum knows, and does the user see it?

A loss says how forum-like the words are; it cannot say whether the bot told
the asker that the night ticket is 39 dollars. A knowledge check file asks
new, paraphrased questions whose answers the forum states, each with the
facts a right answer must contain and the thread that holds them:

    {"question": "What does an evening ticket cost?", "facts": ["39"], "thread_id": "941310"}

A fact is a string or a list of acceptable spellings (any one will do); a
question counts as answered when every one of its facts is stated. Matching
is deliberately literal (no model judges another model): both texts are
normalised the same way (:func:`normalise`) and the fact must appear as whole
words, so "180 cm" matches "180cm" and "$39" matches "39 dollars", but "12"
does not match "120". Number words are not numbers: list "twelve" beside
"12" when either spelling is right.

Three shares per model and mode (:func:`score`): stated in the model's own
words; reaching the user (the answer, or the quoted excerpts of the sources
shown under it, state each fact, since the bot shows its sources); and
recall@k (the right thread is among the retrieved sources).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError

Fact = tuple[str, ...]  # acceptable spellings of one fact
FIELDS = ("question", "facts", "thread_id")
MODELS = ("base", "finetuned")
SHOWN_SOURCES = 3  # the bot shows up to 3 sources, each with its passage's excerpt

_THOUSANDS = re.compile(r"(?<=\d)[,\u202f\u00a0](?=\d{3}(?!\d))")
_APOSTROPHES = re.compile(r"['\u2019\u2018`\u00b4]")
_DIGIT_LETTER = re.compile(r"(?<=\d)(?=[^\W\d_])|(?<=[^\W\d_])(?=\d)")
_NOT_WORD = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """Lower case, words and numbers only, one space between, padded for whole-word search.

    Thousands separators go ("10,000" is "10000"), apostrophes go ("skier's"
    is "skiers"), a number and a unit split ("180cm" is "180 cm"), and every
    other punctuation becomes a space ("9:30" and "9.30" are "9 30").
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _THOUSANDS.sub("", text)
    text = _APOSTROPHES.sub("", text)
    text = _DIGIT_LETTER.sub(" ", text)
    text = _NOT_WORD.sub(" ", text).strip()
    return f" {text} "


def states(answer: str, fact: str | Sequence[str]) -> bool:
    """Whether ``answer`` states ``fact`` (a spelling, or a list of acceptable spellings)."""
    spellings = [fact] if isinstance(fact, str) else fact
    text = normalise(answer)
    return any(key in text for key in map(normalise, spellings) if key.strip())


@dataclass(frozen=True)
class KnowledgeQuestion:
    question: str
    facts: tuple[Fact, ...]
    thread_id: str
    line: int = 0  # where it is in its file, for messages


def _fact(value: Any) -> Fact | str:
    """The fact's spellings, or what is wrong with it."""
    spellings = [value] if isinstance(value, str) else value
    if not isinstance(spellings, list) or not spellings:
        return "a fact must be a string or a non-empty list of strings"
    for spelling in spellings:
        if not isinstance(spelling, str):
            return f"fact spelling {spelling!r} is not a string"
        if not normalise(spelling).strip():
            return f"fact spelling {spelling!r} has no letters or digits to match"
    return tuple(spellings)


def _question(item: Any, line: int) -> KnowledgeQuestion | str:
    """The line's question, or what is wrong with it."""
    if not isinstance(item, dict):
        return 'each line must be a JSON object {"question": …, "facts": […], "thread_id": …}'
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        return f"unknown key {unknown[0]!r}: the keys are {', '.join(FIELDS)}"
    missing = [key for key in FIELDS if key not in item]
    if missing:
        return f"missing {missing[0]!r}"
    question, facts, thread_id = item["question"], item["facts"], item["thread_id"]
    if not isinstance(question, str) or not question.strip():
        return "'question' must be a non-empty string"
    if not isinstance(thread_id, str) or not thread_id.strip():
        return f"'thread_id' must be a non-empty string (quote it: \"{thread_id}\")"
    if not isinstance(facts, list) or not facts:
        return "'facts' must be a non-empty list"
    checked: list[Fact] = []
    for fact in map(_fact, facts):
        if isinstance(fact, str):
            return fact
        checked.append(fact)
    return KnowledgeQuestion(question.strip(), tuple(checked), thread_id.strip(), line)


def parse_knowledge(lines: Iterable[str], source: str) -> list[KnowledgeQuestion]:
    """The questions of a knowledge check; a bad line raises one ``source:line: what`` error."""
    questions: list[KnowledgeQuestion] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{source}:{number}: not JSON ({error.msg})") from None
        parsed = _question(item, number)
        if isinstance(parsed, str):
            raise UserError(f"{source}:{number}: {parsed}")
        key = normalise(parsed.question)
        if key in seen:
            raise UserError(f"{source}:{number}: the same question as line {seen[key]}")
        seen[key] = number
        questions.append(parsed)
    if not questions:
        raise UserError(f"{source}: no questions (one JSON object per line)")
    return questions


def load_knowledge(path: str | Path) -> list[KnowledgeQuestion]:
    """The knowledge check file at ``path`` (JSONL), validated."""
    source = Path(path)
    if not source.is_file():
        raise UserError(f"knowledge check file {source} not found")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{source} is not UTF-8 text") from None
    return parse_knowledge(text.splitlines(), str(source))


@dataclass(frozen=True)
class KnowledgeAnswer:
    """One model's answer to one question, grounded or not, and what the user was shown."""

    question: str
    thread_id: str
    model: str  # base | finetuned
    grounded: bool
    answer: str
    source_threads: tuple[str, ...] = ()  # the retrieved passages' threads, best first
    excerpts: tuple[str, ...] = ()  # the retrieved passages' excerpts (crawl.search), best first

    def stated(self, item: KnowledgeQuestion) -> bool:
        return all(states(self.answer, fact) for fact in item.facts)

    def reached(self, item: KnowledgeQuestion) -> bool:
        """Every fact is in the answer or in a shown source's excerpt."""
        shown = [self.answer, *self.excerpts[:SHOWN_SOURCES]]
        return all(any(states(text, fact) for text in shown) for fact in item.facts)

    def recalled(self, item: KnowledgeQuestion) -> bool:
        return item.thread_id in self.source_threads


@dataclass(frozen=True)
class Shares:
    """The three shares for one model in one mode, over ``questions`` questions."""

    model: str
    grounded: bool
    questions: int
    stated: float
    reached: float
    recall: float | None  # None when nothing was retrieved (not grounded)

    @property
    def label(self) -> str:
        return f"{self.model}, {'grounded' if self.grounded else 'not grounded'}"


def score(items: Sequence[KnowledgeQuestion], answers: Sequence[KnowledgeAnswer]) -> list[Shares]:
    """The shares of each (model, grounded) pair present in ``answers``, in a stable order."""
    by_question = {item.question: item for item in items}
    shares = []
    for model in MODELS:
        for grounded in (True, False):
            group = [a for a in answers if a.model == model and a.grounded == grounded]
            if not group:
                continue
            pairs = [(a, by_question[a.question]) for a in group]
            n = len(pairs)
            shares.append(
                Shares(
                    model=model,
                    grounded=grounded,
                    questions=n,
                    stated=sum(a.stated(i) for a, i in pairs) / n,
                    reached=sum(a.reached(i) for a, i in pairs) / n,
                    recall=sum(a.recalled(i) for a, i in pairs) / n if grounded else None,
                )
            )
    return shares


def _percent(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.0f} %"


def shares_table(shares: Sequence[Shares], k: int) -> list[str]:
    """The shares as Markdown table lines."""
    lines = [
        f"| Model | Facts stated in its own words | Facts reaching the user | Right thread in top {k} |",
        "| --- | --- | --- | --- |",
    ]
    for row in shares:
        lines.append(
            f"| {row.label} | {_percent(row.stated)} | {_percent(row.reached)} | "
            f"{_percent(row.recall)} |"
        )
    return lines


@dataclass(frozen=True)
class ContextLoss:
    """Test-split loss of both models with the question alone and with retrieved context."""

    rows: int
    k: int  # passages of context per row
    base: float
    finetuned: float
    base_with_context: float
    finetuned_with_context: float


@dataclass(frozen=True)
class KnowledgeReport:
    """A knowledge check of one run: the shares, every answer, and the context loss."""

    run_dir: str
    knowledge_file: str
    forum_db: str | None  # None: no store, so nothing was grounded
    k: int
    items: list[KnowledgeQuestion]
    answers: list[KnowledgeAnswer]
    loss: ContextLoss | None = None

    def shares(self) -> list[Shares]:
        return score(self.items, self.answers)

    def to_json(self) -> dict[str, Any]:
        by_question = {item.question: item for item in self.items}
        return {
            "run_dir": self.run_dir,
            "knowledge_file": self.knowledge_file,
            "forum_db": self.forum_db,
            "k": self.k,
            "questions": len(self.items),
            "shares": [{**asdict(row), "label": row.label} for row in self.shares()],
            "loss": asdict(self.loss) if self.loss else None,
            "answers": [
                {
                    **asdict(answer),
                    "stated": answer.stated(by_question[answer.question]),
                    "reached": answer.reached(by_question[answer.question]),
                    "recalled": answer.recalled(by_question[answer.question]),
                }
                for answer in self.answers
            ],
        }

    def summary(self) -> str:
        lines = [f"knowledge check: {len(self.items)} questions from {self.knowledge_file}"]
        lines += shares_table(self.shares(), self.k)
        if self.forum_db is None:
            lines.append("not grounded only: no forum store (give --forum-db or set FORUM_DB)")
        if self.loss is not None:
            lines.append(self._loss_line())
        return "\n".join(lines)

    def _loss_line(self) -> str:
        loss = self.loss
        assert loss is not None
        return (
            f"test split ({loss.rows} rows) loss without → with {loss.k} passages of context: "
            f"base {loss.base:.4f} → {loss.base_with_context:.4f}, "
            f"finetuned {loss.finetuned:.4f} → {loss.finetuned_with_context:.4f}"
        )

    def to_markdown(self) -> str:
        from finetune.report import blockquote, table_cell

        by_question = {item.question: item for item in self.items}
        if self.forum_db is None:
            how = "No forum store was given, so nothing was grounded."
        else:
            how = (
                f"Not grounded: the question alone; grounded: with the top {self.k} passages "
                f"retrieved from `{self.forum_db}`. Facts reach the user when the answer or the "
                f"quoted excerpts of the first {SHOWN_SOURCES} sources state them."
            )
        lines = [
            f"# Knowledge check of {self.run_dir}\n",
            f"{len(self.items)} questions from `{self.knowledge_file}`, answered greedily by both "
            f"models; a question counts when every one of its facts is stated. {how}\n",
            *shares_table(self.shares(), self.k),
            "",
        ]
        if self.loss is not None:
            loss = self.loss
            lines += [
                "## Test-split loss with and without context\n",
                "| Model | Question alone | With retrieved context |",
                "| --- | --- | --- |",
                f"| Base | {loss.base:.4f} | {loss.base_with_context:.4f} |",
                f"| Finetuned | {loss.finetuned:.4f} | {loss.finetuned_with_context:.4f} |\n",
                f"On the completions of {loss.rows} test rows; the context is {loss.k} passages "
                f"retrieved as `python -m crawl dataset --context {loss.k}` retrieves them, "
                "never the row's own answer.\n",
            ]
        lines.append("## Answers\n")
        for number, item in enumerate(self.items, start=1):
            facts = "; ".join(" / ".join(fact) for fact in item.facts)
            lines += [
                f"### Question {number} (thread {item.thread_id})\n",
                blockquote(item.question),
                f"Facts: {facts}\n",
                "| Model | Stated | Reaches user | Sources | Answer |",
                "| --- | --- | --- | --- | --- |",
            ]
            for answer in (a for a in self.answers if a.question == item.question):
                mode = "grounded" if answer.grounded else "not grounded"
                sources = ", ".join(answer.source_threads) or "–"
                lines.append(
                    f"| {answer.model}, {mode} | {_mark(answer.stated(by_question[item.question]))} | "
                    f"{_mark(answer.reached(by_question[item.question]))} | {sources} | "
                    f"{table_cell(answer.answer)} |"
                )
            lines.append("")
        return "\n".join(lines)


def _mark(value: bool) -> str:
    return "yes" if value else "no"
