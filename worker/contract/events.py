"""The public event contract: input events read from Kafka and scored events written back.

Input validation limits (``max_text_chars``, ``max_labels``) come from settings and are
passed as pydantic validation context, so one model serves every configuration.
"""

from __future__ import annotations

import functools
import re
import string
from datetime import datetime
from typing import Annotated, Any, NamedTuple, Protocol

import orjson
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
# A label is a word or a short phrase; 200 characters bound what each adds to every pair.
DEFAULT_MAX_LABEL_CHARS = 200
# Metadata rides along into the scored event: 64 KiB keeps that record far below Kafka's
# default 1 MB limit whatever else it carries.
DEFAULT_MAX_METADATA_BYTES = 65_536
# Deeper metadata is almost always a mistake; 16 levels bound every walk over it.
DEFAULT_MAX_METADATA_DEPTH = 16
TEMPLATE_PLACEHOLDER = "{}"
# A hypothesis is one short sentence; 500 characters leave room for any real one, and bound
# what every label of every event multiplies.
MAX_TEMPLATE_CHARS = 500
# A label is a tag when its score reaches this, unless a setting or a profile says otherwise.
DEFAULT_THRESHOLD = 0.5
# A profile name is an identifier that goes into every scored event: short, printable.
MAX_PROFILE_NAME_CHARS = 100
PROFILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Distinct templates parsed and remembered: a worker sees a handful, a hostile stream many.
TEMPLATE_CACHE_SIZE = 1024


def _limit(info: ValidationInfo, key: str, default: int) -> int:
    context = info.context
    if isinstance(context, dict) and isinstance(context.get(key), int):
        return int(context[key])
    return default


def template_parts(template: str) -> tuple[str, str]:
    """The text before and after the label slot of a hypothesis template.

    A template is accepted only with exactly one replacement field that has no name, no
    conversion and no format spec (``"{}"``; ``{{`` and ``}}`` stand for braces), and at
    most ``MAX_TEMPLATE_CHARS`` characters: ``str.format`` on anything else would read
    attributes (``{.__class__}``) or build a string as large as a format spec asks
    (``{:>1000000000}``). Raises ``ValueError``.
    """
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(
            f"hypothesis_template is longer than {MAX_TEMPLATE_CHARS} characters ({len(template)})"
        )
    return _template_parts(template)


@functools.lru_cache(maxsize=TEMPLATE_CACHE_SIZE)
def _template_parts(template: str) -> tuple[str, str]:
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone "{" or "}"
        raise ValueError(f"hypothesis_template is not a valid template: {exc}") from None
    fields = [piece for piece in pieces if piece[1] is not None]
    if len(fields) != 1 or fields[0] != (fields[0][0], "", "", None):
        raise ValueError(
            "hypothesis_template must contain '{}' exactly once, with nothing inside the braces"
        )
    slot = pieces.index(fields[0])
    before = "".join(text for text, *_ in pieces[: slot + 1])
    after = "".join(text for text, *_ in pieces[slot + 1 :])
    return before, after


def render_hypothesis(template: str, label: str) -> str:
    """The hypothesis of one label: ``template.format(label)`` for an accepted template,
    without ``str.format``. Raises ``ValueError`` for a template :func:`template_parts`
    refuses."""
    before, after = template_parts(template)
    return f"{before}{label}{after}"


def check_template(template: str) -> str:
    """A hypothesis template must hold one bare ``{}`` (see :func:`template_parts`)."""
    template_parts(template)
    return template


def is_profile_name(name: str) -> bool:
    """A label profile name: 1 to 100 ASCII letters, digits, ``.``, ``_`` and ``-``,
    starting with a letter or a digit."""
    return len(name) <= MAX_PROFILE_NAME_CHARS and PROFILE_NAME_PATTERN.fullmatch(name) is not None


def check_profile_name(name: str) -> str:
    """Raises ``ValueError`` for a name :func:`is_profile_name` refuses."""
    if not is_profile_name(name):
        raise ValueError(
            f"a profile name is 1 to {MAX_PROFILE_NAME_CHARS} letters, digits, '.', '_' or "
            "'-', starting with a letter or a digit"
        )
    return name


