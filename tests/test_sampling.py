"""Per-row sampling: every row keeps its own temperature, top-p, repetition penalty and seed."""

from __future__ import annotations

import pytest
import torch

from bot.serving.engine import Sampling
from bot.serving.sampling import (
    RowSampling,
    apply_repetition_penalty,
    choose_tokens,
    top_p_filter,
)

GREEDY = RowSampling(temperature=0.0, top_p=1.0, repetition_penalty=1.0)


def test_top_p_keeps_the_smallest_set_reaching_each_rows_threshold():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)  # probabilities ≈ .64 .24 .09 .03
    kept = top_p_filter(logits, torch.tensor([0.5, 0.8, 1.0])).isfinite()
    assert kept.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, True],
    ]


def test_top_p_always_keeps_the_most_likely_token():
    kept = top_p_filter(torch.tensor([[0.0, 5.0, 1.0]]), torch.tensor([1e-6])).isfinite()
    assert kept.tolist() == [[False, True, False]]


def test_the_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False], [True, True, False]])
    penalised = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 1.0]))
    assert penalised.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 1.0]]


def test_greedy_rows_take_the_best_token_beside_sampled_rows():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    settings = [GREEDY, RowSampling(1.0, 1.0, 1.0), GREEDY, RowSampling(2.0, 0.9, 1.0)]
    chosen = choose_tokens(logits, settings, seen=None, generators=[None] * 4)
    assert chosen[0] == logits[0].argmax() and chosen[2] == logits[2].argmax()


def test_a_seeded_row_draws_the_same_whatever_rows_sit_beside_it():
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))
    hot = RowSampling(temperature=1.5, top_p=1.0, repetition_penalty=1.0, seed=5)

    def draws(rows: list[int]) -> list[int]:
        generator = torch.Generator().manual_seed(5)
        picked = []
        for _ in range(20):
            gens = [generator if r == 0 else None for r in rows]
            chosen = choose_tokens(logits[rows], [hot] * len(rows), seen=None, generators=gens)
            picked.append(int(chosen[rows.index(0)]))
        return picked

    alone = draws([0])
    assert draws([2, 0, 1]) == alone
    assert len(set(alone)) > 1, "a temperature of 1.5 should not always pick the same token"


def test_the_penalty_applies_per_row_in_one_choice():
    logits = torch.tensor([[2.0, 1.9], [2.0, 1.9]])
    seen = torch.tensor([[True, False], [True, False]])
    settings = [GREEDY, RowSampling(0.0, 1.0, 1.5)]
    chosen = choose_tokens(logits, settings, seen=seen, generators=[None, None])
    assert chosen.tolist() == [0, 1]


def test_a_request_takes_at_most_four_non_empty_stop_strings():
    assert Sampling(stop=("a", "b", "c", "d")).stop == ("a", "b", "c", "d")
    with pytest.raises(ValueError, match="at most 4"):
        Sampling(stop=("a", "b", "c", "d", "e"))
    with pytest.raises(ValueError, match="non-empty"):
        Sampling(stop=("a", ""))
