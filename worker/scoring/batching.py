"""Sizing model inputs: token estimates, padded lengths, batch planning and the token budget.

Shared by the NLI and embedding scorers (and the noop scorer's estimate). Pure Python with no
torch import, so a scorer that runs no model can use it without paying torch's start-up time.

* :func:`estimated_tokens`: a cheap token count from a character count, for the batcher;
* :func:`padded_length`: the length a row is padded to (a multiple of ``PAD_MULTIPLE``);
* :func:`plan_batches`: rows grouped, longest first, under a token budget of padded length x
  rows, optionally keeping short rows out of long rows' padding;
* :class:`TokenBudget`: that budget, halved down to a floor after a CUDA out-of-memory error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

# English averages ~4 characters per subword token; the batcher only needs a rough size.
CHARS_PER_TOKEN: Final = 4
# A hypothesis template's "{}" is replaced by the label, so it does not count itself.
PLACEHOLDER_CHARS: Final = 2
# Tensor cores work on multiples of 8 in half precision; few distinct widths for kernel caches.
PAD_MULTIPLE: Final = 8
# The OOM fallback never halves the budget below this (ModelSettings.max_batch_tokens' minimum).
MIN_BATCH_TOKENS: Final = 64
# Scorer calls in a row without an out-of-memory error before a halved budget doubles again:
# long enough that the burst of long texts (or the other tenant) behind the OOM has passed.
RECOVER_AFTER_CLEAN_CALLS: Final = 200


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def estimated_tokens(chars: int) -> int:
    """Tokens in ``chars`` characters of text, from ``CHARS_PER_TOKEN`` (rounded up)."""
    return _ceil_div(chars, CHARS_PER_TOKEN)


def padded_length(length: int, max_length: int) -> int:
    """``length`` rounded up to a multiple of ``PAD_MULTIPLE``, never beyond ``max_length``.

    A row already longer than ``max_length`` keeps its own length.
    """
    rounded = _ceil_div(length, PAD_MULTIPLE) * PAD_MULTIPLE
    return max(length, min(rounded, max_length))


def plan_batches(
    lengths: Sequence[int], budget: int, max_length: int, *, min_fill: float = 0.0
) -> list[list[int]]:
    """Group row indices, longest first (ties in input order), into batches under ``budget``.

    Each batch pads to its first (longest) row's :func:`padded_length`. A batch closes when
    one more row would take padded length x rows over ``budget``, or when the next row's
    padded length is under ``min_fill`` of the batch's (short rows padded to a long row's
    length are wasted compute; ``0`` turns that rule off). A row longer than the budget on
    its own still gets a batch of one.
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in order:
        padded = padded_length(lengths[index], max_length)
        full = width * (len(current) + 1) > budget
        if current and (full or padded < width * min_fill):
            batches.append(current)
            current = []
        if not current:
            width = padded
        current.append(index)
    if current:
        batches.append(current)
    return batches


class TokenBudget:
    """Tokens (padded length x rows) one forward pass may take.

    Halves after a CUDA out-of-memory error (never below ``floor``) and doubles back, up to
    the configured budget, after ``recover_after`` scorer calls in a row without one.
    """

    __slots__ = (
        "_clean_calls",
        "_configured",
        "_floor",
        "_oom_in_call",
        "_recover_after",
        "_tokens",
    )

    def __init__(
        self,
        tokens: int,
        floor: int = MIN_BATCH_TOKENS,
        recover_after: int = RECOVER_AFTER_CLEAN_CALLS,
    ) -> None:
        if floor < 1:
            raise ValueError("the token budget's floor must be positive")
        if recover_after < 1:
            raise ValueError("the token budget's recovery stretch must be positive")
        self._floor = floor
        self._tokens = self._configured = max(int(tokens), floor)
        self._recover_after = recover_after
        self._clean_calls = 0
        self._oom_in_call = False

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def floor(self) -> int:
        return self._floor

    @property
    def configured(self) -> int:
        """The budget it started with, and recovers to."""
        return self._configured

    def halve(self) -> int:
        """Halve the budget (not below the floor); return the budget it had before."""
        previous = self._tokens
        self._tokens = max(previous // 2, self._floor)
        self._oom_in_call = True
        self._clean_calls = 0
        return previous

    def end_call(self) -> bool:
        """A scorer call ended: count it if it saw no OOM, and after ``recover_after`` such
        calls in a row double a halved budget (up to the configured one). True if it grew."""
        if self._oom_in_call:
            self._oom_in_call = False
            return False
        if self._tokens >= self._configured:
            return False
        self._clean_calls += 1
        if self._clean_calls < self._recover_after:
            return False
        self._clean_calls = 0
        self._tokens = min(self._tokens * 2, self._configured)
        return True
