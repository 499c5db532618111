"""Prompting and generation shared by the report's samples, evaluation and the bot's worker.

One place turns chat messages into model input (through the chat template
saved with the adapter, so the prompt format is the one training used) and
one place turns generation settings into ``generate`` arguments, so the
answers in ``samples.md`` and the answers in Discord come from the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.modeling import BASE_ADAPTER_NAME, DEFAULT_ADAPTER_NAME

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

# The model must never start writing the user's next turn.
STOP_STRINGS = ("[INST]",)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.15
    stop_strings: tuple[str, ...] = STOP_STRINGS

    def generate_kwargs(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """Arguments for ``model.generate``: sampling or greedy, EOS and stop strings."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.stop_strings:
            kwargs.update(stop_strings=list(self.stop_strings), tokenizer=tokenizer)
        return kwargs


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> str:
    """The templated prompt text; the template itself emits the single BOS."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def encode_chats(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[dict[str, str]]],
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded batch of templated prompts, ready for batched ``generate``.

    ``add_special_tokens=False`` because the template already wrote ``<s>``:
    a second BOS is a prompt the model never saw in training.
    """
    texts = [chat_prompt(tokenizer, conv) for conv in conversations]
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = previous_side
    return {k: v.to(device) for k, v in batch.items()} if device is not None else dict(batch)


def adapter_names_for(
    variants: Sequence[str], adapter_name: str = DEFAULT_ADAPTER_NAME
) -> list[str]:
    """peft's per-row adapter list: ``"__base__"`` turns LoRA off for that row only."""
    return [BASE_ADAPTER_NAME if v == "base" else adapter_name for v in variants]


def strip_stop_strings(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """Cut at the first stop string (generate stops after it, so it is in the output)."""
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            text = text[:index]
    return text.strip()


def generate_texts(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[dict[str, str]]],
    settings: GenerationSettings,
    *,
    variants: Sequence[str] | None = None,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
) -> list[str]:
    """Answer each conversation in one ``generate`` call; ``variants`` mixes base/finetuned rows.

    ``adapter_name`` is the adapter "finetuned" rows use: a loaded run's adapter by
    default, or the one still being trained when the report is written.
    """
    import torch

    batch = encode_chats(tokenizer, conversations, device=model.device)
    kwargs = settings.generate_kwargs(tokenizer)
    if variants is not None:
        kwargs["adapter_names"] = adapter_names_for(variants, adapter_name)
    with torch.inference_mode():
        output = model.generate(**batch, **kwargs)
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [strip_stop_strings(t, settings.stop_strings) for t in texts]
