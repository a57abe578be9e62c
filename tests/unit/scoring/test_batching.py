"""Shared batch sizing: token estimates, padding, planning under a budget, the OOM budget."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest

from worker.scoring.batching import (
    CHARS_PER_TOKEN,
    MIN_BATCH_TOKENS,
    PAD_MULTIPLE,
    TokenBudget,
    estimated_tokens,
    padded_length,
    plan_batches,
)


def _width(batch: list[int], lengths: list[int], max_length: int) -> int:
    return padded_length(max(lengths[i] for i in batch), max_length)


# -- estimates and padding ---------------------------------------------------------------------


def test_estimated_tokens_rounds_characters_up_to_tokens() -> None:
    assert CHARS_PER_TOKEN == 4
    assert [estimated_tokens(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_padded_length_rounds_up_to_a_multiple_of_eight() -> None:
    assert PAD_MULTIPLE == 8
    assert [padded_length(n, 256) for n in (1, 7, 8, 9, 16, 17, 250)] == [8, 8, 8, 16, 16, 24, 256]


def test_padded_length_stops_at_the_model_limit_and_keeps_longer_rows() -> None:
    assert padded_length(250, 252) == 252  # rounding would give 256, past the limit
    assert padded_length(256, 256) == 256
    assert padded_length(300, 256) == 300  # already too long: not cut, not padded


def test_padded_length_is_idempotent() -> None:
    for max_length in (16, 100, 252, 512):
        for length in range(1, 600):
            once = padded_length(length, max_length)
            assert once >= length
            assert padded_length(once, max_length) == once


# -- planning --------------------------------------------------------------------------------


def test_plan_fills_batches_up_to_the_budget() -> None:
    plan = plan_batches([8] * 10, budget=32, max_length=512)
    assert plan == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # 4 rows x 8 = 32, a fifth is over


def test_plan_counts_padded_not_raw_lengths() -> None:
    # 9 tokens pad to 16: two rows are 32 tokens, three 48, over the budget of 32.
    assert plan_batches([9, 9, 9], budget=32, max_length=512) == [[0, 1], [2]]


def test_plan_takes_rows_longest_first_with_ties_in_input_order() -> None:
    lengths = [16, 40, 16, 40, 8]
    plan = plan_batches(lengths, budget=10_000, max_length=512)
    assert plan == [[1, 3, 0, 2, 4]]


def test_plan_gives_an_oversized_row_a_batch_of_its_own() -> None:
    lengths = [10, 300, 40, 40, 8, 120, 9]
    plan = plan_batches(lengths, budget=128, max_length=512)
    assert plan[0] == [1]  # 304 tokens on its own: over the budget, still run
    assert [5] in plan
    assert plan_batches([126], budget=64, max_length=126) == [[0]]


def test_plan_respects_budget_and_covers_every_row_once() -> None:
    rng = random.Random(7)
    for _ in range(200):
        max_length = rng.choice([64, 128, 250, 512])
        lengths = [rng.randint(1, max_length) for _ in range(rng.randint(0, 60))]
        budget = rng.choice([64, 300, 1024, 8192])
        plan = plan_batches(lengths, budget, max_length)
        assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
        for batch in plan:
            assert len(batch) == 1 or len(batch) * _width(batch, lengths, max_length) <= budget
        # Each batch is as full as the budget allows: one more row would not have fit.
        for batch, following in pairwise(plan):
            width = _width(batch, lengths, max_length)
            assert (len(batch) + 1) * width > budget
            assert lengths[following[0]] <= min(lengths[i] for i in batch)


def test_min_fill_keeps_short_rows_out_of_long_rows_padding() -> None:
    lengths = [64, 40, 64, 56]
    # 40 pads to 40: under 0.8 x 64 = 51.2, so it starts a batch; 56 stays with the 64s.
    assert plan_batches(lengths, budget=10_000, max_length=512, min_fill=0.8) == [[0, 2, 3], [1]]
    # Without the fill rule only the budget closes a batch.
    assert plan_batches(lengths, budget=10_000, max_length=512) == [[0, 2, 3, 1]]


def test_plan_of_nothing_is_empty() -> None:
    assert plan_batches([], budget=64, max_length=128) == []


# -- token budget ----------------------------------------------------------------------------


def test_budget_halves_down_to_its_floor_and_reports_the_previous_value() -> None:
    budget = TokenBudget(1000)
    assert budget.tokens == 1000
    assert budget.floor == MIN_BATCH_TOKENS == 64
    assert budget.halve() == 1000
    assert budget.tokens == 500
    seen = [budget.halve() for _ in range(4)]
    assert seen == [500, 250, 125, 64]
    assert budget.tokens == 64  # 125 // 2 = 62, held at the floor
    assert budget.halve() == 64
    assert budget.tokens == 64


def test_a_halved_budget_doubles_back_after_a_stretch_of_calls_without_oom() -> None:
    budget = TokenBudget(1000, recover_after=3)
    budget.halve()
    budget.halve()
    assert not budget.end_call()  # the call that ran out of memory does not count
    assert budget.tokens == 250
    assert [budget.end_call() for _ in range(3)] == [False, False, True]
    assert budget.tokens == 500
    budget.end_call()
    budget.halve()  # a new OOM starts the stretch again
    budget.end_call()
    assert [budget.end_call() for _ in range(3)] == [False, False, True]
    assert budget.tokens == 500
    for _ in range(3):
        budget.end_call()
    assert budget.tokens == budget.configured == 1000
    assert not any(budget.end_call() for _ in range(10))  # never past the configured one


def test_budget_starts_at_least_at_its_floor() -> None:
    assert TokenBudget(10).tokens == MIN_BATCH_TOKENS
    assert TokenBudget(10, floor=16).tokens == 16
    small = TokenBudget(100, floor=16)
    small.halve()
    small.halve()
    small.halve()
    assert small.tokens == 16  # 100 -> 50 -> 25 -> 16, not 12


def test_budget_floor_must_be_positive() -> None:
    with pytest.raises(ValueError, match="floor"):
        TokenBudget(100, floor=0)
