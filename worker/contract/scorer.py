"""The contract between the streaming loop and any scorer.

A scorer receives a batch of :class:`ScoreRequest` and returns exactly one
:class:`ScoreOutcome` per request, in the same order: either the label scores or
a :class:`ScoreError`. A scorer never raises for a single bad event; it isolates
the failure so that the rest of the batch is scored normally.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from worker.errors import TransientScoreError


class ScoreRequest(NamedTuple):
    """One event to score: its text and the label set it is scored against.

    Named tuples rather than frozen dataclasses, here and for :class:`LabelScores`: one of
    each is built per event, and a tuple is built about twice as fast, just as immutable.
    """

    text: str
    labels: tuple[str, ...]
    multi_label: bool
    hypothesis_template: str


@dataclass(frozen=True, slots=True)
class NliProbabilities:
    """Raw NLI class probabilities of one (text, hypothesis) pair.

    ``neutral`` is ``None`` for 2-class (entailment / not_entailment) models.
    """

    entailment: float
    contradiction: float
    neutral: float | None


class LabelScores(NamedTuple):
    """Scores of one event, labels sorted by score, highest first.

    ``truncated``: part of the text was not read (cut to the model's length, or past the
    chunk cap). ``chunks``: the token windows of the text that were scored, when the scorer
    reads long texts in chunks (``TAGSTREAM_LONG_TEXT=chunk``); ``None`` otherwise.
    """

    labels: tuple[str, ...]
    scores: tuple[float, ...]
    truncated: bool
    nli: Mapping[str, NliProbabilities] | None = None
    chunks: int | None = None


@dataclass(frozen=True, slots=True)
class ScoreError:
    """Why one event could not be scored.

    ``transient``: the failure is of the moment, not of the event (see
    :func:`is_transient`); the event is scored again a few times before it is
    dead-lettered. Otherwise it goes to the dead-letter topic at once.
    """

    error_class: str
    message: str
    transient: bool = False

    @classmethod
    def from_exception(cls, exc: BaseException) -> ScoreError:
        return cls(error_class=type(exc).__name__, message=str(exc), transient=is_transient(exc))


# Exceptions that say nothing about the event, by class name, so that the contract does
# not import torch: ``torch.cuda.OutOfMemoryError`` after the scorer has already halved
# its token budget down to one pair means another tenant holds the memory right now.
TRANSIENT_EXCEPTION_NAMES = frozenset({"OutOfMemoryError"})


def is_transient(exc: BaseException) -> bool:
    """A timeout, a CUDA out-of-memory or a :class:`~worker.errors.TransientScoreError`."""
    return (
        isinstance(exc, (TimeoutError, TransientScoreError))
        or type(exc).__name__ in TRANSIENT_EXCEPTION_NAMES
    )


ScoreOutcome = LabelScores | ScoreError


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What produced the scores; written into every scored event and metric."""

    name: str
    revision: str
    scorer: str
    device: str
    dtype: str


@runtime_checkable
class Scorer(Protocol):
    """A batch scorer. Implementations: NLI (default), embedding, or user code."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def max_batch_tokens(self) -> int:
        """Token budget of one forward pass (padded length x rows)."""
        ...

    def estimate_tokens(self, request: ScoreRequest) -> int:
        """Tokens the request adds to a micro-batch, so the batcher can close on budget."""
        ...

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        """Score a batch; one outcome per request, same order, never raises per event."""
        ...
