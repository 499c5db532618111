"""The one way every stage loads a base model, its tokenizer and a LoRA adapter.

Training, evaluation, the demo and the bot's inference worker all call these
functions, so Mistral-7B, SmolLM2 and the tiny test model go through exactly
the same code: 4-bit NF4 with double quantization via bitsandbytes (or plain
weights), the model's own chat template, and PEFT adapters kept unmerged so
one model can serve base and finetuned rows in one batch.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from finetune.errors import UserError

if TYPE_CHECKING:  # torch is imported lazily: settings errors must not wait for it
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The base model every default points at: training's `model`, the bot's BASE_MODEL.
DEFAULT_BASE_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
DEFAULT_ADAPTER_NAME = "finetuned"
BASE_ADAPTER_NAME = "__base__"  # peft's name for "no adapter" in mixed-adapter batches


def _quiet_libraries() -> None:
    """Keep user output to what they can act on.

    bitsandbytes logs a CPU-kernel warning on every import, peft and trl
    call a transformers method that warns about its own rename, and loading
    draws a progress bar over a few hundred tensors.
    """
    for name in ("bitsandbytes", "bitsandbytes.cextension", "bitsandbytes.backends"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load says nothing
    warnings.filterwarnings(
        "ignore", message=r".*is_gradient_checkpointing", category=FutureWarning
    )


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def resolve_model_source(
    name_or_path: str | os.PathLike[str], required_file: str = "config.json"
) -> str:
    """Return what ``from_pretrained`` should be given, or explain where we looked.

    A local directory must hold ``required_file``. A Hugging Face id is fine
    online; offline it must already be in the local cache.
    """
    name = str(name_or_path).strip()
    if not name:
        raise UserError("no model given: pass a Hugging Face id or a local model directory")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / required_file).is_file():
            raise UserError(f"{path} has no {required_file}: is it a saved model directory?")
        return str(path)
    if _looks_like_path(name):
        raise UserError(
            f"model {name!r} not found: no such directory (looked at {path.resolve()}); "
            f"pass an existing model directory or a Hugging Face id like {DEFAULT_BASE_MODEL}"
        )
    if hub_offline():
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(name, required_file)
        if not isinstance(cached, str):
            raise UserError(
                f"model {name!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                "and HF_HUB_OFFLINE=1 forbids downloading it: download it first "
                "(huggingface-cli download), unset HF_HUB_OFFLINE, or pass a local directory"
            )
    return name


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str | None = None) -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU.

    On CPU fp32 is both the safest and, without AVX512-BF16, the fastest choice.
    """
    import torch

    device = device or best_device()
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass(frozen=True)
class QuantOptions:
    """How to hold the frozen base weights."""

    load_in_4bit: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True

    def bnb_config(self, dtype: torch.dtype) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )


