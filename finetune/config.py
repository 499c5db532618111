"""The one training configuration: a YAML file, then command-line overrides of any key.

Every key of :class:`FinetuneConfig` is both a YAML key (``learning_rate: 1e-4``)
and an option (``--learning-rate 1e-4`` or ``--learning_rate 1e-4``), the way
trl's example scripts work: the file sets the parser's defaults and the
command line wins. Operators' scripts rely on ``--model``, ``--dataset``,
``--output-dir``, ``--max-steps`` and ``--resume`` keeping those names.

Parsing fails with one line naming the key, the file and the fix; the YAML is
checked before torch is imported so a typo costs no start-up time.
"""

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from trl.scripts.utils import TrlParser

from finetune.errors import UserError
from finetune.modeling import DEFAULT_BASE_MODEL
from freeski_common.cli import OneLineErrors

RESOLVED_CONFIG_FILE = "config.yaml"


def require_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a path, after checking it holds a finetune run (its resolved config)."""
    run = Path(run_dir).expanduser()
    if not (run / RESOLVED_CONFIG_FILE).is_file():
        raise UserError(f"{run} is not a run directory (no {RESOLVED_CONFIG_FILE})")
    return run


Optimizer = Literal[
    "auto",
    "paged_adamw_8bit",
    "adamw_8bit",
    "paged_adamw_32bit",
    "adamw_torch",
    "adamw_torch_fused",
]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]


@dataclass
class FinetuneConfig:
    """Everything a training run needs; the resolved copy is saved as the run's ``config.yaml``."""

    # model
    model: str = field(
        default=DEFAULT_BASE_MODEL,
        metadata={"help": "Hugging Face id or local directory of the base model"},
    )
    # quantization
    load_in_4bit: bool = field(
        default=True, metadata={"help": "hold the frozen base in 4-bit (QLoRA)"}
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(
        default="nf4", metadata={"help": "4-bit data type"}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "also quantize the quantization constants"}
    )
    # LoRA
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
    # training
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
    packing: bool = field(
        default=False,
        metadata={"help": "pack rows into max_length sequences without padding (bfd)"},
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
    # data
    dataset: str = field(
        default="data/dataset", metadata={"help": "directory with train.jsonl and test.jsonl"}
    )
    max_length: int = field(
        default=1024, metadata={"help": "tokens per row; longer rows are dropped and counted"}
    )
    eval_max_rows: int = field(
        default=200, metadata={"help": "test rows used for evaluation (0 = all)"}
    )
    # output
    output_dir: str | None = field(default=None, metadata={"help": "run directory to write"})
    resume: bool = field(
        default=False,
        metadata={"help": "continue the run in output_dir from its latest checkpoint"},
    )
    num_samples: int = field(
        default=5, metadata={"help": "test questions answered by base and finetuned in samples.md"}
    )
    sample_max_new_tokens: int = field(
        default=256, metadata={"help": "answer length limit for samples.md"}
    )
    check_memory: bool = field(
        default=True, metadata={"help": "refuse to start when the estimate does not fit the GPU"}
    )

    def __post_init__(self) -> None:
        _check_types(self)
        positive = (
            "max_steps",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "lora_r",
            "lora_alpha",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "save_total_limit",
            "sample_max_new_tokens",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("eval_max_rows", "num_samples", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)} must not be negative")
        if self.max_length < 16:
            raise UserError(f"max_length={self.max_length} is too short: use at least 16 tokens")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.learning_rate <= 0 or self.max_grad_norm <= 0:
            raise UserError("learning_rate and max_grad_norm must be positive")
        if not self.lora_target_modules:
            raise UserError("lora_target_modules is empty: name modules or use all-linear")

    @property
    def target_modules(self) -> str | list[str]:
        """peft's spelling: the string ``"all-linear"`` or a list of module names."""
        if self.lora_target_modules == ["all-linear"]:
            return "all-linear"
        return list(self.lora_target_modules)

    @property
    def run_dir(self) -> Path:
        if not self.output_dir:
            raise UserError(
                "no run directory: pass --output-dir DIR (or set output_dir in the YAML)"
            )
        return Path(self.output_dir).expanduser()

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "FinetuneConfig":
        """Read a saved ``config.yaml`` (a run's, for evaluate and merge)."""
        values = _read_yaml_mapping(Path(path))
        _reject_unknown_keys(values, f"{path}", config_keys(cls))
        return cls(**values)


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:  # YAML and argparse give ints for whole numbers
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin is list:
        return "a list of " + _describe(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint) if a is not type(None))
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _check_types(config: FinetuneConfig) -> None:
    """YAML values become argparse defaults untouched, so types are checked here, once."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _type_ok(value, hints[f.name]):
            raise UserError(f"{f.name}={value!r} is not valid: expected {_describe(hints[f.name])}")
        if hints[f.name] is float and isinstance(value, int):
            setattr(config, f.name, float(value))


def config_keys(config_class: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(config_class))


KNOWN_KEYS = config_keys(FinetuneConfig)


def _suggestion(key: str, *, as_option: bool = False, known: Sequence[str] = KNOWN_KEYS) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
    if not close:
        return ""
    return (
        f" (did you mean --{close[0].replace('_', '-')}?)"
        if as_option
        else f" (did you mean {close[0]}?)"
    )


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
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


def _reject_unknown_keys(
    values: dict[str, Any], where: str, known: Sequence[str] = KNOWN_KEYS
) -> None:
    for key in values:
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r}{_suggestion(str(key), known=known)}")


class ConfigParser(OneLineErrors, TrlParser):
    """trl's YAML + CLI parser, with failures reported as :class:`UserError` lines."""

    def __init__(
        self, prog: str = "python -m finetune", config_class: type[FinetuneConfig] = FinetuneConfig
    ) -> None:
        super().__init__(config_class, prog=prog, allow_abbrev=False)
        self.config_class = config_class
        self.known = config_keys(config_class)
        self.add_argument("--config", help="YAML file of config keys (command line wins)")

    def parse(self, argv: Sequence[str]) -> FinetuneConfig:
        args = list(argv)
        config_path = _pop_config_path(args)
        if config_path is not None:
            values = _read_yaml_mapping(config_path)
            _reject_unknown_keys(values, str(config_path), self.known)
            # The file sets defaults, so the command line still wins (what TrlParser does).
            self.set_defaults_with_config(**values)
        namespace, unknown = self.parse_known_args(args)
        if unknown:
            option = next((a for a in unknown if a.startswith("-")), unknown[0])
            raise UserError(
                f"unknown option {option}"
                f"{_suggestion(option.lstrip('-'), as_option=True, known=self.known)} "
                f"(see {self.prog} --help)"
            )
        values = {k: v for k, v in vars(namespace).items() if k in self.known}
        return self.config_class(**values)


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
    return ConfigParser().parse(argv)
