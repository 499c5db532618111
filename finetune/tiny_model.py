"""Build a tiny Mistral-architecture model that stands in for Mistral-7B offline.

Nothing here can download weights, so tests, benchmarks and the demo use a
model the project builds itself: random weights in the Mistral architecture,
a byte-level BPE tokenizer trained on ski-forum text, Mistral's special
tokens and the Mistral-Instruct chat template. It loads through the same code
as the real model (:mod:`finetune.modeling`), 4-bit included.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_CORPUS = Path(__file__).with_name("data") / "ski_corpus.txt"

# The Mistral-Instruct template: one BOS, [INST] ... [/INST] around user turns,
# EOS after each assistant turn. A system message is folded into the first user
# turn, as Mistral does. Training and serving both use the copy saved beside
# the adapter, so this is the single prompt format of a run.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_message = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_message -%}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + message['content'] + ' [/INST]' -}}{%- endif -%}"
    "{%- else -%}{{- ' ' + message['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)

# ChatML (SmolLM2, Qwen): every turn ends with <|im_end|>, no BOS.
CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Llama 3: a BOS, a header per turn, <|eot_id|> after every turn - which is not
# the tokenizer's EOS (<|end_of_text|>), as in Meta's base tokenizer.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{{- message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class TemplateFamily:
    """A chat template and the special tokens its tokenizer needs (ids from 0, in order)."""

    template: str
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    unk: str | None
    pad: str | None = None


TEMPLATES = {
    "mistral": TemplateFamily(
        MISTRAL_CHAT_TEMPLATE, ("<unk>", "<s>", "</s>"), "<s>", "</s>", "<unk>"
    ),
    "chatml": TemplateFamily(
        CHATML_CHAT_TEMPLATE,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos="<|im_start|>",
        eos="<|im_end|>",
        unk="<|endoftext|>",
        pad="<|im_end|>",  # as SmolLM2 ships it
    ),
    "llama3": TemplateFamily(
        LLAMA3_CHAT_TEMPLATE,
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        unk=None,
    ),
}


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the tiny model; every linear output is a multiple of 32 for bnb's CPU kernel."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    # Wider than Mistral's 0.02: with a near-uniform random LM head every logit
    # stays within about +-1.3, and a LoRA adapter cannot steer the output far
    # enough for a short CPU run to show any learning.
    initializer_range: float = 0.1

    def validate(self) -> None:
        head_dim, rest = divmod(self.hidden_size, self.num_attention_heads)
        if rest:
            raise UserError("hidden size must be divisible by the number of attention heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError("attention heads must be a multiple of key/value heads")
        for what, size in {
            "hidden size": self.hidden_size,
            "intermediate size": self.intermediate_size,
            "key/value width": head_dim * self.num_key_value_heads,
        }.items():
            if size % 32:
                raise UserError(
                    f"{what} {size} is not a multiple of 32 (bitsandbytes' CPU kernel needs it)"
                )


def train_tokenizer(
    corpus: str, vocab_size: int, template: str = "mistral"
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (no unknown characters ever) with the template family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    family = TEMPLATES[template]
    backend = Tokenizer(models.BPE(unk_token=family.unk))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=family.bos,
        eos_token=family.eos,
        unk_token=family.unk,
        pad_token=family.pad,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = family.template
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    *,
    corpus_path: str | Path | None = None,
    seed: int = 0,
    spec: TinyModelSpec | None = None,
    template: str = "mistral",
) -> Path:
    """Write a loadable tiny Mistral (config, safetensors, tokenizer) to ``out_dir``.

    ``template`` picks the chat format (mistral, chatml, llama3): the other two
    exercise the template-generic paths the way SmolLM2 and Llama 3 would.
    """
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r}: use one of {', '.join(TEMPLATES)}")
    spec = spec or TinyModelSpec()
    spec.validate()
    corpus_file = Path(corpus_path) if corpus_path else DEFAULT_CORPUS
    if not corpus_file.is_file():
        raise UserError(f"corpus {corpus_file} not found: pass --corpus with a text file")
    corpus = corpus_file.read_text(encoding="utf-8")
    if not corpus.strip():
        raise UserError(f"corpus {corpus_file} is empty: give it some forum text")

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = train_tokenizer(corpus, spec.vocab_size, template)
    # The embedding/lm_head rows round up to a multiple of 32, like every other linear layer.
    vocab = int(math.ceil(len(tokenizer) / 32) * 32)
    config = MistralConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    model.generation_config.pad_token_id = (
        tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tiny_model.json").write_text(
        json.dumps(
            {"seed": seed, "corpus": str(corpus_file), "template": template, **asdict(spec)},
            indent=2,
        )
        + "\n"
    )
    return out


def save_random_adapter(
    base: str | Path, out: str | Path, *, seed: int, lora_b_scale: float = 20.0, **lora: Any
) -> Path:
    """A LoRA adapter for ``base`` with random weights, saved as a run saves its ``adapter/``.

    Where tests and benchmarks need adapters that answer differently (to
    check routing, exactness or throughput), training each would cost
    minutes and prove nothing more. ``lora`` is ``peft.LoraConfig``'s
    arguments (rank, alpha, targets, ``modules_to_save``); B is scaled by
    ``lora_b_scale`` so the adapter's effect shows in greedy answers, and a
    trained module copy is perturbed too.
    """
    import torch
    from peft import LoraConfig

    from finetune.modeling import (
        QuantOptions,
        attach_new_adapter,
        load_base_model,
        load_tokenizer,
        save_adapter,
    )

    torch.manual_seed(seed)
    model = load_base_model(base, quant=QuantOptions(load_in_4bit=False), device="cpu")
    peft_model = attach_new_adapter(
        model, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(lora_b_scale)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.5)
    return save_adapter(peft_model, Path(out), load_tokenizer(base))
