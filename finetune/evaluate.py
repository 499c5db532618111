"""``python -m finetune evaluate``: how much better the adapter is, and what it now says.

The loss is trl's own evaluation loss (completion tokens only, the same
tokenization as training) on the run's test split, once with the adapter and
once without; perplexity is its exponential. The answers come from a prompt
set of ski questions, short and long, plus a few off-topic ones that catch a
finetune which forgot how to do anything but ski talk. Base and finetuned
answers to one prompt are rows of the same mixed-adapter batch.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.config import RESOLVED_CONFIG_FILE, FinetuneConfig
from finetune.errors import UserError

PROMPTS_DIR = Path(__file__).with_name("prompts")
DEFAULT_PROMPTS = PROMPTS_DIR / "ski_prompts.json"
PROMPT_KINDS = ("short", "long", "off-topic")
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


def render_prompts_markdown(prompts: Sequence[Prompt]) -> str:
    """The Markdown form of a prompt set (``load_prompts`` reads it back identically)."""
    parts = [
        "# Ski prompt set\n",
        "Questions both models answer in `python -m finetune evaluate`. Each section is "
        "`## kind: id`; kinds are short, long and off-topic.\n",
    ]
    for prompt in prompts:
        parts.append(f"## {prompt.kind}: {prompt.id}\n\n{prompt.question.strip()}\n")
    return "\n".join(parts)


@dataclass(frozen=True)
class PromptAnswer:
    id: str
    kind: str
    question: str
    base: str
    finetuned: str


@dataclass(frozen=True)
class EvaluationReport:
    run_dir: str
    test_rows: int
    base_loss: float
    finetuned_loss: float
    answers: list[PromptAnswer]

    @property
    def base_perplexity(self) -> float:
        return math.exp(self.base_loss)

    @property
    def finetuned_perplexity(self) -> float:
        return math.exp(self.finetuned_loss)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["base_perplexity"] = self.base_perplexity
        data["finetuned_perplexity"] = self.finetuned_perplexity
        return data

    def summary(self) -> str:
        return (
            f"test split ({self.test_rows} rows): "
            f"base loss {self.base_loss:.4f} (perplexity {self.base_perplexity:.2f}), "
            f"finetuned loss {self.finetuned_loss:.4f} (perplexity {self.finetuned_perplexity:.2f}); "
            f"{len(self.answers)} prompts answered, see {Path(self.run_dir) / 'evaluation.md'}"
        )

    def to_markdown(self) -> str:
        from finetune.report import blockquote, table_cell

        lines = [
            f"# Evaluation of {self.run_dir}\n",
            "| | Loss | Perplexity |",
            "| --- | --- | --- |",
            f"| Base | {self.base_loss:.4f} | {self.base_perplexity:.2f} |",
            f"| Finetuned | {self.finetuned_loss:.4f} | {self.finetuned_perplexity:.2f} |\n",
            f"Loss on the completions of {self.test_rows} test rows.\n",
        ]
        for answer in self.answers:
            lines += [
                f"## {answer.id} ({answer.kind})\n",
                blockquote(answer.question),
                "| Base | Finetuned |",
                "| --- | --- |",
                f"| {table_cell(answer.base)} | {table_cell(answer.finetuned)} |\n",
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
    from finetune.generation import GenerationSettings, generate_texts

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    answers = []
    for start in range(0, len(prompts), GENERATION_BATCH_PROMPTS):
        chunk = prompts[start : start + GENERATION_BATCH_PROMPTS]
        conversations = [[{"role": "user", "content": p.question}] for p in chunk for _ in (0, 1)]
        variants = ["base", "finetuned"] * len(chunk)
        texts = generate_texts(model, tokenizer, conversations, settings, variants=variants)
        for index, prompt in enumerate(chunk):
            answers.append(
                PromptAnswer(
                    prompt.id, prompt.kind, prompt.question, texts[2 * index], texts[2 * index + 1]
                )
            )
    return answers


def evaluate_run(
    run_dir: str | Path,
    *,
    prompts: str | Path | None = None,
    max_rows: int = 200,
    max_new_tokens: int = 256,
) -> EvaluationReport:
    """Evaluate a finished run; writes ``evaluation.json`` and ``evaluation.md`` into it."""
    from finetune.data import drop_long_rows, load_dataset_dir
    from finetune.modeling import load_for_inference
    from finetune.train import ADAPTER_DIR

    run = Path(run_dir).expanduser()
    if not (run / RESOLVED_CONFIG_FILE).is_file():
        raise UserError(f"{run} is not a run directory (no {RESOLVED_CONFIG_FILE})")
    if max_rows < 0 or max_new_tokens < 1:
        raise UserError("--max-rows must be 0 or more and --max-new-tokens at least 1")
    config = FinetuneConfig.load(run / RESOLVED_CONFIG_FILE)
    prompt_set = load_prompts(prompts)
    splits = load_dataset_dir(config.dataset)

    model, tokenizer = load_for_inference(
        config.model, run / ADAPTER_DIR, load_in_4bit=config.load_in_4bit
    )
    rows = drop_long_rows(tokenizer, splits.test[: max_rows or None], config.max_length).kept
    if not rows:
        raise UserError(f"no test row fits max_length={config.max_length}")
    base_loss, finetuned_loss = split_losses(model, tokenizer, rows, config)
    model.eval()
    report = EvaluationReport(
        run_dir=str(run),
        test_rows=len(rows),
        base_loss=base_loss,
        finetuned_loss=finetuned_loss,
        answers=answer_prompts(model, tokenizer, prompt_set, max_new_tokens),
    )
    (run / "evaluation.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    (run / "evaluation.md").write_text(report.to_markdown(), encoding="utf-8")
    return report
