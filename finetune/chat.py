"""What a model's chat template means for prompting, training and stopping.

Every chat model marks its turns its own way: Mistral wraps a question in
``[INST] … [/INST]`` and ends the answer with ``</s>``; ChatML models
(SmolLM2, Qwen) end every turn with ``<|im_end|>``; Llama 3 with
``<|eot_id|>``. No other module knows any of these strings. They are read off
the tokenizer's own template by rendering a probe conversation, so the token
that ends an answer (the one training must teach), the tokens and text that
end generation, and the padding token all follow the model, and a new model
family needs no code here.

Text inside a message is never a turn marker: every conversation becomes
token ids through :data:`TEMPLATE_KWARGS` (transformers'
``sanitize_control_tokens``), here for prompts and scoring and as a dataset
column for what trl tokenizes, so ``<|im_end|>`` or ``</s>`` typed by a user
(or quoted in a forum post) is encoded as the characters it is, and only the
markers the template writes are control tokens.

Templates also differ in what they refuse (Mistral's raises on two user
turns in a row, others on a system message). Conversations are normalized
the same way for every template before rendering, so any conversation a
caller may send renders with any template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedTokenizerBase

# For servers whose tokenizer is not on this machine (an OpenAI-compatible peer):
# the visible openings and ends of a turn in the common templates. Four at most,
# the OpenAI API's limit.
FALLBACK_STOP_STRINGS = ("[INST]", "<|im_start|>", "<|im_end|>", "<|eot_id|>")

# How every conversation is tokenized: control tokens found in message text (the
# tokenizer's special tokens) are encoded as plain text, the template's own are not.
# trl reads the same keywords from a dataset's ``chat_template_kwargs`` column.
TEMPLATE_KWARGS: dict[str, Any] = {"sanitize_control_tokens": True}

_PROBE_QUESTION = "Probe question one?"
_PROBE_ANSWER = "Probe answer."
_PROBE_FOLLOW_UP = "Probe question two?"
_CACHE_ATTRIBUTE = "_freeski_chat_format"


class ConversationError(ValueError):
    """A conversation no template can answer (it has no user turn)."""


@dataclass(frozen=True)
class ChatFormat:
    """The turn markers of one chat template, as tokens and as text."""

    end_of_turn: str  # closes an answer: what training must teach the model to write
    end_of_turn_id: int
    stop_token_ids: tuple[int, ...]  # generation ends at any of these
    stop_strings: tuple[str, ...]  # visible text that means the model began the user's turn


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


# transformers types apply_chat_template, decode and convert_ids_to_tokens for all their
# modes at once (text or ids, one sequence or a batch); these three name the one mode used.
def render_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
) -> str:
    """The template's text for ``messages`` exactly as given (not normalized)."""
    rendered = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return cast(str, rendered)  # tokenize=False renders one conversation: one string


def decode_text(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], *, skip_special_tokens: bool = False
) -> str:
    """The text of one sequence of token ids."""
    text = tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    return cast(str, text)  # one sequence of ids decodes to one string


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """One token's vocabulary entry (``</s>``, ``<|im_end|>``)."""
    return cast(str, tokenizer.convert_ids_to_tokens(token_id))  # one id: one token


