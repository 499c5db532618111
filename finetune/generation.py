"""Prompting and generation shared by the report's samples, evaluation and the bot's worker.

One place turns chat messages into model input (through the chat template
saved with the adapter, so the prompt format is the one training used) and
one place turns generation settings into ``generate`` arguments, so the
answers in ``samples.md`` and the answers in Discord come from the same code.
Where a turn ends, and what must stop generation, come from the template
(:mod:`finetune.chat`), never from a model family's strings written here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.chat import chat_format, decode_text, encode_prompt
from finetune.modeling import BASE_ADAPTER_NAME, DEFAULT_ADAPTER_NAME

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.15
    # None: the template's own (the text that opens the user's next turn, e.g. "[INST]")
    stop_strings: tuple[str, ...] | None = None

    def stops(self, tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
        """The text that ends an answer: the model must never write the user's next turn."""
        if self.stop_strings is not None:
            return self.stop_strings
        return chat_format(tokenizer).stop_strings

    def generate_kwargs(self, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """Arguments for ``model.generate``: sampling or greedy, end-of-turn and stop strings."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "eos_token_id": list(chat_format(tokenizer).stop_token_ids),
            "pad_token_id": tokenizer.pad_token_id,
        }
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        stops = self.stops(tokenizer)
        if stops:
            kwargs.update(stop_strings=list(stops), tokenizer=tokenizer)
        return kwargs


def encode_chats(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[dict[str, str]]],
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded batch of templated prompts, ready for batched ``generate``.

    Each prompt comes from :func:`~finetune.chat.encode_prompt`: the template's BOS
    only (a second one is a prompt the model never saw in training), and message
    text that spells a control token encoded as plain text, never as a turn.
    """
    ids = [encode_prompt(tokenizer, conv) for conv in conversations]
    batch = tokenizer.pad(
        {"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt"
    )
    return {k: v.to(device) for k, v in batch.items()} if device is not None else dict(batch)


def adapter_names_for(
    variants: Sequence[str], adapter_name: str = DEFAULT_ADAPTER_NAME
) -> list[str]:
    """peft's per-row adapter list: ``"__base__"`` turns LoRA off for that row only."""
    return [BASE_ADAPTER_NAME if v == "base" else adapter_name for v in variants]


def strip_stop_strings(text: str, stops: Sequence[str]) -> str:
    """Cut at the first stop string (generate stops after it, so it is in the output)."""
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            text = text[:index]
    return text.strip()


@dataclass(frozen=True)
class GeneratedText:
    text: str
    ended: bool  # stopped on its own (end of turn, stop string), not at the length cap


def generate_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[dict[str, str]]],
    settings: GenerationSettings,
    *,
    variants: Sequence[str] | None = None,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
) -> list[GeneratedText]:
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
    stops = settings.stops(tokenizer)
    stop_ids = set(chat_format(tokenizer).stop_token_ids)
    answers = []
    for row in new_tokens.tolist():
        text = decode_text(tokenizer, row, skip_special_tokens=True)
        ended = bool(stop_ids.intersection(row)) or any(stop in text for stop in stops)
        answers.append(GeneratedText(strip_stop_strings(text, stops), ended))
    return answers


def generate_texts(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[dict[str, str]]],
    settings: GenerationSettings,
    *,
    variants: Sequence[str] | None = None,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
) -> list[str]:
    """The answers' text alone (see :func:`generate_answers`)."""
    answers = generate_answers(
        model, tokenizer, conversations, settings, variants=variants, adapter_name=adapter_name
    )
    return [answer.text for answer in answers]
