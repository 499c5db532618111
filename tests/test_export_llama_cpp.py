"""The export, run in llama.cpp itself: it must answer like transformers with the PEFT adapter.

llama.cpp runs through llama-cpp-python in a subprocess (tests/llama_cpp_probe.py):
a malformed file aborts llama.cpp, which must fail a test, not the run. The
package compiles llama.cpp on install, so it is not in the lock; CI installs it
(.ci/run) and sets REQUIRE_LLAMA_CPP=1, which turns the skip below into a failure.

The reference is the base in float32 with the adapter unmerged, teacher-forced
over chat-formatted forum text. Two figures are checked per variant: how often
llama.cpp's next-token argmax equals transformers', and the mean error of
llama.cpp's log-probability of the token transformers chose. The second is the
sharp one: a file without the Q/K reorder can still agree on most argmaxes.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.llama_cpp_compare import (
    FORUM_TEXTS,
    MAX_LOGPROB_ERROR,
    MIN_AGREEMENT,
    Q8_MAX_LOGPROB_ERROR,
    Q8_MIN_AGREEMENT,
    Reference,
    chat_sequences,
    compare,
    probe,
    reference,
)
from tests.test_export_gguf import make_run

if importlib.util.find_spec("llama_cpp") is None:
    if os.environ.get("REQUIRE_LLAMA_CPP"):
        raise RuntimeError("REQUIRE_LLAMA_CPP is set but llama-cpp-python is not installed")
    pytest.skip(
        "llama-cpp-python is not installed (CI installs it: see .ci/run)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def run_and_export(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory):
    from finetune.export.run import export_run

    root = tmp_path_factory.mktemp("llama-cpp")
    run = make_run(root, tiny_model_dir, tiny_adapter_dir)
    export_run(run, root / "f16", merged=True, progress=False)
    return run, root / "f16"


@pytest.fixture(scope="module")
def sequences(tiny_adapter_dir: Path) -> list[list[int]]:
    """Chat-formatted questions and answers, tokenized as training does."""
    from finetune.modeling import load_tokenizer

    return chat_sequences(load_tokenizer(tiny_adapter_dir))


@pytest.fixture(scope="module")
def base_reference(tiny_model_dir: Path, sequences) -> Reference:
    return reference(tiny_model_dir, None, sequences)


@pytest.fixture(scope="module")
def adapter_reference(tiny_model_dir: Path, tiny_adapter_dir: Path, sequences) -> Reference:
    return reference(tiny_model_dir, tiny_adapter_dir, sequences)


def test_llama_cpp_tokenizes_like_hugging_face_bos_rule_included(
    run_and_export, tiny_adapter_dir: Path
):
    from finetune.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_adapter_dir)
    _, out = run_and_export
    got = probe(out / "base.gguf", None, texts=FORUM_TEXTS)["tokens"]
    assert got == [tokenizer(t)["input_ids"] for t in FORUM_TEXTS]


def test_base_gguf_answers_like_the_base(run_and_export, base_reference: Reference):
    agreement, error = compare(base_reference, run_and_export[1] / "base.gguf", None)
    assert agreement >= MIN_AGREEMENT and error < MAX_LOGPROB_ERROR, (agreement, error)


def test_base_with_adapter_answers_like_peft(run_and_export, adapter_reference: Reference):
    out = run_and_export[1]
    agreement, error = compare(adapter_reference, out / "base.gguf", out / "adapter.gguf")
    assert agreement >= MIN_AGREEMENT and error < MAX_LOGPROB_ERROR, (agreement, error)


def test_the_adapter_changes_llama_cpp_output(run_and_export, base_reference: Reference):
    """Against the base's reference, base+adapter must disagree: the adapter really applied."""
    out = run_and_export[1]
    agreement, error = compare(base_reference, out / "base.gguf", out / "adapter.gguf")
    assert agreement < 0.9 and error > 10 * MAX_LOGPROB_ERROR, (agreement, error)


def test_merged_gguf_answers_like_base_with_adapter(run_and_export, adapter_reference):
    agreement, error = compare(adapter_reference, run_and_export[1] / "merged.gguf", None)
    assert agreement >= MIN_AGREEMENT and error < MAX_LOGPROB_ERROR, (agreement, error)


def test_q8_0_stays_within_tolerance(run_and_export, adapter_reference, tmp_path: Path):
    from finetune.export.run import export_run

    export_run(run_and_export[0], tmp_path, dtype="q8_0", progress=False)
    agreement, error = compare(adapter_reference, tmp_path / "base.gguf", tmp_path / "adapter.gguf")
    assert agreement >= Q8_MIN_AGREEMENT and error < Q8_MAX_LOGPROB_ERROR, (agreement, error)


def test_an_export_without_the_q_k_reorder_fails_these_checks(
    run_and_export, adapter_reference, tmp_path: Path, monkeypatch
):
    """The checks above can fail: skip the permutation and they must catch it."""
    from finetune.export import hf
    from finetune.export.run import export_run

    monkeypatch.setattr(hf, "permute_heads", lambda rows, n_heads: rows)
    export_run(run_and_export[0], tmp_path, progress=False)
    agreement, error = compare(adapter_reference, tmp_path / "base.gguf", tmp_path / "adapter.gguf")
    assert agreement < MIN_AGREEMENT or error >= MAX_LOGPROB_ERROR, (agreement, error)
