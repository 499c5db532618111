"""``python -m finetune evaluate``: how much better the adapter is, and what it now says.

The loss is trl's own evaluation loss (completion tokens only, the same
tokenization as training) on the run's test split, once with the adapter and
once without; perplexity is its exponential. Both models then answer the
test split's questions, and their answers are measured against the forum's
own (:mod:`finetune.answer_quality`: length, stopping, loops, leaks, ROUGE-L).
Last, a prompt set of ski questions, short and long, plus a few off-topic
ones that catch a finetune which forgot how to do anything but ski talk.
Base and finetuned answers to one question are rows of the same
mixed-adapter batch.

With ``--knowledge FILE`` both models also answer a knowledge check
(:mod:`finetune.knowledge`) with and without passages retrieved from the
forum store, and the test split's loss is measured again with retrieved
context; that report goes to ``knowledge.json`` and ``knowledge.md``.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.answer_quality import AnswerStats, answer_stats, stats_table
from finetune.config import FinetuneConfig
from finetune.errors import UserError
from finetune.knowledge import ContextLoss, KnowledgeAnswer, KnowledgeQuestion, KnowledgeReport
from finetune.report import RESOLVED_CONFIG_FILE
from finetune.run import ADAPTER_DIR, base_model, distinct_questions, require_run_dir

PROMPTS_DIR = Path(__file__).with_name("prompts")
DEFAULT_PROMPTS = PROMPTS_DIR / "ski_prompts.json"
PROMPT_KINDS = ("short", "long", "off-topic")
KNOWLEDGE_JSON, KNOWLEDGE_MARKDOWN = "knowledge.json", "knowledge.md"
DEFAULT_K = 3  # passages per grounded question, for an adapter trained without context
GENERATION_BATCH_PROMPTS = 4  # prompts per generate call (two rows each)
_MD_HEADING = re.compile(r"^## (?P<kind>[\w-]+): (?P<id>[\w-]+)\s*$")


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str
    question: str


def _checked(prompts: list[Prompt], source: Path) -> list[Prompt]:
    if not prompts:
        raise UserError(f"{source} holds no prompts")
    for prompt in prompts:
        if prompt.kind not in PROMPT_KINDS:
            raise UserError(
                f"{source}: prompt {prompt.id!r} has kind {prompt.kind!r}; use one of {', '.join(PROMPT_KINDS)}"
            )
        if not prompt.question.strip():
            raise UserError(f"{source}: prompt {prompt.id!r} has no question text")
    return prompts


def load_prompts(path: str | Path | None = None) -> list[Prompt]:
    """A prompt set from JSON (a list of {id, kind, question}) or Markdown (``## kind: id`` sections)."""
    source = Path(path) if path else DEFAULT_PROMPTS
    if not source.is_file():
        raise UserError(f"prompt file {source} not found")
    text = source.read_text(encoding="utf-8")
    if source.suffix == ".json":
        try:
            items = json.loads(text)
            return _checked([Prompt(str(i["id"]), i["kind"], i["question"]) for i in items], source)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f"{source} must be a JSON list of objects with id, kind and question"
            ) from None
    if source.suffix == ".md":
        return _checked(_parse_markdown(text), source)
    raise UserError(f"{source}: prompt files are .json or .md")


def _parse_markdown(text: str) -> list[Prompt]:
    prompts: list[Prompt] = []
    heading: re.Match[str] | None = None
    body: list[str] = []
    for line in [*text.splitlines(), "## end: end"]:
        match = _MD_HEADING.match(line)
        if match is None:
            body.append(line)
            continue
        if heading is not None:
            prompts.append(Prompt(heading["id"], heading["kind"], "\n".join(body).strip()))
        heading, body = match, []
    return prompts


@dataclass(frozen=True)
class PromptAnswer:
    id: str
    kind: str
    question: str
    base: str
    finetuned: str
    base_ended: bool = True
    finetuned_ended: bool = True


@dataclass(frozen=True)
class TestAnswer:
    """Both models' answers to a test-split question, beside the forum's own."""

    question: str
    forum: str
    base: str
    finetuned: str
    base_ended: bool
    finetuned_ended: bool