def metadata_depth(value: Any, stop_past: int) -> int:
    """How deeply ``value`` nests lists and objects (a scalar is 0), counting no further
    than ``stop_past + 1``; iterative, so no input can exhaust the stack."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level > stop_past:
                return level
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def check_labels(
    labels: list[str], max_labels: int, max_label_chars: int = DEFAULT_MAX_LABEL_CHARS
) -> list[str]:
    """Labels must be non-blank, unique, at most ``max_labels`` of at most
    ``max_label_chars`` characters each."""
    if not labels:
        raise ValueError("labels must not be empty")
    if len(labels) > max_labels:
        raise ValueError(f"at most {max_labels} labels are allowed, got {len(labels)}")
    longest = max(len(label) for label in labels)
    if longest > max_label_chars:
        raise ValueError(f"a label is longer than max_label_chars={max_label_chars} ({longest})")
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
    profile: str | None = Field(
        default=None,
        description="Label profile from the control topic; 'default' (when it exists) "
        "or the configured labels when absent.",
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
        return check_labels(
            value,
            _limit(info, "max_labels", DEFAULT_MAX_LABELS),
            _limit(info, "max_label_chars", DEFAULT_MAX_LABEL_CHARS),
        )

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if value is None:
            return None
        depth_limit = _limit(info, "max_metadata_depth", DEFAULT_MAX_METADATA_DEPTH)
        depth = metadata_depth(value, depth_limit)
        if depth > depth_limit:
            raise ValueError(f"metadata is nested deeper than max_metadata_depth={depth_limit}")
        size_limit = _limit(info, "max_metadata_bytes", DEFAULT_MAX_METADATA_BYTES)
        size = len(orjson.dumps(value))
        if size > size_limit:
            raise ValueError(
                f"metadata is larger than max_metadata_bytes={size_limit} ({size} bytes as JSON)"
            )
        return value

    @field_validator("hypothesis_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return None if value is None else check_template(value)

    @field_validator("profile")
    @classmethod
    def _profile(cls, value: str | None) -> str | None:
        return None if value is None else check_profile_name(value)


class DecodedEvent(NamedTuple):
    """An input event as the pipeline carries it: the fields of :class:`InputEvent`, checked
    by :func:`worker.contract.codec.decode_input` exactly as the model checks them.

    The pydantic model stays the contract (its JSON schema, its error messages); this named
    tuple is what one valid event costs on the hot path, where one is built per record.
    """

    text: str
    id: str | None = None
    labels: list[str] | None = None
    multi_label: bool | None = None
    hypothesis_template: str | None = None
    metadata: dict[str, Any] | None = None
    profile: str | None = None

    @classmethod
    def of(cls, event: InputEvent) -> DecodedEvent:
        return cls(
            event.text,
            event.id,
            event.labels,
            event.multi_label,
            event.hypothesis_template,
            event.metadata,
            event.profile,
        )


# What the codec reads of an event: the decoded tuple, or the model built by hand.
EventFields = InputEvent | DecodedEvent


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


class ProfileRef(BaseModel):
    """Which label profile, in which version, gave the labels, template and thresholds."""

    name: str
    version: int = Field(description="Offset of the control record that set the profile.")


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
    truncated: bool = Field(
        description="True when part of the text was not read: cut to fit the model, or, in "
        "chunk mode, past the cap on chunks per event."
    )
    model: ModelRef
    metadata: dict[str, Any] | None = None
    scored_at: datetime = Field(description="When the event was scored, RFC 3339, UTC.")
    nli: dict[str, NliProbs] | None = Field(
        default=None, description="Per-label NLI probabilities when include_nli_probs is on."
    )
    profile: ProfileRef | None = Field(
        default=None,
        description="The label profile that applied; absent when the configured labels did.",
    )
    chunks_read: int | None = Field(
        default=None,
        ge=1,
        description="Chunk mode (TAGSTREAM_LONG_TEXT=chunk): token windows of the text that "
        "were scored; absent in truncate mode.",
    )
