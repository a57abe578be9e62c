"""Building NLI (premise, hypothesis) model inputs without tokenizing every pair.

The zero-shot pipeline tokenizes each pair with ``tokenizer(premise, hypothesis,
truncation="only_first")``. That re-tokenizes the same premise once per label and the same
hypothesis once per event. Here the premise and the hypothesis are tokenized once each and the
pair is assembled the way the tokenizer's pair template does: ``prefix + premise + middle +
hypothesis + suffix`` (e.g. BART ``<s> A </s></s> B </s>``, BERT ``[CLS] A [SEP] B [SEP]``),
with the token types of each part. :func:`derive_pair_template` reads that layout off the
tokenizer itself and checks it against the tokenizer on probe pairs (including a truncated
one); a tokenizer whose layout cannot be reproduced gets ``None`` and the scorer falls back
to letting the tokenizer encode the pairs.

In chunk mode (``TAGSTREAM_LONG_TEXT=chunk``) a premise longer than the model reads is cut
into overlapping windows (:func:`premise_windows`), each paired with every hypothesis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from worker.config.settings import MAX_OVERLAP_DIVISOR
from worker.errors import HypothesisTooLongError

TOKEN_TYPE_IDS = "token_type_ids"
# Probe texts for reading the pair layout: ordinary words that every tokenizer splits the
# same way alone and inside a pair, and that never look like special tokens.
_PROBE_FIRST = "the cat sat on the mat"
_PROBE_SECOND = "this example is about dogs."
# Long enough to exceed any model maximum we meet (a few thousand tokens), to check truncation.
_PROBE_LONG_REPEAT = 1200


@dataclass(frozen=True, slots=True)
class EncodedPair:
    """Model inputs of one pair; ``token_type_ids`` is None when the model takes none."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool


