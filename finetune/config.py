"""Training configuration: one dataclass per concern, composed per trainer, parsed the way trl does.

:class:`ModelArguments` (the base and how it is loaded), :class:`LoraArguments`
(the adapter's shape), :class:`TrainingArguments` (optimizer, schedule,
data, run directory) and :class:`SftArguments` make :class:`FinetuneConfig`;
DPO composes its own from the same parts (:mod:`finetune.dpo_config`), so
neither carries a key it ignores.

Every key is both a YAML key (``learning_rate: 1e-4``) and an option
(``--learning-rate 1e-4`` or ``--learning_rate 1e-4``), as in trl's example
scripts: trl's :class:`~trl.TrlParser` turns the file into the parser's
defaults and the command line wins. Validation belongs to the libraries:
argparse converts what was typed, pydantic checks every value's type whatever
its source (YAML, command line, a saved run), and each ``__post_init__``
checks ranges. Operators' scripts rely on ``--model``, ``--dataset``,
``--output-dir``, ``--max-steps`` and ``--resume`` keeping those names.

Parsing fails with one line naming the key and the fix; the YAML is checked
before torch is imported so a typo costs no start-up time.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import pydantic
import yaml
from pydantic.dataclasses import dataclass
from trl import TrlParser

from finetune.errors import UserError
from finetune.modeling import DEFAULT_BASE_MODEL
from freeski_common.cli import OneLineErrors

__all__ = [
    "ConfigParser",
    "FinetuneConfig",
    "LoraArguments",
    "ModelArguments",
    "SftArguments",
    "TrainingArguments",
    "parse_config",
]

Optimizer = Literal[
    "auto",
    "paged_adamw_8bit",
    "adamw_8bit",
    "paged_adamw_32bit",
    "adamw_torch",
    "adamw_torch_fused",
]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]


def _at_least(config: object, minimum: float, *names: str) -> None:
    for name in names:
        if getattr(config, name) < minimum:
            bound = "must be at least 1" if minimum == 1 else "must not be negative"
            raise UserError(f"{name}={getattr(config, name)} {bound}")


@dataclass
class ModelArguments:
    """The frozen base and how it is held in memory."""

    model: str = field(
        default=DEFAULT_BASE_MODEL,
        metadata={"help": "Hugging Face id or local directory of the base model"},
    )
    load_in_4bit: bool = field(
        default=True, metadata={"help": "hold the frozen base in 4-bit (QLoRA)"}
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(
        default="nf4", metadata={"help": "4-bit data type"}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "also quantize the quantization constants"}
    )


@dataclass
class LoraArguments:
    """The shape of a new LoRA adapter (DPO continues an adapter, so it has none of these)."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "module names to adapt, or all-linear for every linear projection"},
    )
    lora_modules_to_save: list[str] = field(
        default_factory=list,
        metadata={
            "help": "modules trained in full and saved beside the adapter (e.g. lm_head); "
            "LoRA servers such as vLLM do not load these"
        },
    )

    def __post_init__(self) -> None:
        _at_least(self, 1, "lora_r", "lora_alpha")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if not self.lora_target_modules:
            raise UserError("lora_target_modules is empty: name modules or use all-linear")

    @property
    def target_modules(self) -> str | list[str]:
        """peft's spelling: the string ``"all-linear"`` or a list of module names."""
        if self.lora_target_modules == ["all-linear"]:
            return "all-linear"
        return list(self.lora_target_modules)


@dataclass
class TrainingArguments:
    """What every trainer of a run shares: optimizer, schedule, data, evaluation and output."""

    max_steps: int = field(default=500, metadata={"help": "optimizer steps to train for"})
    per_device_train_batch_size: int = field(
        default=2, metadata={"help": "sequences per forward pass"}
    )
    gradient_accumulation_steps: int = field(
        default=4, metadata={"help": "forward passes per optimizer step"}
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    lr_scheduler_type: Scheduler = field(
        default="cosine", metadata={"help": "learning-rate schedule"}
    )
    warmup_steps: float = field(
        default=0.03, metadata={"help": "warmup: steps, or a fraction of max_steps when below 1"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=0.3, metadata={"help": "gradient clipping norm"})
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "recompute activations in backward to save memory"}
    )
    optim: Optimizer = field(
        default="auto",
        metadata={"help": "optimizer; auto = paged 8-bit AdamW on CUDA, AdamW on CPU"},
    )
    seed: int = field(default=42, metadata={"help": "seed for LoRA init, data order and dropout"})
    logging_steps: int = field(default=10, metadata={"help": "log train loss every N steps"})
    eval_steps: int = field(
        default=50, metadata={"help": "evaluate on the test split every N steps"}
    )
    save_steps: int = field(
        default=50, metadata={"help": "write a resumable checkpoint every N steps"}
    )
    save_total_limit: int = field(default=3, metadata={"help": "checkpoints to keep"})
    dataset: str = field(
        default="data/dataset", metadata={"help": "directory with train.jsonl and test.jsonl"}
    )
    max_length: int = field(
        default=1024, metadata={"help": "tokens per row; longer rows are dropped and counted"}
    )
    eval_max_rows: int = field(
        default=200, metadata={"help": "test rows used for evaluation (0 = all)"}
    )
    output_dir: str | None = field(default=None, metadata={"help": "run directory to write"})
    resume: bool = field(
        default=False,
        metadata={"help": "continue the run in output_dir from its latest checkpoint"},
    )
    num_samples: int = field(
        default=5, metadata={"help": "test questions answered by both models in samples.md"}
    )
    sample_max_new_tokens: int = field(
        default=256, metadata={"help": "answer length limit for samples.md"}
    )

    def __post_init__(self) -> None:
        _at_least(
            self,
            1,
            "max_steps",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "save_total_limit",
            "sample_max_new_tokens",
        )
        _at_least(self, 0, "eval_max_rows", "num_samples", "weight_decay", "warmup_steps")
        if self.max_length < 16:
            raise UserError(f"max_length={self.max_length} is too short: use at least 16 tokens")
        if self.learning_rate <= 0 or self.max_grad_norm <= 0:
            raise UserError("learning_rate and max_grad_norm must be positive")

    @property
    def run_dir(self) -> Path:
        if not self.output_dir:
            raise UserError(
                "no run directory: pass --output-dir DIR (or set output_dir in the YAML)"
            )
        return Path(self.output_dir).expanduser()


