"""``python -m finetune export`` read back with gguf's own reader: metadata, names, row order.

These need no llama.cpp; tests/test_export_llama_cpp.py runs the files in it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from finetune.errors import UserError


def make_run(root: Path, model_dir: Path, adapter_dir: Path) -> Path:
    """A run directory as training leaves it: config.yaml naming the base, adapter/ beside it."""
    from finetune.config import FinetuneConfig
    from finetune.report import RESOLVED_CONFIG_FILE

    run = root / "run"
    shutil.copytree(adapter_dir, run / "adapter")
    FinetuneConfig(model=str(model_dir), dataset="unused").save(run / RESOLVED_CONFIG_FILE)
    return run


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("export-run"), tiny_model_dir, tiny_adapter_dir)


@pytest.fixture(scope="module")
def tiny_export(tiny_run: Path, tmp_path_factory) -> Path:
    from finetune.export.run import export_run

    out = tmp_path_factory.mktemp("export") / "out"
    export_run(tiny_run, out, merged=True, progress=False)
    return out


def read(path: Path):
    import gguf

    return gguf.GGUFReader(path)


def field(reader, key: str):
    found = reader.get_field(key)
    assert found is not None, f"{key} missing"
    return found.contents()


def tensor(reader, name: str) -> np.ndarray:
    """A tensor in numpy order (rows, columns), dequantized to float32."""
    import gguf

    found = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(found.data, found.tensor_type).astype(np.float32)


def hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(model_dir / "model.safetensors")


def test_export_writes_the_four_files(tiny_export: Path):
    names = {p.name for p in tiny_export.iterdir()}
    assert {"base.gguf", "adapter.gguf", "merged.gguf", "Modelfile", "README.md"} <= names
    assert not [n for n in names if n.endswith(".partial")]


def test_base_metadata_matches_the_hf_model_and_tokenizer(tiny_export: Path, tiny_run: Path):
    from transformers import AutoConfig

    from finetune.export.vocab import adds_bos
    from finetune.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_run / "adapter")
    config = AutoConfig.from_pretrained(_model_dir(tiny_run))
    reader = read(tiny_export / "base.gguf")
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.type") == "model"
    assert field(reader, "llama.block_count") == config.num_hidden_layers
    assert field(reader, "llama.attention.head_count") == config.num_attention_heads
    assert field(reader, "llama.attention.head_count_kv") == config.num_key_value_heads
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(field(reader, "tokenizer.ggml.tokens")) == config.vocab_size
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is adds_bos(tokenizer)
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    assert field(reader, "tokenizer.ggml.tokens")[tokenizer.eos_token_id] == tokenizer.eos_token


def _model_dir(run: Path) -> Path:
    from finetune.config import FinetuneConfig

    return Path(FinetuneConfig.load(run / "config.yaml").model)


def test_base_tensors_are_the_hf_weights_with_q_and_k_rows_reordered(
    tiny_export: Path, tiny_run: Path
):
    from finetune.export.hf import permute_heads

    weights = hf_weights(_model_dir(tiny_run))
    reader = read(tiny_export / "base.gguf")
    names = {t.name for t in reader.tensors}
    assert "output.weight" in names and "token_embd.weight" in names  # the tiny model is untied
    assert len(names) == len(weights)
    q = weights["model.layers.1.self_attn.q_proj.weight"]
    k = weights["model.layers.1.self_attn.k_proj.weight"]
    q_gguf, k_gguf = tensor(reader, "blk.1.attn_q.weight"), tensor(reader, "blk.1.attn_k.weight")
    assert q_gguf.shape == q.shape
    np.testing.assert_allclose(q_gguf, permute_heads(q, 4), atol=1e-3)
    np.testing.assert_allclose(k_gguf, permute_heads(k, 2), atol=1e-3)
    assert not np.allclose(q_gguf, q, atol=1e-2)  # reordered, not copied
    # the order is a per-head permutation: undoing it gives the HF rows back
    head = q.shape[0] // 4
    inverse = np.argsort(permute_heads(np.arange(q.shape[0]), 4))
    np.testing.assert_allclose(q_gguf[inverse], q, atol=1e-3)
    assert sorted(permute_heads(np.arange(head), 1)) == list(range(head))
    v = weights["model.layers.1.self_attn.v_proj.weight"]
    np.testing.assert_allclose(tensor(reader, "blk.1.attn_v.weight"), v, atol=1e-3)
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    assert norm.tensor_type.name == "F32"


def peft_deltas(model_dir: Path, adapter_dir: Path) -> dict[str, np.ndarray]:
    """ΔW of every adapted module as PEFT computes it (scaling included)."""
    from finetune.modeling import QuantOptions, load_adapter, load_base_model

    model = load_adapter(
        load_base_model(model_dir, quant=QuantOptions(load_in_4bit=False), device="cpu"),
        adapter_dir,
    )
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "finetuned" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.") + ".weight"
            deltas[key] = module.get_delta_weight("finetuned").detach().float().numpy()
    return deltas


def llama_cpp_deltas(adapter_path: Path) -> dict[str, np.ndarray]:
    """ΔW llama.cpp applies: alpha / rank · B @ A, rank read off B as llama.cpp does."""
    reader = read(adapter_path)
    alpha = field(reader, "adapter.lora.alpha")
    deltas = {}
    for t in reader.tensors:
        if t.name.endswith(".lora_a"):
            base = t.name.removesuffix(".lora_a")
            a, b = tensor(reader, t.name), tensor(reader, f"{base}.lora_b")
            assert a.shape[0] == b.shape[1]  # A (rank, in), B (out, rank)
            deltas[base] = alpha / b.shape[1] * (b @ a)
    return deltas


def check_adapter_matches_peft(export_dir: Path, model_dir: Path, adapter_dir: Path) -> None:
    from finetune.export.hf import open_base

    base = open_base(str(model_dir))
    ours = llama_cpp_deltas(export_dir / "adapter.gguf")
    theirs = peft_deltas(model_dir, adapter_dir)
    assert len(ours) == len(theirs) > 0
    for hf_name, delta in theirs.items():
        expected = base.to_llama_rows(hf_name, delta)
        got = ours[base.gguf_name(hf_name)]
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, atol=2e-3 * scale, err_msg=hf_name)


def test_adapter_metadata_and_update_match_peft(tiny_export: Path, tiny_run: Path):
    import gguf

    reader = read(tiny_export / "adapter.gguf")
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert reader.get_field("adapter.lora.alpha").types == [gguf.GGUFValueType.FLOAT32]
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    check_adapter_matches_peft(tiny_export, _model_dir(tiny_run), tiny_run / "adapter")


def test_rslora_and_per_module_patterns_fold_into_llama_cpp_scale(
    tiny_model_dir: Path, tmp_path: Path
):
    """rsLoRA's alpha/sqrt(r) and rank/alpha patterns give the same ΔW in llama.cpp's alpha/r."""
    import torch
    from peft import LoraConfig

    from finetune.export.run import export_run
    from finetune.modeling import (
        QuantOptions,
        attach_new_adapter,
        load_base_model,
        load_tokenizer,
        save_adapter,
    )

    torch.manual_seed(1)
    model = load_base_model(tiny_model_dir, quant=QuantOptions(load_in_4bit=False))
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"v_proj": 4},
        alpha_pattern={"o_proj": 3},
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    adapter_dir = save_adapter(
        attach_new_adapter(model, config), tmp_path / "adapter", load_tokenizer(tiny_model_dir)
    )
    run = make_run(tmp_path, tiny_model_dir, adapter_dir)
    export_run(run, tmp_path / "out", progress=False)
    check_adapter_matches_peft(tmp_path / "out", tiny_model_dir, run / "adapter")


def test_merged_is_base_plus_update_in_llama_cpp_order(tiny_export: Path, tiny_run: Path):
    base = read(tiny_export / "base.gguf")
    merged = read(tiny_export / "merged.gguf")
    deltas = llama_cpp_deltas(tiny_export / "adapter.gguf")
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_up.weight"):
        np.testing.assert_allclose(
            tensor(merged, name),
            tensor(base, name) + deltas[name],
            rtol=2e-3,
            atol=2e-3,
            err_msg=name,
        )


def test_q8_0_quantizes_the_matrices_and_keeps_norms(tiny_run: Path, tmp_path: Path):
    from finetune.export.run import export_run

    export_run(tiny_run, tmp_path, dtype="q8_0", progress=False)
    q8 = read(tmp_path / "base.gguf")
    kinds = {t.name: t.tensor_type.name for t in q8.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    weights = hf_weights(_model_dir(tiny_run))
    v = weights["model.layers.0.self_attn.v_proj.weight"]
    error = np.abs(tensor(q8, "blk.0.attn_v.weight") - v).max()
    assert 0 < error < np.abs(v).max() / 100  # 8-bit blocks: under 1 % of the range


def test_modelfile_and_readme(tiny_export: Path):
    modelfile = (tiny_export / "Modelfile").read_text()
    assert "FROM ./base.gguf" in modelfile and "ADAPTER ./adapter.gguf" in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "[INST] " in template and " [/INST]" in template and "</s>" in template
    readme = (tiny_export / "README.md").read_text()
    assert "llama-cli -m base.gguf --lora adapter.gguf" in readme
    assert "ollama create" in readme and "LM Studio" in readme


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"modules_to_save": ["lm_head"]}, "full copy of lm_head"),
        ({"use_dora": True}, "DoRA"),
    ],
)
def test_adapters_llama_cpp_cannot_take_are_refused(
    tiny_run: Path, tmp_path: Path, change: dict, message: str
):
    from finetune.export.run import export_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _edit_json(run / "adapter" / "adapter_config.json", **change)
    with pytest.raises(UserError, match=message):
        export_run(run, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_other_architectures_and_runs_without_adapter_fail_in_one_line(
    tiny_run: Path, tmp_path: Path, capsys
):
    from finetune.__main__ import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    model = tmp_path / "model"
    shutil.copytree(_model_dir(tiny_run), model)
    _edit_json(model / "config.json", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    text = (run / "config.yaml").read_text().replace(str(_model_dir(tiny_run)), str(model))
    (run / "config.yaml").write_text(text)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "GPT2LMHeadModel" in err

    shutil.rmtree(run / "adapter")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no trained adapter" in err


def render_like_ollama(turns, messages: list[dict]) -> str:
    """What the Modelfile's Go template writes for ``messages`` (the same branches, in Python)."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    out = turns.bos
    for i, message in enumerate(messages):
        last = i == len(messages) - 1
        if message["role"] == "system" and turns.system_open is not None:
            out += turns.system_open + message["content"] + turns.system_close
        elif message["role"] == "user":
            out += turns.user_open
            if turns.system_open is None and system and i <= 1:
                out += system + turns.system_close
            out += message["content"] + (turns.generation if last else turns.user_close)
        elif message["role"] == "assistant":
            out += message["content"] + ("" if last else turns.answer_close)
    return out


