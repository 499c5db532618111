"""The model runner: everything between a row's messages and its next token, on the worker's thread.

text-generation-inference splits serving in two: a router that queues and
batches requests, and a model server whose ``generate_token`` runs one step
for a batch it is handed. :mod:`bot.serving.worker` is the router here; this
module is the other side. It turns messages into prompt ids (the chat
template, oldest turns trimmed to fit), runs the forward pass with the
arguments this model takes, routes each row to its adapter, chooses each
row's token with its own sampling settings, and says when a row's answer
ends. It never decides who runs, and never waits.

Adapter routing goes by name, one per row: peft's ``"__base__"`` turns LoRA
off for that row, any other name picks a loaded adapter, and rows of any
mix of adapters share a pass. Adapters join and leave between two steps
(:meth:`ModelRunner.attach`, :meth:`ModelRunner.detach`), on this thread;
the batched-LoRA stacks that serve a new adapter are built on another and
only swapped in here (:meth:`ModelRunner.install`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Literal, cast

from bot.serving.batch import DecodeBatch
from bot.serving.batched_lora import BatchedLora, Stacking
from bot.serving.context import ConversationError, lone_surrogate_at, trim_oldest_first
from bot.serving.engine import AdapterRejected, EngineError, InvalidRequest, Message, Sampling
from bot.serving.row_text import RowText
from bot.serving.sampling import RowSampling, choose_tokens
from finetune.chat import normalize_conversation
from finetune.generation import GenerationSettings, encode_chats
from finetune.modeling import (
    BASE_ADAPTER_NAME,
    AdapterWeights,
    adapter_mismatch,
    attach_adapter,
    detach_adapter,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Why a row's answer ended by itself: a stop token or stop string, or its token budget.
Ending = Literal["stop", "length"]


@dataclass(frozen=True)
class StopConditions:
    """How an answer ends and how prompts are padded, as ``finetune.generation`` says."""

    eos_token_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    pad_token_id: int


@dataclass(eq=False, kw_only=True)
class RowState:
    """One row's decoding state: its adapter, its tokens so far, its text and how it samples.

    The scheduler's rows extend it with their request; the runner reads
    nothing else. ``prompt_ids`` and ``sampling`` are set by :meth:`ModelRunner.prepare`.
    """

    adapter: str  # a loaded adapter's name, or BASE_ADAPTER_NAME for the base model
    max_new_tokens: int
    text: RowText
    prompt_ids: list[int] | None = None
    sampling: RowSampling | None = None
    generator: torch.Generator | None = field(default=None, repr=False)  # a seeded row's own

    @property
    def input_ids(self) -> list[int]:
        """What a prefill reads: the prompt and whatever was generated before (after an eviction)."""
        assert self.prompt_ids is not None, "prepare the row first"
        return self.prompt_ids + self.text.tokens


class ModelRunner:
    """Encodes prompts, runs forward passes and chooses tokens for :class:`RowState` rows.

    Not thread-safe, on purpose: the adapter routing and a fast tokenizer are
    global state, safe only because the worker's thread alone calls this.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        generation: GenerationSettings,
        base_model: str = "",
        max_context_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generation = generation
        self.base_model = base_model  # what attached adapters must have been trained on
        window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_context_tokens: int = max_context_tokens or window or 4096
        # generate honours the model's own minimum answer length; so does this runner.
        config = getattr(model, "generation_config", None)
        self.min_new_tokens = int(getattr(config, "min_new_tokens", None) or 0)
        self.stop_conditions = _stop_conditions(generation, tokenizer)
        self._cache_arg, self._forward_extra = _forward_arguments(model)
        self._adapter_off: contextlib.AbstractContextManager[Any] | None = None  # held while off
        self._names_hooks: contextlib.AbstractContextManager[Any] | None = None
        self._held_names: list[str] | None = None
        # The adapters stacked for batched LoRA: built at the first pass after they change;
        # False when a layout is not covered (peft routes then).
        self._batched: BatchedLora | Literal[False] | None = None
        self._batched_names: list[str] | None = None
        # Whether rows go through batched LoRA (when the layouts allow); see use_batched_lora.
        self._use_batched = True
        self._batched_on = True  # the routing the held state was set up for
        self._overhead: float | None = None  # the template's tokens per turn, once measured

    # ---- rows ---------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        """The adapters attached to the model, in the order they were."""
        return list(getattr(self.model, "peft_config", {}))

    def row_text(self, sampling: Sampling | None) -> RowText:
        """A row's text, cut at the template's stop strings and at the request's own."""
        stops = self.stop_conditions.stop_strings + (sampling.stop if sampling else ())
        return RowText(self.tokenizer, stops)

    def prepare(self, row: RowState, prompt_ids: list[int], sampling: Sampling | None) -> None:
        """Give an admitted row its prompt and its sampling settings (with a seeded generator)."""
        row.prompt_ids = prompt_ids
        row.sampling = self._row_sampling(sampling)
        if row.sampling.seed is not None and not row.sampling.greedy:
            import torch

            row.generator = torch.Generator(device=self.model.device).manual_seed(row.sampling.seed)

    def _row_sampling(self, sampling: Sampling | None) -> RowSampling:
        asked = sampling or Sampling()
        defaults = self.generation
        return RowSampling(
            temperature=defaults.temperature if asked.temperature is None else asked.temperature,
            top_p=defaults.top_p if asked.top_p is None else asked.top_p,
            repetition_penalty=(
                defaults.repetition_penalty
                if asked.repetition_penalty is None
                else asked.repetition_penalty
            ),
            seed=asked.seed,
        )

    # ---- encoding -----------------------------------------------------------------------

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """The templated prompt's token ids, exactly as training and evaluation encode it."""
        ids: list[int] = encode_chats(self.tokenizer, [_dicts(messages)])["input_ids"][0].tolist()
        return ids

    def fit_context(self, messages: Sequence[Message], budget: int) -> list[int]:
        """The prompt's token ids, oldest turns dropped until it fits ``budget``.

        This runs on the worker thread between decoding steps, so its cost is
        every running answer's stall. Encoding one candidate after another
        (one encode per dropped turn) once stalled other answers for seconds
        on a 1,000-turn chat; now the turns are tokenized once, in one batched
        call, their lengths plus the template's markers estimate what fits,
        and only what is kept is encoded (again, one exchange shorter, in the
        rare case the estimate fell short).
        """
        for message in messages:
            at = lone_surrogate_at(message["content"])
            if at is not None:
                raise InvalidRequest(
                    f"the question holds a lone UTF-16 surrogate at character {at}, which is "
                    "not text: send valid Unicode"
                )
        try:  # normalized first, so the oldest turns go in user/assistant pairs whatever was sent
            chat = cast("list[Message]", normalize_conversation(_dicts(messages)))
        except ConversationError as error:
            raise InvalidRequest(f"{error}: end the conversation with a user's question") from None
        if chat[-1]["role"] != "user":
            raise InvalidRequest(
                "the conversation ends with an answer, not a question: "
                "end it with the user's message to answer"
            )
        counted = self.tokenizer([m["content"] for m in chat], add_special_tokens=False)
        overhead = self._turn_overhead()
        # suffix[i]: the estimated tokens of chat[i:], so any candidate costs one lookup.
        suffix = list(accumulate(len(ids) + overhead for ids in reversed(counted["input_ids"])))
        suffix.reverse()
        system = 1 if chat[0]["role"] == "system" else 0
        system_cost = suffix[0] - suffix[1] if system else 0.0
        position = {id(m): i for i, m in enumerate(chat)}
        kept = trim_oldest_first(
            chat, lambda rest: system_cost + suffix[position[id(rest[system])]] <= budget
        )
        ids = self.encode(kept)
        while len(ids) > budget:  # the estimate was short: drop one more exchange at a time
            longest = len(kept)
            shorter = trim_oldest_first(kept, lambda rest: len(rest) < longest)  # noqa: B023
            if len(shorter) == longest:
                break  # only the question is left; the caller refuses it as too long
            kept = shorter
            ids = self.encode(kept)
        return ids

    def _turn_overhead(self) -> float:
        """Tokens the chat template adds per turn (its markers), measured once on a sample."""
        if self._overhead is None:
            sample: list[Message] = [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ]
            content = self.tokenizer(["a", "b", "c"], add_special_tokens=False)["input_ids"]
            markers = len(self.encode(sample)) - sum(map(len, content))
            self._overhead = max(0.0, markers / len(sample))
        return self._overhead

    # ---- forward passes -----------------------------------------------------------------

    def prefill(self, rows: Sequence[RowState]) -> tuple[DecodeBatch, torch.Tensor]:
        """Read the rows' prompts into a batch of their own; each row's logits for its next token."""
        return DecodeBatch.prefill(
            list(rows),
            [row.input_ids for row in rows],
            pad_id=self.stop_conditions.pad_token_id,
            device=self.model.device,
            forward=self._forward,
        )

    def step(self, batch: DecodeBatch) -> torch.Tensor:
        """Feed every row of ``batch`` its chosen token; the logits of each row's following one."""
        return batch.step(self._forward)

    def _forward(
        self,
        rows: Sequence[RowState],
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        kwargs = {self._cache_arg: cache, **self._forward_extra}
        self._route_adapters([row.adapter for row in rows], kwargs)
        output = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs
        )
        logits: torch.Tensor = output.logits[:, -1, :]
        return logits

    # ---- adapter routing ----------------------------------------------------------------

    def _route_adapters(self, names: list[str], kwargs: dict[str, Any]) -> None:
        """Route each row to its adapter.

        With batched LoRA (:mod:`bot.serving.batched_lora`), peft's adapters
        are off and hooks add each row's adapter, in one gathered product per
        layer whatever the mix. Otherwise a pass whose rows share one name
        runs with that adapter simply active, or with adapters off for the
        base, and a mixed pass gives peft one name per row. Turning adapters
        off or on and peft's per-row hooks each cost a walk over every module
        (14 ms for the tiny bench model on 2 CPU cores; a GPU decoding step's
        worth for a 7B model), so all are held across steps and changed only
        when the batch's rows change.
        """
        if not hasattr(self.model, "peft_config"):
            return
        distinct = set(names)
        batched = self._batched_lora()
        if batched:  # adapters off in peft's layers; the hooks add each row's own
            self._enable_adapters(False)
            if distinct == {BASE_ADAPTER_NAME}:
                batched.release()
                self._batched_names = None
            elif names != self._batched_names:
                batched.hold(names, self.model.device)
                self._batched_names = names
            return
        self._enable_adapters(distinct != {BASE_ADAPTER_NAME})
        if len(distinct) == 1 and BASE_ADAPTER_NAME not in distinct:
            self._activate(names[0])
        self._hold_adapter_names(names if len(distinct) > 1 else None, kwargs)

    @property
    def stacked_bytes(self) -> int:
        """What batched LoRA's stacks hold now, in bytes (0 before a pass with adapters, or
        with peft routing): the memory it adds beside peft's own copy of the factors."""
        return self._batched.nbytes if self._batched else 0

    def use_batched_lora(self, enabled: bool) -> None:
        """Route mixed rows through batched LoRA (the default) or through peft's own routing.

        The switch exists to measure one against the other
        (``benchmarks/multi_adapter.py``); it takes effect at the next pass,
        on this runner's thread, so any thread may flip it.
        """
        self._use_batched = enabled

    def _batched_lora(self) -> BatchedLora | None:
        if self._use_batched != self._batched_on:  # switched: let go what the other way held
            self.restore()
            self._batched, self._batched_on = None, self._use_batched
        if not self._use_batched:
            return None
        if self._batched is None:
            self._batched = BatchedLora.build(self.model, self.adapter_names) or False
            if not self._batched:
                log.info("an adapter's layout is not covered by batched LoRA: peft routes rows")
        return self._batched or None

    def _activate(self, name: str) -> None:
        """Make ``name`` the active adapter; a no-op while it already is (always, with one)."""
        if getattr(self.model, "active_adapter", name) != name:
            self.model.set_adapter(name)

    def _hold_adapter_names(self, names: list[str] | None, kwargs: dict[str, Any]) -> None:
        """Keep peft's per-row routing hooks for ``names`` on the LoRA layers until the rows change.

        This is peft's own mechanism (``PeftModel.generate`` holds it for a
        whole call); a peft without it gets the names on every call instead.
        """
        if names == self._held_names:
            return
        if self._names_hooks is not None:
            self._names_hooks.__exit__(None, None, None)
            self._names_hooks, self._held_names = None, None
        if names is None:
            return
        hooks = getattr(self.model, "_enable_peft_forward_hooks", None)
        if hooks is None:
            kwargs["adapter_names"] = names
            return
        self._names_hooks = hooks(adapter_names=names)
        self._names_hooks.__enter__()
        self._held_names = names

    def _enable_adapters(self, enabled: bool) -> None:
        if enabled and self._adapter_off is not None:
            self._adapter_off.__exit__(None, None, None)
            self._adapter_off = None
        elif not enabled and self._adapter_off is None:
            self._adapter_off = self.model.disable_adapter()
            self._adapter_off.__enter__()

    def restore(self) -> None:
        """Leave the model's adapters as they were given: on, with no per-row hooks held."""
        self._hold_adapter_names(None, {})
        if self._batched:
            self._batched.release()
        self._batched_names = None
        self._enable_adapters(True)

    # ---- adapters joining and leaving ---------------------------------------------------

    def attach(self, name: str, weights: AdapterWeights) -> Stacking | None:
        """Add adapter ``name`` between two steps; refuses one that does not fit this base.

        The routing held across steps (adapters off, per-row hooks) covers
        only the LoRA layers that existed when it was set, so it is let go
        first and set again, over the new layers too, by the next pass; the
        active adapter is set again for the same reason (a layer peft wraps
        anew starts with the new adapter active).

        Returns what stacking ``name`` for batched LoRA takes (None with
        peft's routing): build it on any thread, then :meth:`install` it
        here. Copying every adapter's factors into new stacks grows with the
        adapters served (most of a SmolLM2 load's pause when it ran here);
        meanwhile the other adapters' rows run on the stacks they had, and
        none runs on ``name``, which is not served before it is installed.
        """
        mismatch = adapter_mismatch(self.model, weights, self.base_model)
        if mismatch:
            raise AdapterRejected(f"the adapter at {weights.path} cannot serve here: {mismatch}")
        self.restore()
        active = getattr(self.model, "active_adapter", None)
        self.model = attach_adapter(self.model, name, weights)
        self.model.set_adapter(active if isinstance(active, str) else name)
        if self._batched is False or not self._use_batched:
            return None
        onto = self._batched or None
        stacking = BatchedLora.stacking(
            self.model, [name] if onto else self.adapter_names, onto=onto
        )
        if stacking is None:  # a layout batched LoRA does not cover: the next pass says so
            self._batched = None
        return stacking

    def install(self, stacking: Stacking | None) -> None:
        """Swap in the stacks :meth:`attach` asked for, built (or, if not yet, built here).

        Stacks made onto what is no longer served (an adapter came or went
        meanwhile, or the routing was switched) are dropped; the next pass
        builds the current ones here, slower but the same.
        """
        if stacking is None:
            return
        current = self._batched or None
        if (
            stacking.onto is current
            and self._batched is not False
            and self._use_batched == self._batched_on
        ):
            stacks = stacking.built or stacking.build()
            if current is not None:
                current.release()
            self._batched, self._batched_names = stacks, None
        elif self._batched and any(n not in self._batched.slots for n in self.adapter_names):
            self.restore()
            self._batched = None

    def detach(self, name: str) -> None:
        """Delete adapter ``name`` (no row runs on it any more) and free its weights."""
        self.restore()
        self._batched = None
        remaining = [n for n in self.adapter_names if n != name]
        if getattr(self.model, "active_adapter", None) == name and remaining:
            self.model.set_adapter(remaining[0])
        detach_adapter(self.model, name)

    # ---- tokens and endings -------------------------------------------------------------

    def choose(
        self, batch: DecodeBatch, logits: torch.Tensor
    ) -> tuple[list[int], dict[int, EngineError]]:
        """Every row's next token (the batch feeds them next), and the rows whose own sampling
        settings broke the kernel, by index.

        Sampling is one pass over the batch, so one row's settings (a
        temperature so small its logits overflow) would fail every row; then
        each row is sampled alone, and only the rows that fail alone end.
        """
        import torch

        rows: list[RowState] = batch.rows
        eos_ids = self.stop_conditions.eos_token_ids
        if self.min_new_tokens and eos_ids:
            short = [i for i, r in enumerate(rows) if len(r.text.tokens) < self.min_new_tokens]
            if short:
                for eos in eos_ids:
                    logits[short, eos] = float("-inf")
        settings = [_resolved(r) for r in rows]
        generators = [r.generator for r in rows]
        broken: dict[int, EngineError] = {}
        try:
            tokens = choose_tokens(logits, settings, seen=batch.seen, generators=generators)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception:  # find which rows: each alone
            tokens = logits.argmax(dim=-1)
            for index in range(len(rows)):
                try:
                    tokens[index] = choose_tokens(
                        logits[index : index + 1],
                        settings[index : index + 1],
                        seen=batch.seen[index : index + 1],
                        generators=generators[index : index + 1],
                    )[0]
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as exc:
                    log.warning("sampling failed for one row (%s): %s", type(exc).__name__, exc)
                    broken[index] = InvalidRequest(
                        f"sampling with these settings failed ({settings[index]}): "
                        "use a temperature of 0 (greedy) or a more usual one"
                    )
        batch.take(tokens)
        chosen: list[int] = tokens.tolist()
        return chosen, broken

    def add_token(self, row: RowState, token: int) -> Ending | None:
        """Add ``token`` to the row's answer; why the answer ends with it, or None if it goes on.

        An end-of-turn token and a stop string (the template's or the
        request's own) end it as "stop", neither in the text; the token budget
        as "length".
        """
        if token in self.stop_conditions.eos_token_ids:
            return "stop"
        if row.text.add(token):
            return "stop"
        if len(row.text.tokens) >= row.max_new_tokens:
            return "length"
        return None


def _dicts(messages: Sequence[Message]) -> Sequence[dict[str, str]]:
    """``messages`` as ``finetune`` types them: plain dicts, which they are at runtime."""
    return cast("Sequence[dict[str, str]]", messages)


def _resolved(row: RowState) -> RowSampling:
    assert row.sampling is not None, "prepare the row first"
    return row.sampling


def _stop_conditions(generation: GenerationSettings, tokenizer: Any) -> StopConditions:
    kwargs = generation.generate_kwargs(tokenizer)
    eos = kwargs.get("eos_token_id")
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or ()))
    pad = kwargs.get("pad_token_id")
    if pad is None:
        pad = min(eos_ids, default=0)
    return StopConditions(eos_ids, tuple(kwargs.get("stop_strings") or ()), int(pad))


def _forward_arguments(model: Any) -> tuple[str, dict[str, Any]]:
    """The name the model's forward takes its cache by (transformers renamed
    ``past_key_values`` to ``cache``) and the other arguments every call passes:
    logits for the last position only, where the model can cut them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    extra: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in parameters:
        extra["logits_to_keep"] = 1
    return ("cache" if "cache" in parameters else "past_key_values"), extra