@dataclass(frozen=True)
class EvaluationReport:
    run_dir: str
    test_rows: int
    base_loss: float
    finetuned_loss: float
    answers: list[PromptAnswer]
    test_answers: list[TestAnswer] = field(default_factory=list)
    knowledge: KnowledgeReport | None = None  # written to knowledge.json, not evaluation.json

    @property
    def verdict(self) -> str:
        from finetune.report import loss_verdict

        return loss_verdict(self.base_loss, self.finetuned_loss)

    def answer_stats(self) -> dict[str, AnswerStats]:
        """Forum, base and finetuned answers to the test questions, measured alike."""
        if not self.test_answers:
            return {}
        forum = [a.forum for a in self.test_answers]
        return {
            "forum": answer_stats(forum),
            "base": answer_stats(
                [a.base for a in self.test_answers],
                ended=[a.base_ended for a in self.test_answers],
                references=forum,
            ),
            "finetuned": answer_stats(
                [a.finetuned for a in self.test_answers],
                ended=[a.finetuned_ended for a in self.test_answers],
                references=forum,
            ),
        }

    def prompt_stats(self) -> dict[str, AnswerStats]:
        if not self.answers:
            return {}
        return {
            "base": answer_stats(
                [a.base for a in self.answers], ended=[a.base_ended for a in self.answers]
            ),
            "finetuned": answer_stats(
                [a.finetuned for a in self.answers],
                ended=[a.finetuned_ended for a in self.answers],
            ),
        }

    @property
    def base_perplexity(self) -> float:
        return math.exp(self.base_loss)

    @property
    def finetuned_perplexity(self) -> float:
        return math.exp(self.finetuned_loss)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["knowledge"]
        data["base_perplexity"] = self.base_perplexity
        data["finetuned_perplexity"] = self.finetuned_perplexity
        data["verdict"] = self.verdict
        data["test_answer_stats"] = {k: v.to_json() for k, v in self.answer_stats().items()}
        data["prompt_answer_stats"] = {k: v.to_json() for k, v in self.prompt_stats().items()}
        return data

    def summary(self) -> str:
        lines = [
            f"test split ({self.test_rows} rows): "
            f"base loss {self.base_loss:.4f} (perplexity {self.base_perplexity:.2f}), "
            f"finetuned loss {self.finetuned_loss:.4f} (perplexity {self.finetuned_perplexity:.2f})",
            self.verdict,
        ]
        stats = self.answer_stats()
        if stats:
            forum, base, tuned = stats["forum"], stats["base"], stats["finetuned"]
            lines.append(
                f"{forum.answers} test questions: median words forum {forum.median_words:g}, "
                f"base {base.median_words:g}, finetuned {tuned.median_words:g}; "
                f"ended on their own base {base.ended_on_own}, finetuned {tuned.ended_on_own}; "
                f"ROUGE-L base {base.rouge_l:.3f}, finetuned {tuned.rouge_l:.3f}"
            )
        lines.append(
            f"{len(self.answers)} prompts answered, see {Path(self.run_dir) / 'evaluation.md'}"
        )
        if self.knowledge is not None:
            lines += [
                self.knowledge.summary(),
                f"answers in {Path(self.run_dir) / KNOWLEDGE_MARKDOWN}",
            ]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        from finetune.report import blockquote, table_cell

        lines = [
            f"# Evaluation of {self.run_dir}\n",
            "| | Loss | Perplexity |",
            "| --- | --- | --- |",
            f"| Base | {self.base_loss:.4f} | {self.base_perplexity:.2f} |",
            f"| Finetuned | {self.finetuned_loss:.4f} | {self.finetuned_perplexity:.2f} |\n",
            f"Loss on the completions of {self.test_rows} test rows: {self.verdict}.\n",
        ]
        stats = self.answer_stats()
        if stats:
            lines += [
                "## Answers to the test questions, against the forum's\n",
                *stats_table(stats),
                "",
                f"Greedy answers to {len(self.test_answers)} questions of the test split; "
                "ROUGE-L compares each with the forum's own answer.\n",
            ]
            for number, answer in enumerate(self.test_answers, start=1):
                lines += [
                    f"### Test question {number}\n",
                    blockquote(answer.question),
                    "| Forum answer | Base | Finetuned |",
                    "| --- | --- | --- |",
                    f"| {table_cell(answer.forum)} | {table_cell(answer.base)} | "
                    f"{table_cell(answer.finetuned)} |\n",
                ]
        prompt_stats = self.prompt_stats()
        if prompt_stats:
            lines += ["## Answers to the prompt set\n", *stats_table(prompt_stats), ""]
        for prompted in self.answers:
            lines += [
                f"## {prompted.id} ({prompted.kind})\n",
                blockquote(prompted.question),
                "| Base | Finetuned |",
                "| --- | --- |",
                f"| {table_cell(prompted.base)} | {table_cell(prompted.finetuned)} |\n",
            ]
        return "\n".join(lines)