def _from_pretrained(auto_class: Any, source: str, **kwargs: Any) -> Any:
    """``from_pretrained`` with hub failures (no network, gated repo, bad id) as one line."""
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except OSError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"could not load {source!r}: {reason} "
            "(a local directory, or HF_HUB_OFFLINE=1 with the model cached, avoids the network)"
        ) from exc


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a tokenizer ready for batched, left-padded generation and for training.

    Its padding token is never the template's end-of-turn token (see
    :func:`finetune.chat.prepare_tokenizer`), so that token stays trainable.
    """
    from transformers import AutoTokenizer

    source = resolve_model_source(name_or_path, required_file="tokenizer_config.json")
    from finetune.chat import prepare_tokenizer

    tokenizer = _from_pretrained(AutoTokenizer, source)
    if tokenizer.chat_template is None:
        raise UserError(f"tokenizer at {name_or_path} has no chat template: use an Instruct model")
    return prepare_tokenizer(tokenizer)


def load_base_model(
    name_or_path: str | os.PathLike[str],
    *,
    quant: QuantOptions | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load the frozen base, 4-bit NF4 by default, on the best device there is."""
    source = resolve_model_source(name_or_path)
    _quiet_libraries()
    import torch
    from transformers import AutoModelForCausalLM

    quant = quant if quant is not None else QuantOptions()
    device = device or best_device()
    dtype = dtype or compute_dtype(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant.load_in_4bit:
        kwargs["quantization_config"] = quant.bnb_config(dtype)
    if device.startswith("cuda"):
        kwargs["device_map"] = {"": torch.device(device).index or 0}
    model = _from_pretrained(AutoModelForCausalLM, source, **kwargs)
    if not device.startswith("cuda") and not quant.load_in_4bit:
        model.to(device)
    return cast("PreTrainedModel", model)  # the Auto class builds the one its config names


def keep_4bit_layers_differentiable(model: Any) -> int:
    """Stop bitsandbytes switching 4-bit layers to its inference-only CPU kernel; return how many.

    On a CPU with AVX512-BF16, a ``Linear4bit`` that runs once in eval mode
    without gradients (every evaluation during training does) repacks its
    weight for the ``gemv_4bit`` kernel and from then on always calls it. That
    kernel has no backward: torch warns "an autograd kernel was not registered"
    and treats the frozen weight's path as gradient-free, so every layer's
    input gradient loses its ``Wᵀ·grad`` term and the LoRA weights below it get
    wrong gradients for the rest of the run. Training keeps the ordinary
    dequantize-and-matmul path, whose gradients match a dequantized reference
    (tests/test_qlora_gradients.py). Call it before the model's first forward.
    """
    try:
        from bitsandbytes.nn.modules import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers either
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


TRAINING_ADAPTER_NAME = "default"  # peft saves this name flat, other names in a subfolder


def attach_new_adapter(model: PreTrainedModel, lora_config: Any) -> PeftModel:
    """Wrap ``model`` with a fresh, trainable LoRA adapter."""
    from peft import get_peft_model

    keep_4bit_layers_differentiable(model)
    peft_model: PeftModel = get_peft_model(model, lora_config, adapter_name=TRAINING_ADAPTER_NAME)
    return peft_model


def save_adapter(
    peft_model: PeftModel,
    out_dir: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write a run's ``adapter/``: the adapter weights and config at the top, plus the tokenizer.

    The tokenizer (with its chat template) travels with the adapter because it
    is the prompt format the adapter was trained on. Everything is written into
    a hidden directory beside ``out_dir`` and renamed into place last: a run
    killed while saving leaves the previous ``adapter/`` (or none), never a
    half-written one that serving would load.
    """
    import shutil

    out = Path(out_dir)
    names = list(peft_model.peft_config)
    if len(names) != 1:
        raise ValueError(f"expected one adapter to save, found {names}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # what an earlier killed save left behind
    staging.mkdir()
    peft_model.save_pretrained(str(staging))
    nested = staging / names[0]
    if names[0] != TRAINING_ADAPTER_NAME and nested.is_dir():
        for item in nested.iterdir():
            item.replace(staging / item.name)
        nested.rmdir()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging))
    _fsync_tree(staging)
    # A directory cannot be renamed over a non-empty one: the old adapter steps aside first.
    # Between the two renames there is no adapter/ at all, which serving refuses cleanly.
    previous = out.with_name(f".{out.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)
    return out


def _fsync_tree(directory: Path) -> None:
    """Flush the files and the directory itself, so the rename never lands before the data."""
    for path in directory.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_adapter(
    model: PreTrainedModel,
    adapter_path: str | os.PathLike[str],
    *,
    name: str = DEFAULT_ADAPTER_NAME,
    trainable: bool = False,
) -> PeftModel:
    """Attach a saved adapter, unmerged, so base and finetuned rows can share a batch."""
    from peft import PeftModel

    path = Path(adapter_path).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise UserError(
            f"no adapter at {path} (adapter_config.json missing): point it at a run's adapter/ directory"
        )
    if trainable:
        keep_4bit_layers_differentiable(model)
    peft_model = PeftModel.from_pretrained(
        model, str(path), adapter_name=name, is_trainable=trainable
    )
    if not trainable:
        peft_model.eval()
    return peft_model


def load_for_inference(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str] | None = None,
    *,
    load_in_4bit: bool = True,
    device: str | None = None,
) -> tuple[Any, PreTrainedTokenizerBase]:
    """Base model (+ adapter, unmerged, eval mode) and the tokenizer to prompt it with.

    The tokenizer saved with the adapter wins: its chat template is the one the
    adapter was trained with.
    """
    tokenizer_source = (
        adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base
    )
    tokenizer = load_tokenizer(tokenizer_source)
    plain = load_base_model(base, quant=QuantOptions(load_in_4bit=load_in_4bit), device=device)
    model = load_adapter(plain, adapter) if adapter else plain
    model.eval()
    return model, tokenizer


# ---- serving several adapters from one base ----------------------------------------------


@dataclass(frozen=True)
class AdapterWeights:
    """A saved adapter read into memory: what :func:`attach_adapter` needs, and nothing else.

    Reading (disk, hashing, parsing) is the slow part of adding an adapter and
    touches no model, so a server does it off the model's thread; only the
    attach, a copy into freshly made LoRA layers, waits for the model.
    """

    path: Path
    config: Any = field(repr=False)  # a peft LoraConfig, inference mode
    state_dict: dict[str, Any] = field(repr=False)
    weights_hash: str | None
    base_model: str | None  # the base it was trained on, as peft recorded it
    chat_template: str | None  # the one saved with it, if any


ADAPTER_CONFIG_FILE = "adapter_config.json"


def read_adapter(adapter_path: str | os.PathLike[str]) -> AdapterWeights:
    """Read a saved adapter (config, weights on the CPU, hash, saved chat template); no model needed."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    from finetune.fingerprint import adapter_weights_hash

    path = Path(adapter_path).expanduser()
    if not (path / ADAPTER_CONFIG_FILE).is_file():
        raise UserError(
            f"no adapter at {path} ({ADAPTER_CONFIG_FILE} missing): "
            "point it at a finetune run's adapter/ directory"
        )
    try:
        config = PeftConfig.from_pretrained(str(path))
        state_dict = load_peft_weights(str(path), device="cpu")
    except (OSError, ValueError, TypeError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"the adapter at {path} cannot be read: {reason}") from None
    if getattr(config, "peft_type", None) != "LORA":
        raise UserError(
            f"the adapter at {path} is {config.peft_type}, not LoRA: serve a LoRA adapter"
        )
    config.inference_mode = True
    return AdapterWeights(
        path=path,
        config=config,
        state_dict=state_dict,
        weights_hash=adapter_weights_hash(path),
        base_model=getattr(config, "base_model_name_or_path", None),
        chat_template=_saved_chat_template(path),
    )


def _saved_chat_template(directory: Path) -> str | None:
    """The chat template saved beside an adapter (its own file, or in tokenizer_config.json)."""
    import json

    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def template_difference(adapter_template: str | None, base_template: str | None) -> str | None:
    """Where an adapter's saved chat template departs from the base's, in one line; None if not."""
    if adapter_template is None or base_template is None or adapter_template == base_template:
        return None
    at = next(
        (
            i
            for i, (a, b) in enumerate(zip(adapter_template, base_template, strict=False))
            if a != b
        ),
        min(len(adapter_template), len(base_template)),
    )
    return (
        f"its saved chat template differs from the base's at character {at} "
        f"({adapter_template[at : at + 30]!r} vs {base_template[at : at + 30]!r})"
    )


def _same_base(recorded: str, served: str) -> bool:
    """Whether peft's recorded base names the served one: the same id or directory, or a
    directory holding the hub model of that name (``.cache/models/SmolLM2-135M-Instruct``)."""
    if recorded == served:
        return True
    mine, theirs = Path(recorded).expanduser(), Path(served).expanduser()
    if mine.exists() and theirs.exists():
        return mine.resolve() == theirs.resolve()
    return mine.name == theirs.name


def adapter_mismatch(model: Any, weights: AdapterWeights, base_model: str) -> str | None:
    """Why ``weights`` cannot serve on ``model`` (the base ``base_model``), or None if it can.

    Checked before the model is touched: the recorded base must be the
    served one, and every tensor must fit the module it adapts (the check
    that matters when two bases share a name).
    """
    if weights.base_model and not _same_base(weights.base_model, base_model):
        return f"it was trained on {weights.base_model}, not on the served base {base_model}"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for key, tensor in weights.state_dict.items():
        name = key.removeprefix("base_model.model.")
        module_name, lora, kind = name.rpartition(".lora_")
        expected: tuple[int, ...] | None = None
        try:
            if not lora:  # a whole module's copy (modules_to_save)
                owner, _, parameter = name.rpartition(".")
                expected = _parameter_shape(_adapted_module(base, owner), parameter)
            elif kind in (
                "A.weight",
                "B.weight",
            ):  # A reads the module's input, B writes its output
                module = _adapted_module(base, module_name)
                if kind == "A.weight":
                    expected = (tensor.shape[0], module.in_features)
                else:
                    expected = (module.out_features, tensor.shape[1])
            else:  # an embedding's or DoRA's factors: peft checks their shapes itself
                _adapted_module(base, module_name)
        except AttributeError:
            return f"it adapts {name.rsplit('.', 1)[0]}, which the served base does not have"
        if expected is not None and tuple(tensor.shape) != expected:
            return (
                f"its {name} is {tuple(tensor.shape)} where the served base needs {expected}: "
                "it was trained on another base"
            )
    return None


def _adapted_module(base: Any, name: str) -> Any:
    """The base's own module under ``name``, seen through any peft wrapper around it."""
    module = base.get_submodule(name)
    module = getattr(module, "original_module", module)  # a modules_to_save wrapper
    return getattr(module, "base_layer", module)  # a LoRA layer


def _parameter_shape(module: Any, parameter: str) -> tuple[int, ...] | None:
    if parameter == "weight" and hasattr(module, "out_features"):
        return (module.out_features, module.in_features)  # 4-bit weights are stored packed
    if parameter == "weight" and hasattr(module, "embedding_dim"):
        return (module.num_embeddings, module.embedding_dim)
    value = getattr(module, parameter, None)
    return tuple(value.shape) if value is not None else None


def attach_adapter(model: Any, name: str, weights: AdapterWeights) -> PeftModel:
    """Attach ``weights`` as adapter ``name``, unmerged and frozen; returns the (peft) model.

    The one way adapters join a serving model, at start and at runtime, so an
    adapter answers the same whenever it was loaded. The LoRA layers are made
    empty and filled from ``weights`` (no random initialization to pay for).
    A model without adapters is wrapped the first time.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.add_adapter(name, weights.config, low_cpu_mem_usage=True)
    else:
        model = PeftModel(model, weights.config, adapter_name=name, low_cpu_mem_usage=True)
    try:
        _fill_adapter(model, name, weights)
    except BaseException:
        detach_adapter(model, name)
        raise
    _share_originals(model)
    model.eval()
    return model


def detach_adapter(model: Any, name: str) -> None:
    """Delete adapter ``name`` from ``model``; the inverse of :func:`attach_adapter`.

    The originals :func:`_share_originals` entered are taken out for peft's
    ``delete_adapter`` (which would take them for copies) and put back after.
    """
    for wrapper in _module_copies(model):
        copies = wrapper.modules_to_save
        for shared in [n for n in copies if copies[n] is wrapper.original_module]:
            del copies[shared]
    model.delete_adapter(name)
    _share_originals(model)


def _module_copies(model: Any) -> list[Any]:
    from peft.utils.other import ModulesToSaveWrapper

    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


def _share_originals(model: Any) -> None:
    """Let every adapter without its own copy of a ``modules_to_save`` module use the original.

    peft routes a mixed batch's rows through such a module by adapter name
    and fails on a name that has no copy there (an adapter that did not
    train ``lm_head`` beside one that did); the original module is exactly
    what those rows should run through, so it is entered under their names.
    Only the per-row path reads these entries: a batch of one adapter goes by
    peft's own record of which adapters have a copy.
    """
    names = list(model.peft_config)
    for wrapper in _module_copies(model):
        for name in names:
            if name not in wrapper.modules_to_save:
                wrapper.modules_to_save[name] = wrapper.original_module


def _fill_adapter(model: Any, name: str, weights: AdapterWeights) -> None:
    """Put ``weights`` into adapter ``name``'s empty (meta) parameters, one module at a time.

    Not peft's ``set_peft_model_state_dict``: it reads the whole model's
    ``state_dict()``, and on a CPU with AVX512-BF16 that makes every 4-bit
    layer unpack the weights bitsandbytes had repacked for its inference
    kernel; repacked again on the next pass they no longer give the same
    logits (0.02 apart on the tiny model), so loading an adapter at runtime
    changed every other model's answers. Here only the adapter's own
    parameters are touched.
    """
    import torch
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

    named = _insert_adapter_name_into_state_dict(
        {
            key.removeprefix("base_model.model."): tensor
            for key, tensor in weights.state_dict.items()
        },
        adapter_name=name,
        parameter_prefix="lora_",
    )
    base = model.get_base_model()
    for key, tensor in named.items():
        if (
            "lora_" not in key
        ):  # a modules_to_save copy: lm_head.weight → lm_head.modules_to_save.NAME.weight
            owner, _, parameter = key.rpartition(".")
            key = f"{owner}.modules_to_save.{name}.{parameter}"
        owner, _, parameter = key.rpartition(".")
        module = base.get_submodule(owner)
        old = module._parameters.get(parameter)
        if old is None:
            raise UserError(
                f"the adapter at {weights.path} holds {key}, which its config does not make"
            )
        device = old.device if old.device.type != "meta" else _device_near(base, owner)
        dtype = old.dtype if old.dtype.is_floating_point else tensor.dtype
        module._parameters[parameter] = torch.nn.Parameter(
            tensor.to(device=device, dtype=dtype), requires_grad=False
        )
    empty = [n for n, p in base.named_parameters() if p.device.type == "meta" and f".{name}." in n]
    if empty:
        raise UserError(f"the adapter at {weights.path} lacks weights for {empty[0]}")


def _device_near(base: Any, owner: str) -> Any:
    """The device of the model's own weights nearest ``owner`` (its LoRA layer's base layer)."""
    path = owner.split(".")
    while path:
        module = base.get_submodule(".".join(path))
        for parameter in module.parameters():
            if parameter.device.type != "meta":
                return parameter.device
        path.pop()
    return next(p.device for p in base.parameters() if p.device.type != "meta")
