"""``python -m finetune dpo``'s configuration: the SFT keys plus what preference training adds.

One YAML file + command-line overrides, parsed exactly like a training
config (:class:`finetune.config.ConfigParser`). The LoRA shape is the SFT
adapter's own: DPO continues that adapter, so the ``lora_*`` keys are not
used and are kept only so an SFT config can be reused as a starting point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from finetune.config import ConfigParser, FinetuneConfig
from finetune.errors import UserError

LossType = Literal["sigmoid", "ipo", "hinge", "robust"]


@dataclass
class DpoConfig(FinetuneConfig):
    """A DPO run continuing an SFT adapter; saved as the run's ``config.yaml``."""

    adapter: str | None = field(
        default=None,
        metadata={"help": "the SFT run's adapter/ directory to continue from (required)"},
    )
    dataset: str = field(
        default="data/preferences",
        metadata={"help": "directory written by `python -m bot feedback export`"},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "how far the policy may move from the SFT adapter (higher: less)"},
    )
    loss_type: LossType = field(default="sigmoid", metadata={"help": "DPO loss variant"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    min_pairs: int = field(
        default=2,
        metadata={"help": "refuse a preference set with fewer train pairs than this"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise UserError(f"beta={self.beta} must be positive")
        if self.min_pairs < 1:
            raise UserError(f"min_pairs={self.min_pairs} must be at least 1")

    @property
    def adapter_dir(self) -> Path:
        if not self.adapter:
            raise UserError("no SFT adapter: pass --adapter RUN/adapter (the run to continue)")
        path = Path(self.adapter).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise UserError(
                f"--adapter {path}: no adapter_config.json there; point it at an SFT run's adapter/"
            )
        return path


def parse_dpo_config(argv: Sequence[str]) -> DpoConfig:
    config = ConfigParser(prog="python -m finetune dpo", config_class=DpoConfig).parse(argv)
    assert isinstance(config, DpoConfig)
    return config