def split_losses(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], config: FinetuneConfig
) -> tuple[float, float]:
    """(base, finetuned) evaluation loss from trl's SFTTrainer, so it matches training's."""
    import torch
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from finetune.data import to_hf_dataset
    from finetune.modeling import compute_dtype

    dataset = to_hf_dataset(rows)
    on_cuda = model.device.type == "cuda"
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(
                output_dir=scratch,
                per_device_eval_batch_size=config.per_device_train_batch_size,
                max_length=config.max_length,
                activation_checkpointing=False,
                bf16=compute_dtype(model.device.type) == torch.bfloat16,
                use_cpu=not on_cuda,
                report_to="none",
                disable_tqdm=True,
            ),
            train_dataset=dataset,  # required by the trainer, never trained on
            eval_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)  # the report prints the result
        finetuned = trainer.evaluate()["eval_loss"]
        with model.disable_adapter():  # offline evaluation: nothing else shares the model
            base = trainer.evaluate()["eval_loss"]
    return base, finetuned


def answer_prompts(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], max_new_tokens: int
) -> list[PromptAnswer]:
    pairs = answer_pairs(
        model,
        tokenizer,
        [[{"role": "user", "content": p.question}] for p in prompts],
        max_new_tokens,
    )
    return [
        PromptAnswer(p.id, p.kind, p.question, base.text, tuned.text, base.ended, tuned.ended)
        for p, (base, tuned) in zip(prompts, pairs, strict=True)
    ]


def answer_pairs(
    model: Any, tokenizer: Any, conversations: Sequence[list[dict[str, str]]], max_new_tokens: int
) -> list[tuple[Any, Any]]:
    """(base, finetuned) greedy answers to each conversation, both rows of one batch."""
    from finetune.generation import GenerationSettings, generate_answers

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    pairs = []
    for start in range(0, len(conversations), GENERATION_BATCH_PROMPTS):
        chunk = conversations[start : start + GENERATION_BATCH_PROMPTS]
        rows = [conversation for conversation in chunk for _ in (0, 1)]
        variants = ["base", "finetuned"] * len(chunk)
        answers = generate_answers(model, tokenizer, rows, settings, variants=variants)
        pairs += [(answers[2 * i], answers[2 * i + 1]) for i in range(len(chunk))]
    return pairs


def answer_test_questions(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], max_new_tokens: int
) -> list[TestAnswer]:
    pairs = answer_pairs(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens)
    return [
        TestAnswer(
            question=row["prompt"][-1]["content"],
            forum=row["completion"][-1]["content"],
            base=base.text,
            finetuned=tuned.text,
            base_ended=base.ended,
            finetuned_ended=tuned.ended,
        )
        for row, (base, tuned) in zip(rows, pairs, strict=True)
    ]


