"""What a run learned to read: the grounded layout and how many passages, from dataset to adapter.

``crawl dataset --context K`` records its layout and K in ``stats.json``;
training copies them into the manifest and beside the adapter
(``adapter/grounding.json``), so whatever serves or evaluates the adapter
grounds its answers exactly as the adapter was trained. An adapter without
the file was trained on questions alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.errors import UserError

GROUNDING_FILE = "grounding.json"


@dataclass(frozen=True)
class Grounding:
    layout: str  # crawl.layout.LAYOUT of the rows it was trained on
    k: int  # passages per prompt


def dataset_grounding(dataset_dir: str | Path) -> Grounding | None:
    """The grounding a dataset's rows carry (its ``stats.json``), or None for plain rows."""
    stats_path = Path(dataset_dir) / "stats.json"
    try:
        context = json.loads(stats_path.read_text(encoding="utf-8")).get("context")
    except (OSError, ValueError, AttributeError):
        return None  # a dataset made by hand may have no stats: its rows are what they are
    if not isinstance(context, dict) or not context.get("k"):
        return None
    return Grounding(layout=str(context["layout"]), k=int(context["k"]))


def write_grounding(adapter_dir: str | Path, grounding: Grounding) -> None:
    (Path(adapter_dir) / GROUNDING_FILE).write_text(
        json.dumps(asdict(grounding), indent=2) + "\n", encoding="utf-8"
    )


def read_grounding(adapter_dir: str | Path) -> Grounding | None:
    """The grounding an adapter was trained with; None when it was trained ungrounded."""
    path = Path(adapter_dir) / GROUNDING_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Grounding(layout=str(data["layout"]), k=int(data["k"]))
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f'{path} is not a grounding record (want {{"layout": …, "k": …}}): '
            "train the adapter again or delete the file"
        ) from None
