"""The run's tokenizer as GGUF metadata, read back from the Hugging Face tokenizer it trained with.

Two tokenizer families reach llama.cpp's llama graph: byte-level BPE (SmolLM2,
Llama 3, the project's tiny model) written as ``gpt2`` with its merges, and
SentencePiece-style BPE with byte fallback (Mistral, Llama 2) written as
``llama`` with scores. Special token ids, whether a BOS is prepended (checked
by encoding, not by trusting a config flag: SmolLM2 adds none, Mistral adds
``<s>``) and the chat template are taken from the tokenizer itself, so
llama.cpp tokenizes every prompt the way training did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import UserError

if TYPE_CHECKING:
    import gguf
    from transformers import PreTrainedTokenizerBase


def _pre_tokenizer_name(pre: dict[str, Any] | None, where: Path) -> str:
    """llama.cpp's name for the split before BPE, for the pre-tokenizers these models use.

    llama.cpp picks its regex by this name; one that differs from the Hugging
    Face tokenizer's split gives different ids on digits or punctuation.
    """
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM's own tokenizer: one token per digit, then GPT-2's split
    if kinds and kinds[0] == "Split" and "\\p{N}{1,3}" in json.dumps(steps[0]):
        return "llama-bpe"  # Llama 3's split
    raise UserError(
        f"the byte-level BPE tokenizer in {where} splits text with {kinds}, which this export "
        "cannot name for llama.cpp (GPT-2, SmolLM and Llama 3 splits are known)"
    )


def _adds_token(tokenizer: PreTrainedTokenizerBase, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids: list[int] = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare: list[int] = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(ids) == len(bare):
        return False
    return (ids[0] if first else ids[-1]) == token_id


def write_tokenizer(
    writer: gguf.GGUFWriter,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_dir: Path,
    vocab_size: int,
) -> None:
    """Add the tokenizer's metadata, padded to the model's embedding rows."""
    import gguf

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(
            f"the tokenizer in {tokenizer_dir} is {model.get('type')}, not BPE: "
            "llama.cpp's llama models take byte-level or SentencePiece-style BPE"
        )
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[gguf.TokenType] = []
    scores: list[float] | None = None  # SentencePiece-style vocabularies only
    if model.get("byte_fallback"):
        # SentencePiece-style (Mistral, Llama 2): gguf's reader of tokenizer.json gives
        # llama.cpp's text, score and type for each token.
        hf_vocab = gguf.LlamaHfVocab(tokenizer_dir)
        scores = []
        for text, score, token_type in hf_vocab.all_tokens():
            tokens.append(text.decode("utf-8"))  # gguf encoded it from tokenizer.json's text
            scores.append(score)
            types.append(token_type)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
    else:
        pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), tokenizer_dir)
        by_id = {i: token for token, i in tokenizer.get_vocab().items()}
        for i in range(max(vocab_size, max(by_id) + 1)):
            token = by_id.get(i)
            if token is None:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(token)
                types.append(
                    gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
                )
            else:
                tokens.append(token)
                types.append(gguf.TokenType.NORMAL)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
    if len(tokens) < vocab_size:  # embedding rows past the tokenizer's last id
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            if scores is not None:
                scores.append(-1000.0)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)

    for kind, token_id in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    from finetune.chat import chat_format

    end_of_turn = chat_format(tokenizer).end_of_turn_id
    if end_of_turn != tokenizer.eos_token_id:
        writer.add_eot_token_id(end_of_turn)  # Llama 3's <|eot_id|>: generation stops there too
    # Always explicit: llama.cpp's default for a missing flag depends on the tokenizer
    # type, and a wrong BOS changes every prompt.
    writer.add_add_bos_token(_adds_token(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(_adds_token(tokenizer, tokenizer.eos_token_id, first=False))
    writer.add_chat_template(tokenizer.chat_template)


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding a text prepends the BOS token: the rule written into the GGUF."""
    return _adds_token(tokenizer, tokenizer.bos_token_id, first=True)