def knowledge_answers(
    model: Any,
    tokenizer: Any,
    items: Sequence[KnowledgeQuestion],
    retriever: Any | None,
    k: int,
    max_new_tokens: int,
) -> list[KnowledgeAnswer]:
    """Both models' greedy answers to each question, alone and (given a retriever) grounded.

    Grounded prompts are the serving layout (:func:`crawl.layout.render_question`)
    over the top ``k`` passages; the answer keeps which threads were retrieved
    and the excerpts the user would see under it.
    """
    plain = [[{"role": "user", "content": item.question}] for item in items]
    answers: list[KnowledgeAnswer] = []
    for item, (base, tuned) in zip(
        items, answer_pairs(model, tokenizer, plain, max_new_tokens), strict=True
    ):
        answers += [
            KnowledgeAnswer(item.question, item.thread_id, "base", False, base.text),
            KnowledgeAnswer(item.question, item.thread_id, "finetuned", False, tuned.text),
        ]
    if retriever is None:
        return answers
    from crawl.layout import render_question

    retrieved = [retriever.search(item.question, k) for item in items]
    grounded = [
        [{"role": "user", "content": render_question(item.question, passages)}]
        for item, passages in zip(items, retrieved, strict=True)
    ]
    pairs = answer_pairs(model, tokenizer, grounded, max_new_tokens)
    for item, passages, (base, tuned) in zip(items, retrieved, pairs, strict=True):
        threads = tuple(p.thread_id for p in passages)
        quotes = tuple(p.excerpt for p in passages)
        for variant, answer in (("base", base), ("finetuned", tuned)):
            answers.append(
                KnowledgeAnswer(
                    item.question, item.thread_id, variant, True, answer.text, threads, quotes
                )
            )
    return answers


def question_alone(row: dict[str, Any]) -> dict[str, Any]:
    """A grounded row's prompt without its context (:mod:`crawl.layout`: the question leads)."""
    from crawl.layout import question_of

    question = question_of(row["prompt"][0]["content"])
    return {**row, "prompt": [{**row["prompt"][0], "content": question}, *row["prompt"][1:]]}