def _derive(tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """Render question, answer, follow-up: what lies between answer and follow-up is the
    end of an assistant turn, then the opening of a user turn."""
    question = {"role": "user", "content": _PROBE_QUESTION}
    answer = {"role": "assistant", "content": _PROBE_ANSWER}
    follow_up = {"role": "user", "content": _PROBE_FOLLOW_UP}
    text = render_text(tokenizer, [question, answer, follow_up])
    answer_end = text.index(_PROBE_ANSWER) + len(_PROBE_ANSWER)
    between = text[answer_end : text.index(_PROBE_FOLLOW_UP)]
    ids = tokenizer(between, add_special_tokens=False)["input_ids"]
    special = _special_ids(tokenizer)

    marker = next((i for i, token in enumerate(ids) if token in special), None)
    if marker is None:  # the template ends answers in plain text: only EOS can end one
        end_id, opening = tokenizer.eos_token_id, ids
    else:
        end_id, opening = ids[marker], ids[marker + 1 :]
    stop_ids = [end_id, tokenizer.eos_token_id]
    stop_strings: list[str] = []
    opening = [i for i in opening if decode_text(tokenizer, [i]).strip()]  # newlines between turns
    if opening and opening[0] in special:
        stop_ids.append(opening[0])  # <|im_start|>, <|start_header_id|>
    elif opening:
        visible = decode_text(tokenizer, opening, skip_special_tokens=True).strip()
        head = visible.split()[0] if visible.split() else ""
        if head:
            stop_strings.append(head)  # [INST]
    return ChatFormat(
        end_of_turn=token_text(tokenizer, end_id),
        end_of_turn_id=end_id,
        stop_token_ids=tuple(dict.fromkeys(i for i in stop_ids if i is not None)),
        stop_strings=tuple(stop_strings),
    )


def chat_format(tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """The tokenizer's :class:`ChatFormat`, derived once per chat template."""
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template")
    cached: tuple[str, ChatFormat] | None = getattr(tokenizer, _CACHE_ATTRIBUTE, None)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    derived = _derive(tokenizer)
    setattr(tokenizer, _CACHE_ATTRIBUTE, (tokenizer.chat_template, derived))
    return derived


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a padding token that is not the end-of-turn token.

    Padding is masked out; padding with the token that ends an answer would
    let a collator that masks padding hide exactly the token the model must
    learn to write. Models without a pad token (Mistral), or whose pad is the
    end-of-turn token (SmolLM2), pad with ``unk`` when they have one.
    """
    end_id = chat_format(tokenizer).end_of_turn_id
    if tokenizer.pad_token is None or tokenizer.pad_token_id == end_id:
        replacement = tokenizer.unk_token if tokenizer.unk_token_id not in (None, end_id) else None
        if replacement is not None:
            tokenizer.pad_token = replacement
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def normalize_conversation(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """One system message first, then user and assistant turns alternating, from a user turn.

    System messages merge into one (in order); consecutive turns of one role
    merge into one turn; assistant turns before the first question are
    dropped (there is nothing they answer). The same for every template, so
    base and finetuned, Mistral and ChatML see the same conversation.
    """
    system = [m["content"] for m in messages if m["role"] == "system" and m["content"].strip()]
    turns: list[dict[str, str]] = []
    for message in messages:
        role = message["role"]
        if role == "system":
            continue
        if not turns and role == "assistant":
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": f"{turns[-1]['content']}\n\n{message['content']}"}
        else:
            turns.append({"role": role, "content": message["content"]})
    if not turns:
        raise ConversationError("the conversation has no user message to answer")
    head = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    return head + turns


def _fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The system message as the start of the first user turn, for templates without one."""
    if not messages or messages[0]["role"] != "system" or len(messages) < 2:
        return messages
    system, first, *rest = messages
    return [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *rest]


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], **kwargs: Any
) -> str:
    """The templated prompt of a normalized conversation, ready for the model's answer.

    Text for people (logs, samples); the model's input comes from :func:`encode_prompt`.
    """
    return cast(str, _apply_normalized(tokenizer, messages, tokenize=False, **kwargs))


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]
) -> list[int]:
    """The token ids of :func:`render_prompt`'s prompt, message text encoded as plain text.

    The one place a conversation to answer becomes model input (serving, samples,
    evaluation). The template writes whatever BOS the model wants, so no special
    tokens are added on top (as trl does in training): never a second BOS.
    """
    encoded = _apply_normalized(tokenizer, messages, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool = False,
) -> list[int]:
    """Token ids of a conversation as trl tokenizes it for training (not normalized)."""
    encoded = tokenizer.apply_chat_template(
        list(messages),
        tokenize=True,
        return_dict=True,
        add_generation_prompt=add_generation_prompt,
        **TEMPLATE_KWARGS,
    )
    return list(cast("BatchEncoding", encoded)["input_ids"])  # return_dict: a BatchEncoding


def _apply_normalized(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], **kwargs: Any
) -> Any:
    """``apply_chat_template`` on the normalized conversation with a generation prompt; a
    template that refuses a system message gets it folded into the first user turn."""
    from jinja2 import TemplateError

    if kwargs.get("tokenize"):
        kwargs = {**TEMPLATE_KWARGS, **kwargs}
    normalized = normalize_conversation(messages)
    try:
        return tokenizer.apply_chat_template(normalized, add_generation_prompt=True, **kwargs)
    except TemplateError:
        if normalized[0]["role"] != "system":
            raise
    return tokenizer.apply_chat_template(
        _fold_system(normalized), add_generation_prompt=True, **kwargs
    )
