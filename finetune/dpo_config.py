"""``python -m finetune dpo``'s configuration: the shared parts plus what preference training adds.

One YAML file + command-line overrides, parsed exactly like a training
config (:class:`finetune.config.ConfigParser`). There are no ``lora_*`` keys:
DPO continues an SFT adapter, whose shape is its own. ``model`` may be left
out: the base is the one the adapter was trained on
(:func:`finetune.run.base_model`); a config naming another is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field
from pathlib import Path
from typing import ClassVar, Literal

from pydantic.dataclasses import dataclass

from finetune.config import ConfigParser, ModelArguments, SavedConfig, TrainingArguments
from finetune.errors import UserError
from finetune.run import ADAPTER_CONFIG_FILE

LossType = Literal["sigmoid", "ipo", "hinge", "robust"]


@dataclass
class DpoArguments:
    """The preference loss and the adapter it continues."""

    adapter: str | None = field(
        default=None,
        metadata={"help": "the SFT run's adapter/ directory to continue from (required)"},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "how far the policy may move from the SFT adapter (higher: less)"},
    )
    loss_type: LossType = field(default="sigmoid", metadata={"help": "DPO loss variant"})
    min_pairs: int = field(
        default=2,
        metadata={"help": "refuse a preference set with fewer train pairs than this"},
    )

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise UserError(f"beta={self.beta} must be positive")
        if self.min_pairs < 1:
            raise UserError(f"min_pairs={self.min_pairs} must be at least 1")

    @property
    def adapter_dir(self) -> Path:
        if not self.adapter:
            raise UserError("no SFT adapter: pass --adapter RUN/adapter (the run to continue)")
        path = Path(self.adapter).expanduser()
        if not (path / ADAPTER_CONFIG_FILE).is_file():
            raise UserError(
                f"--adapter {path}: no {ADAPTER_CONFIG_FILE} there; "
                "point it at an SFT run's adapter/"
            )
        return path


@dataclass
class DpoConfig(SavedConfig, DpoArguments, TrainingArguments, ModelArguments):
    """A DPO run continuing an SFT adapter; saved as the run's ``config.yaml``."""

    # DPO runs saved these (unused) until the config lost them; such runs still resume.
    retired_keys: ClassVar[tuple[str, ...]] = (
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "lora_modules_to_save",
        "packing",
        "check_memory",
    )

    model: str | None = field(  # type: ignore[assignment]  # None: the adapter's own base
        default=None,
        metadata={"help": "the base model; default and only choice: the adapter's own base"},
    )
    dataset: str = field(
        default="data/preferences",
        metadata={"help": "directory written by `python -m bot feedback export`"},
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate"})


def parse_dpo_config(argv: Sequence[str]) -> DpoConfig:
    config: DpoConfig = ConfigParser(prog="python -m finetune dpo", config_class=DpoConfig).parse(
        argv
    )
    return config