def rows_with_and_without_context(
    rows: Sequence[dict[str, Any]], dataset: str | Path, forum_db: str | Path, k: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(the rows with the question alone, the same rows grounded, passages per row).

    A grounded dataset's rows carry their context already; a plain dataset's
    rows get it the way ``crawl dataset --context K`` adds it (same retrieval,
    same exclusion of the row's own answer, same share of distractor rows).
    """
    import copy

    from crawl.dataset import DatasetOptions, add_context
    from finetune.grounding import dataset_grounding

    grounding = dataset_grounding(dataset)
    if grounding is not None:
        return [question_alone(row) for row in rows], list(rows), grounding.k
    options = _dataset_options(dataset)
    grounded = copy.deepcopy(list(rows))
    add_context(forum_db, grounded, DatasetOptions(**{**options, "context": k}))
    return list(rows), grounded, k


def _dataset_options(dataset: str | Path) -> dict[str, Any]:
    """The retrieval options the dataset was built with (its ``stats.json``), defaults if none."""
    from crawl.dataset import DatasetOptions

    try:
        stats = json.loads((Path(dataset) / "stats.json").read_text(encoding="utf-8"))
        recorded = stats.get("options") or {}
    except (OSError, ValueError, AttributeError):
        recorded = {}
    known = {"seed", "copypasta_threads", "distractors"}
    fields = DatasetOptions.__dataclass_fields__
    return {key: value for key, value in recorded.items() if key in known and key in fields}


def context_loss(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    config: FinetuneConfig,
    forum_db: str | Path,
    k: int,
) -> ContextLoss:
    """Both models' test loss on the same rows, with the question alone and with context.

    Rows whose grounded prompt does not fit ``max_length`` are left out of
    both, so the two losses are over the same completions.
    """
    from finetune.data import token_length

    plain, grounded, passages = rows_with_and_without_context(rows, config.dataset, forum_db, k)
    kept = [
        (alone, context)
        for alone, context in zip(plain, grounded, strict=True)
        if token_length(tokenizer, context) <= config.max_length
    ]
    if not kept:
        raise UserError(
            f"no test row fits max_length={config.max_length} with {passages} passages of "
            "context: lower --k"
        )
    base, finetuned = split_losses(model, tokenizer, [alone for alone, _ in kept], config)
    base_context, finetuned_context = split_losses(
        model, tokenizer, [context for _, context in kept], config
    )
    return ContextLoss(len(kept), passages, base, finetuned, base_context, finetuned_context)


def check_knowledge(
    model: Any,
    tokenizer: Any,
    run: Path,
    knowledge: str | Path,
    forum_db: str | Path | None,
    k: int,
    rows: Sequence[dict[str, Any]],
    config: FinetuneConfig,
    max_new_tokens: int,
) -> KnowledgeReport:
    """The knowledge check and the context loss of a loaded run (``forum_db`` None: ungrounded)."""
    from finetune.knowledge import load_knowledge

    items = load_knowledge(knowledge)
    loss = None
    if forum_db is None:
        answers = knowledge_answers(model, tokenizer, items, None, k, max_new_tokens)
    else:
        from crawl.search import Retriever

        with Retriever.open(forum_db) as retriever:
            answers = knowledge_answers(model, tokenizer, items, retriever, k, max_new_tokens)
        loss = context_loss(model, tokenizer, rows, config, forum_db, k)
    return KnowledgeReport(
        run_dir=str(run),
        knowledge_file=str(knowledge),
        forum_db=None if forum_db is None else str(forum_db),
        k=k,
        items=items,
        answers=answers,
        loss=loss,
    )


def _trained_k(adapter_dir: Path) -> int:
    """Passages per question the adapter learned to read (serving uses as many), else 3."""
    from finetune.grounding import read_grounding

    grounding = read_grounding(adapter_dir)
    return grounding.k if grounding is not None else DEFAULT_K


def evaluate_run(
    run_dir: str | Path,
    *,
    prompts: str | Path | None = None,
    max_rows: int = 200,
    max_new_tokens: int = 256,
    questions: int = 20,
    knowledge: str | Path | None = None,
    forum_db: str | Path | None = None,
    k: int | None = None,
) -> EvaluationReport:
    """Evaluate a finished run; writes ``evaluation.json`` and ``evaluation.md`` into it.

    ``questions`` test-split questions (one per thread) are answered by both
    models and compared with the forum's answers; 0 skips them. A
    ``knowledge`` check file adds the knowledge check, grounded on the store
    at ``forum_db`` (none: ungrounded only) with ``k`` passages (default: as
    many as the adapter was trained with, else 3), written to
    ``knowledge.json`` and ``knowledge.md``.
    """
    from finetune.data import drop_long_rows, load_dataset_dir
    from finetune.modeling import load_for_inference

    run = require_run_dir(run_dir)
    if max_rows < 0 or max_new_tokens < 1 or questions < 0 or (k is not None and k < 1):
        raise UserError(
            "--max-rows and --questions must be 0 or more, --max-new-tokens and --k at least 1"
        )
    config = FinetuneConfig.load(run / RESOLVED_CONFIG_FILE)
    prompt_set = load_prompts(prompts)
    if knowledge is not None:
        from finetune.knowledge import load_knowledge

        load_knowledge(knowledge)  # a bad file or store fails before the model loads
        if forum_db is not None:
            from crawl.search import Retriever

            Retriever.open(forum_db).close()
        if k is None:
            k = _trained_k(run / ADAPTER_DIR)
    splits = load_dataset_dir(config.dataset)

    model, tokenizer = load_for_inference(
        base_model(run / ADAPTER_DIR), run / ADAPTER_DIR, load_in_4bit=config.load_in_4bit
    )
    rows = drop_long_rows(tokenizer, splits.test[: max_rows or None], config.max_length).kept
    if not rows:
        raise UserError(f"no test row fits max_length={config.max_length}")
    base_loss, finetuned_loss = split_losses(model, tokenizer, rows, config)
    model.eval()
    test_answers = answer_test_questions(
        model, tokenizer, distinct_questions(splits.test, questions), max_new_tokens
    )
    knowledge_report = None
    if knowledge is not None:
        knowledge_report = check_knowledge(
            model, tokenizer, run, knowledge, forum_db, k or DEFAULT_K, rows, config, max_new_tokens
        )
    report = EvaluationReport(
        run_dir=str(run),
        test_rows=len(rows),
        base_loss=base_loss,
        finetuned_loss=finetuned_loss,
        answers=answer_prompts(model, tokenizer, prompt_set, max_new_tokens),
        test_answers=test_answers,
        knowledge=knowledge_report,
    )
    (run / "evaluation.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    (run / "evaluation.md").write_text(report.to_markdown(), encoding="utf-8")
    if knowledge_report is not None:
        (run / KNOWLEDGE_JSON).write_text(json.dumps(knowledge_report.to_json(), indent=2) + "\n")
        (run / KNOWLEDGE_MARKDOWN).write_text(knowledge_report.to_markdown(), encoding="utf-8")
    return report