@dataclass(frozen=True, slots=True)
class PairTemplate:
    """Special tokens and token types around the premise (first) and hypothesis (second)."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    prefix_types: tuple[int, ...]
    middle_types: tuple[int, ...]
    suffix_types: tuple[int, ...]
    first_type: int
    second_type: int

    @property
    def num_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    def build(
        self, first: Sequence[int], second: Sequence[int], with_types: bool
    ) -> tuple[list[int], list[int] | None]:
        ids = [*self.prefix, *first, *self.middle, *second, *self.suffix]
        if not with_types:
            return ids, None
        types = [
            *self.prefix_types,
            *([self.first_type] * len(first)),
            *self.middle_types,
            *([self.second_type] * len(second)),
            *self.suffix_types,
        ]
        return ids, types


def fit_premise(
    premise: Sequence[int],
    hypothesis_length: int,
    num_special: int,
    max_length: int,
    truncate_left: bool,
) -> tuple[Sequence[int], bool]:
    """Cut the premise as ``truncation="only_first"`` does; return it and whether it was cut.

    Like the tokenizer, refuse when the premise would have to shrink to nothing.
    """
    room = max_length - num_special - hypothesis_length
    if len(premise) <= room:
        return premise, False
    if room < 1:
        raise HypothesisTooLongError(
            f"the hypothesis ({hypothesis_length} tokens) leaves no room for the text within"
            f" the model's maximum of {max_length} tokens"
        )
    return (premise[-room:] if truncate_left else premise[:room]), True


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """How a long premise is read in chunk mode: window size, step between windows, cap."""

    window: int
    stride: int
    max_chunks: int

    @classmethod
    def of(cls, window: int, overlap: int, max_chunks: int) -> ChunkPlan:
        """``overlap`` is kept to at most half of ``window``, so windows always advance."""
        if window < 1 or max_chunks < 1:
            raise ValueError("a chunk window and the chunk cap must be at least 1")
        kept = min(overlap, window // MAX_OVERLAP_DIVISOR)
        return cls(window=window, stride=window - kept, max_chunks=max_chunks)

    @property
    def most_tokens(self) -> int:
        """Premise tokens the capped windows cover at most."""
        return self.window + (self.max_chunks - 1) * self.stride


def premise_windows(premise: Sequence[int], plan: ChunkPlan) -> tuple[list[Sequence[int]], bool]:
    """The premise cut into windows of ``plan.window`` tokens that start ``plan.stride``
    apart (the last one may be shorter), at most ``plan.max_chunks`` of them; and whether
    tokens past the last window were left unread.

    A premise that fits one window is one window, itself.
    """
    windows: list[Sequence[int]] = []
    start = 0
    while len(windows) < plan.max_chunks:
        windows.append(premise[start : start + plan.window])
        if start + plan.window >= len(premise):
            return windows, False
        start += plan.stride
    return windows, True


def _ids(encoding: Any, key: str = "input_ids") -> list[int]:
    return [int(token) for token in encoding[key]]


def _locate(full: Sequence[int], part: Sequence[int], start: int) -> int:
    for position in range(start, len(full) - len(part) + 1):
        if list(full[position : position + len(part)]) == list(part):
            return position
    return -1


def _constant(types: Sequence[int]) -> int | None:
    return types[0] if types and all(t == types[0] for t in types) else None


def _read_layout(tokenizer: PreTrainedTokenizerBase, with_types: bool) -> PairTemplate | None:
    first = _ids(tokenizer(_PROBE_FIRST, add_special_tokens=False))
    second = _ids(tokenizer(_PROBE_SECOND, add_special_tokens=False))
    encoding = tokenizer(_PROBE_FIRST, _PROBE_SECOND, return_token_type_ids=with_types)
    full = _ids(encoding)
    types = _ids(encoding, TOKEN_TYPE_IDS) if with_types else [0] * len(full)
    start = _locate(full, first, 0)
    middle_start = start + len(first)
    second_start = _locate(full, second, middle_start)
    if start < 0 or second_start < 0:
        return None
    suffix_start = second_start + len(second)
    first_type = _constant(types[start:middle_start])
    second_type = _constant(types[second_start:suffix_start])
    if first_type is None or second_type is None:
        return None
    return PairTemplate(
        prefix=tuple(full[:start]),
        middle=tuple(full[middle_start:second_start]),
        suffix=tuple(full[suffix_start:]),
        prefix_types=tuple(types[:start]),
        middle_types=tuple(types[middle_start:second_start]),
        suffix_types=tuple(types[suffix_start:]),
        first_type=first_type,
        second_type=second_type,
    )


def _matches_tokenizer(
    template: PairTemplate,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    with_types: bool,
) -> bool:
    truncate_left = tokenizer.truncation_side == "left"
    long_premise = " ".join([_PROBE_FIRST] * _PROBE_LONG_REPEAT)
    for premise in (_PROBE_FIRST, long_premise):
        expected = tokenizer(
            premise,
            _PROBE_SECOND,
            truncation="only_first",
            max_length=max_length,
            return_token_type_ids=with_types,
        )
        first = _ids(
            tokenizer(premise, add_special_tokens=False, truncation=True, max_length=max_length)
        )
        second = _ids(tokenizer(_PROBE_SECOND, add_special_tokens=False))
        kept, _ = fit_premise(first, len(second), template.num_special, max_length, truncate_left)
        ids, types = template.build(kept, second, with_types)
        if ids != _ids(expected):
            return False
        if with_types and types != _ids(expected, TOKEN_TYPE_IDS):
            return False
    return True


def derive_pair_template(
    tokenizer: PreTrainedTokenizerBase, max_length: int, with_types: bool
) -> PairTemplate | None:
    """The tokenizer's pair layout, verified on probe pairs; ``None`` when not reproducible."""
    try:
        template = _read_layout(tokenizer, with_types)
        if template is None or template.num_special != tokenizer.num_special_tokens_to_add(
            pair=True
        ):
            return None
        return template if _matches_tokenizer(template, tokenizer, max_length, with_types) else None
    except Exception:
        return None
