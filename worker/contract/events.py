"""The public event contract: input events read from Kafka and scored events written back.

Input validation limits (``max_text_chars``, ``max_labels``) come from settings and are
passed as pydantic validation context, so one model serves every configuration.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

DEFAULT_HYPOTHESIS_TEMPLATE = "This example is {}."
# Long enough for any article-sized text; longer inputs are almost always mistakes
# (a whole document dumped into one event) and would waste a truncated forward pass.
DEFAULT_MAX_TEXT_CHARS = 100_000
# The NLI cost grows linearly with labels; 100 keeps one event under a few batches.
DEFAULT_MAX_LABELS = 100
TEMPLATE_PLACEHOLDER = "{}"


def _limit(info: ValidationInfo, key: str, default: int) -> int:
    context = info.context
    if isinstance(context, dict) and isinstance(context.get(key), int):
        return int(context[key])
    return default


def check_template(template: str) -> str:
    """A hypothesis template must contain ``{}`` exactly once."""
    if template.count(TEMPLATE_PLACEHOLDER) != 1:
        raise ValueError("hypothesis_template must contain '{}' exactly once")
    return template


def check_labels(labels: list[str], max_labels: int) -> list[str]:
    """Labels must be non-blank, unique and at most ``max_labels``."""
    if not labels:
        raise ValueError("labels must not be empty")
    if len(labels) > max_labels:
        raise ValueError(f"at most {max_labels} labels are allowed, got {len(labels)}")
    if any(not label.strip() for label in labels):
        raise ValueError("labels must not be blank")
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be unique")
    return labels


class InputEvent(BaseModel):
    """A text event to tag. Unknown top-level fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    text: str = Field(description="The text to classify; not blank.")
    id: str | None = Field(default=None, description="Caller's event id.")
    labels: list[str] | None = Field(
        default=None, description="Candidate labels; the configured defaults when absent."
    )
    multi_label: bool | None = Field(
        default=None, description="Score each label independently (true) or as one choice."
    )
    hypothesis_template: str | None = Field(
        default=None, description="NLI hypothesis with '{}' where the label goes."
    )
    metadata: dict[str, Any] | None = Field(
        default=None, description="Passed through unchanged to the scored event."
    )

    @field_validator("text")
    @classmethod
    def _text(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise ValueError("text must not be blank")
        limit = _limit(info, "max_text_chars", DEFAULT_MAX_TEXT_CHARS)
        if len(value) > limit:
            raise ValueError(f"text is longer than max_text_chars={limit} ({len(value)} chars)")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return None
        return check_labels(value, _limit(info, "max_labels", DEFAULT_MAX_LABELS))

    @field_validator("hypothesis_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return None if value is None else check_template(value)


class Source(BaseModel):
    """Where the input event was read from."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None = Field(
        default=None, description="Kafka record timestamp, milliseconds since the epoch."
    )


class RecordCoordinates(Protocol):
    """Where an input record was read (``worker.kafka.records.InputRecord`` is one): what the
    codec, the dead-letter headers and the metrics need of it."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def timestamp_ms(self) -> int | None: ...


class ModelRef(BaseModel):
    """Which model produced the scores."""

    name: str
    revision: str


class NliProbs(BaseModel):
    """Per-label NLI class probabilities (neutral absent for 2-class models)."""

    entailment: float
    contradiction: float
    neutral: float | None = None


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class ScoredEvent(BaseModel):
    """The output record: the input's scores and tags."""

    id: str = Field(description="The input's id, else 'topic:partition:offset'.")
    source: Source
    labels: list[str] = Field(description="Labels sorted by score, highest first.")
    scores: list[Probability] = Field(description="Scores in the order of 'labels'.")
    tags: list[str] = Field(
        description="Labels that passed their threshold (multi-label) or the top label."
    )
    multi_label: bool
    hypothesis_template: str
    truncated: bool = Field(description="True when the text was cut to fit the model.")
    model: ModelRef
    metadata: dict[str, Any] | None = None
    scored_at: datetime = Field(description="When the event was scored, RFC 3339, UTC.")
    nli: dict[str, NliProbs] | None = Field(
        default=None, description="Per-label NLI probabilities when include_nli_probs is on."
    )