@pytest.mark.parametrize("template", ["mistral", "chatml", "llama3"])
def test_modelfile_template_writes_the_chat_templates_prompt(template: str):
    from finetune.export.modelfile import go_template, turn_text
    from finetune.export.vocab import adds_bos
    from finetune.tiny_model import DEFAULT_CORPUS, train_tokenizer

    tokenizer = train_tokenizer(DEFAULT_CORPUS.read_text(), 400, template)
    bos = adds_bos(tokenizer)
    turns = turn_text(tokenizer, strip_bos=bos)
    assert turns is not None
    assert "{{ range $i, $_ := .Messages }}" in go_template(turns)
    conversations = [
        [{"role": "user", "content": "Wax?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Wax?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Wax?"},
            {"role": "assistant", "content": "Warm wax."},
            {"role": "user", "content": "And in January?"},
        ],
    ]
    for messages in conversations:
        expected = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        if bos and tokenizer.bos_token and expected.startswith(tokenizer.bos_token):
            expected = expected[len(tokenizer.bos_token) :]  # llama.cpp adds it
        assert render_like_ollama(turns, messages) == expected


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tiny_run: Path, tmp_path, monkeypatch):
    import errno

    import gguf

    from finetune.export.run import export_run

    def full(self, tensor, tensor_endianess=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    with pytest.raises(UserError, match=r"is full writing base\.gguf"):
        export_run(tiny_run, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
