"""The human-readable side of a run directory: loss.png, samples.md and manifest.json.

All three are drawn from files the run already wrote (``metrics.jsonl``, the
dataset, the adapter), so a report can be rebuilt after the fact and a
resumed run reports its whole history, not just the last stretch.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

RESOLVED_CONFIG_FILE = "config.yaml"  # the run's config, every default filled in
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
SAMPLES_FILE = "samples.md"
MANIFEST_FILE = "manifest.json"

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def loss_series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def plot_losses(records: Sequence[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Train and eval loss against optimizer step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for key, label, style in (("loss", "train", "-"), ("eval_loss", "eval (test split)", "o-")):
        steps, values = loss_series(records, key)
        if steps:
            ax.plot(steps, values, style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


@dataclass(frozen=True)
class Sample:
    question: str
    ground_truth: str
    base: str
    finetuned: str


def table_cell(text: str) -> str:
    """Multi-line text as one Markdown table cell."""
    text = text.strip() or "*(empty)*"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def blockquote(text: str) -> str:
    """Multi-line text as one Markdown block quote (the question above an answers table)."""
    return "> " + text.strip().replace("\n", "\n> ") + "\n"


def render_samples(samples: Sequence[Sample], title: str) -> str:
    parts = [
        f"# {title}\n",
        "Each question is from the test split; base and finetuned answers come from one "
        "mixed-adapter batch (greedy decoding).\n",
    ]
    for number, sample in enumerate(samples, start=1):
        heading = sample.question.strip().splitlines()[0] if sample.question.strip() else "(empty)"
        parts += [
            f"## {number}. {heading}\n",
            blockquote(sample.question),
            "| Forum answer (ground truth) | Base model | Finetuned |",
            "| --- | --- | --- |",
            f"| {table_cell(sample.ground_truth)} | {table_cell(sample.base)} | {table_cell(sample.finetuned)} |\n",
        ]
    return "\n".join(parts)


def loss_verdict(base_loss: float, finetuned_loss: float) -> str:
    """One line a person can act on: did the adapter learn the forum (held-out loss)?"""
    change = f"held-out loss {base_loss:.2f} → {finetuned_loss:.2f}"
    if finetuned_loss <= base_loss * 0.98:
        return f"{change}: the adapter learned the forum"
    if finetuned_loss < base_loss * 1.02:
        return f"{change}: barely moved: train longer or raise the learning rate"
    return f"{change}: got worse: lower the learning rate"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return Path(path)
