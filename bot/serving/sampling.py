"""Choosing each row's next token with its own sampling settings, in one pass over the batch.

``generate`` applies one set of sampling settings to a whole batch; the
scheduler's batch holds rows of different users, each with their own
temperature, top-p, repetition penalty and seed. Everything here is
vectorised over rows except seeded draws: a seeded row draws from its own
generator, so its answer does not depend on which other rows share its steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RowSampling:
    """One row's settings, every field resolved (no engine default left to fill in)."""

    temperature: float  # 0 → greedy
    top_p: float
    repetition_penalty: float  # 1 → off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalties: torch.Tensor
) -> torch.Tensor:
    """Make tokens already in a row (prompt or answer) less likely, the way ``generate`` does.

    A seen token's positive logit is divided by the row's penalty and a
    negative one multiplied by it, so the penalty always lowers it. ``seen``
    is a ``[rows, vocab]`` bool mask; ``penalties`` is ``[rows]``.
    """
    import torch

    factor = penalties[:, None].to(logits.dtype)
    penalised = torch.where(logits < 0, logits * factor, logits / factor)
    return torch.where(seen, penalised, logits)


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest set of tokens whose probability reaches its ``top_p``; the rest -inf.

    The most likely token always survives, whatever ``top_p`` is.
    """
    import torch

    ordered, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p[:, None].to(cumulative.dtype))
    drop[:, -1] = False
    drop = drop.scatter(1, order, drop)
    return logits.masked_fill(drop, float("-inf"))


def choose_tokens(
    logits: torch.Tensor,
    settings: Sequence[RowSampling],
    *,
    seen: torch.Tensor | None,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """The next token of every row: ``logits`` is ``[rows, vocab]``, the result ``[rows]``.

    ``seen`` marks the tokens each row already holds (for the repetition
    penalty; ``None`` when no row uses one). A row with a generator draws
    with it alone; the other sampled rows share one draw from torch's default
    generator.
    """
    import torch

    logits = logits.float()
    device = logits.device
    if seen is not None and any(s.repetition_penalty != 1.0 for s in settings):
        penalties = torch.tensor([s.repetition_penalty for s in settings], device=device)
        logits = apply_repetition_penalty(logits, seen, penalties)
    chosen = logits.argmax(dim=-1)
    sampled = [row for row, s in enumerate(settings) if not s.greedy]
    if not sampled:
        return chosen
    rows = torch.tensor(sampled, device=device)
    temperatures = torch.tensor([settings[r].temperature for r in sampled], device=device)
    top_p = torch.tensor([settings[r].top_p for r in sampled], device=device)
    scaled = logits.index_select(0, rows) / temperatures[:, None]
    if any(settings[r].top_p < 1.0 for r in sampled):
        scaled = top_p_filter(scaled, top_p)
    probs = scaled.softmax(dim=-1)
    shared = [i for i, r in enumerate(sampled) if generators[r] is None]
    if shared:
        picks = torch.multinomial(probs[shared], 1).squeeze(1)
        chosen[rows[shared]] = picks
    for i, row in enumerate(sampled):
        generator = generators[row]
        if generator is not None:
            chosen[row] = torch.multinomial(probs[i], 1, generator=generator)[0]
    return chosen
