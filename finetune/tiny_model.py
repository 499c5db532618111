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

from finetune.errors import UserError

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

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Mistral


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


def train_tokenizer(corpus: str, vocab_size: int):
    """A byte-level BPE (no unknown characters ever) with Mistral's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    *,
    corpus_path: str | Path | None = None,
    seed: int = 0,
    spec: TinyModelSpec | None = None,
) -> Path:
    """Write a loadable tiny Mistral (config, safetensors, tokenizer) to ``out_dir``."""
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

    tokenizer = train_tokenizer(corpus, spec.vocab_size)
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
    model.generation_config.pad_token_id = tokenizer.unk_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tiny_model.json").write_text(
        json.dumps({"seed": seed, "corpus": str(corpus_file), **asdict(spec)}, indent=2) + "\n"
    )
    return out