@dataclass
class SftArguments:
    """What only supervised training uses."""

    packing: bool = field(
        default=False,
        metadata={"help": "pack rows into max_length sequences without padding (bfd)"},
    )
    check_memory: bool = field(
        default=True, metadata={"help": "refuse to start when the estimate does not fit the GPU"}
    )


Config = TypeVar("Config", bound="SavedConfig")


class SavedConfig:
    """A composed config as a run's ``config.yaml``: written at the start, read by resume and tools."""

    # Keys runs saved before a config stopped having them: skipped when such a run is read back.
    retired_keys: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        # Each part checks its own values; a composed config runs every part's checks.
        for part in type(self).__mro__[1:]:
            check = part.__dict__.get("__post_init__")
            if check is not None and part is not SavedConfig:
                check(self)

    def to_yaml(self) -> str:
        # every SavedConfig is a composed @dataclass; the mixin itself cannot say so to mypy
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)  # type: ignore[call-overload]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    @classmethod
    def load(cls: type[Config], path: str | Path) -> Config:
        """Read a saved ``config.yaml`` (a run's, for resume, evaluate and merge)."""
        values = read_yaml_mapping(Path(path))
        values = {k: v for k, v in values.items() if k not in cls.retired_keys}
        reject_unknown_keys(values, str(path), config_keys(cls))
        return build(cls, values, where=str(path))


@dataclass
class FinetuneConfig(SavedConfig, SftArguments, TrainingArguments, LoraArguments, ModelArguments):
    """Everything a supervised run needs; the resolved copy is saved as the run's ``config.yaml``."""


def build(config_class: type[Config], values: dict[str, Any], *, where: str = "") -> Config:
    """``config_class(**values)``, pydantic's verdict on a value reported as one line."""
    try:
        return config_class(**values)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        prefix = f"{where}: " if where else ""
        raise UserError(
            f"{prefix}{key}={error['input']!r} is not valid: {error['msg'].lower()}"
        ) from None


def config_keys(config_class: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(config_class))


def _suggestion(key: str, known: Sequence[str], *, as_option: bool = False) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
    if not close:
        return ""
    return (
        f" (did you mean --{close[0].replace('_', '-')}?)"
        if as_option
        else f" (did you mean {close[0]}?)"
    )


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold key: value pairs, not a {type(values).__name__}")
    return values


def reject_unknown_keys(values: dict[str, Any], where: str, known: Sequence[str]) -> None:
    for key in values:
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r}{_suggestion(str(key), known)}")


class ConfigParser(OneLineErrors, TrlParser):
    """trl's YAML + CLI parser, with failures reported as :class:`UserError` lines."""

    def __init__(
        self,
        prog: str = "python -m finetune",
        config_class: type[SavedConfig] = FinetuneConfig,
    ) -> None:
        fields = dataclasses.fields(config_class)  # type: ignore[arg-type]  # a composed @dataclass
        declared = [f.type for f in fields]
        super().__init__(config_class, prog=prog, allow_abbrev=False)  # type: ignore[arg-type]  # a composed @dataclass
        # HfArgumentParser narrows ``X | None`` to ``X`` on the shared Field objects; a config
        # composed from the same parts later (DpoConfig after FinetuneConfig) needs the truth.
        for f, hint in zip(fields, declared, strict=True):
            f.type = hint
        self.config_class = config_class
        self.known = config_keys(config_class)
        self.add_argument("--config", help="YAML file of config keys (command line wins)")

    def parse(self, argv: Sequence[str]) -> Any:
        """``--config FILE`` sets the defaults (as TrlParser does), the command line wins."""
        args = list(argv)
        config_path = _pop_config_path(args)
        where = ""
        if config_path is not None:
            values = read_yaml_mapping(config_path)
            reject_unknown_keys(values, str(config_path), self.known)
            self.set_defaults_with_config(**values)
            # argparse has typed the command line; a value pydantic refuses came from the file
            where = str(config_path)
        namespace, unknown = self.parse_known_args(args)
        if unknown:
            option = next((a for a in unknown if a.startswith("-")), unknown[0])
            raise UserError(
                f"unknown option {option}"
                f"{_suggestion(option.lstrip('-'), self.known, as_option=True)} "
                f"(see {self.prog} --help)"
            )
        values = {k: v for k, v in vars(namespace).items() if k in self.known}
        return build(self.config_class, values, where=where)


def _pop_config_path(args: list[str]) -> Path | None:
    """Take ``--config FILE`` (or ``--config=FILE``) out of ``args``."""
    for index, arg in enumerate(args):
        if arg == "--config":
            if index + 1 >= len(args) or args[index + 1].startswith("--"):
                raise UserError("--config needs a YAML file path")
            path = args[index + 1]
            del args[index : index + 2]
            return Path(path)
        if arg.startswith("--config="):
            del args[index]
            return Path(arg.split("=", 1)[1])
    return None


def parse_config(argv: Sequence[str]) -> FinetuneConfig:
    """The resolved config for ``argv`` (``--config FILE`` plus overrides)."""
    config: FinetuneConfig = ConfigParser().parse(argv)
    return config
