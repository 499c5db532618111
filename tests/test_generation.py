"""The shared prompting/generation path: one BOS, left padding, mixed-adapter rows."""

from pathlib import Path

import pytest

from finetune.generation import GenerationSettings, encode_chats, generate_texts, strip_stop_strings
from finetune.modeling import load_for_inference, load_tokenizer

QUESTION = [{"role": "user", "content": "What skis should I get for park?"}]


def test_prompt_has_exactly_one_bos_and_ends_at_inst_close(tiny_model_dir: Path):
    tokenizer = load_tokenizer(tiny_model_dir)
    batch = encode_chats(tokenizer, [QUESTION])
    ids = batch["input_ids"][0].tolist()
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids).endswith("[/INST]")


def test_batch_is_left_padded_with_a_non_eos_pad(tiny_model_dir: Path):
    tokenizer = load_tokenizer(tiny_model_dir)
    short = [{"role": "user", "content": "Wax?"}]
    batch = encode_chats(tokenizer, [QUESTION, short])
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    row = batch["input_ids"][1].tolist()
    assert row[0] == tokenizer.pad_token_id
    assert batch["attention_mask"][1, 0] == 0
    assert batch["attention_mask"][1, -1] == 1


@pytest.mark.parametrize("text,expected", [("fine [INST] more", "fine"), ("no stop ", "no stop")])
def test_strip_stop_strings(text: str, expected: str):
    assert strip_stop_strings(text, ("[INST]",)) == expected


def test_mixed_batch_rows_match_single_variant_runs(tiny_model_dir: Path, tiny_adapter_dir: Path):
    model, tokenizer = load_for_inference(tiny_model_dir, tiny_adapter_dir, load_in_4bit=True)
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
    mixed = generate_texts(
        model, tokenizer, [QUESTION, QUESTION], settings, variants=["base", "finetuned"]
    )
    base_alone = generate_texts(model, tokenizer, [QUESTION], settings, variants=["base"])
    tuned_alone = generate_texts(model, tokenizer, [QUESTION], settings, variants=["finetuned"])
    assert mixed == [base_alone[0], tuned_alone[0]]
    assert mixed[0] != mixed[1], "the adapter should change the greedy answer"
