"""From raw Kafka values to scorer requests, and from scores to scored-event records.

These functions sit on the worker's hot path (one call each per event), so they avoid
needless copies: ``decode_input`` hands the record's bytes straight to orjson, and
pydantic validates the parsed object in place.

Errors are split by the stage that rejected the event, which is what the dead-letter
record reports: ``deserialize`` (the value is not a JSON object) or ``validate`` (a JSON
object that breaks the :class:`~worker.events.InputEvent` contract).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, Final

import orjson
from pydantic import ValidationError

from worker.events import InputEvent, ModelRef, NliProbs, ScoredEvent, Source
from worker.scoring.base import LabelScores, ModelInfo, NliProbabilities, ScoreRequest
from worker.settings import TaggingSettings

# How many pydantic errors one ValidateError message lists; the rest are counted. A
# dead-letter reason should name the broken fields, not echo a whole malformed event.
MAX_REPORTED_ERRORS: Final = 5
# Characters of an error message kept from orjson/pydantic; they never need more, and a
# bound keeps a hostile value from blowing up the dead-letter record.
MAX_ERROR_MESSAGE_CHARS: Final = 500
_VALUE_ERROR_PREFIX: Final = "Value error, "
# 'Z' instead of '+00:00' for UTC, and a naive datetime is taken to be UTC.
_ORJSON_OPTIONS: Final = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC


class EventError(ValueError):
    """An input event that cannot be scored; ``stage`` names the step that rejected it."""

    stage: ClassVar[str]


class DeserializeError(EventError):
    """The record value is not a JSON object (empty, not UTF-8, not JSON, not an object)."""

    stage: ClassVar[str] = "deserialize"


class ValidateError(EventError):
    """A JSON object that breaks the input contract; ``fields`` names the offending ones."""

    stage: ClassVar[str] = "validate"

    def __init__(self, message: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


class NoLabelsError(ValidateError):
    """The event carries no labels and no default labels are configured."""

    def __init__(self) -> None:
        super().__init__(
            "labels: the event has no labels and no default labels are configured "
            "(set TAGSTREAM_LABELS or send 'labels' with the event)",
            fields=("labels",),
        )


def _clip(message: str) -> str:
    if len(message) <= MAX_ERROR_MESSAGE_CHARS:
        return message
    return message[: MAX_ERROR_MESSAGE_CHARS - 3] + "..."


def _location(loc: tuple[int | str, ...]) -> str:
    if not loc:
        return "event"
    path = str(loc[0])
    for part in loc[1:]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def summarize_validation_error(exc: ValidationError) -> tuple[str, tuple[str, ...]]:
    """``"text: text must not be blank; labels[1]: Input should be a valid string"``.

    Returns the message and the top-level field names, without echoing input values.
    """
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    parts: list[str] = []
    for error in errors[:MAX_REPORTED_ERRORS]:
        message = error["msg"].removeprefix(_VALUE_ERROR_PREFIX)
        parts.append(f"{_location(error['loc'])}: {message}")
    if len(errors) > MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more errors")
    fields = tuple(dict.fromkeys(str(error["loc"][0]) for error in errors if error["loc"]))
    return _clip("; ".join(parts)), fields


def _deserialize_reason(value: bytes | bytearray | memoryview, exc: orjson.JSONDecodeError) -> str:
    # Only on the error path: tell "not UTF-8" apart, orjson's message for it is cryptic.
    try:
        bytes(value).decode("utf-8")
    except UnicodeDecodeError as utf8_error:
        return f"value is not valid UTF-8 ({utf8_error.reason} at byte {utf8_error.start})"
    return _clip(f"value is not valid JSON: {exc}")


def _json_kind(obj: Any) -> str:
    if isinstance(obj, list):
        return "an array"
    if isinstance(obj, str):
        return "a string"
    if isinstance(obj, bool):
        return "a boolean"
    if obj is None:
        return "null"
    return "a number"


def validation_context(tagging: TaggingSettings) -> dict[str, int]:
    """The pydantic context that applies the configured input limits."""
    return {"max_text_chars": tagging.max_text_chars, "max_labels": tagging.max_labels}


def decode_input(
    value: bytes | bytearray | memoryview | None, tagging: TaggingSettings
) -> InputEvent:
    """Parse and validate one record value.

    Raises :class:`DeserializeError` or :class:`ValidateError` (both :class:`EventError`).
    """
    if not value:
        raise DeserializeError("value is empty" if value is not None else "value is null")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise DeserializeError(_deserialize_reason(value, exc)) from None
    if not isinstance(obj, dict):
        raise DeserializeError(f"value is {_json_kind(obj)}, expected a JSON object")
    try:
        return InputEvent.model_validate(obj, context=validation_context(tagging))
    except ValidationError as exc:
        message, fields = summarize_validation_error(exc)
        raise ValidateError(message, fields) from None


def to_request(event: InputEvent, tagging: TaggingSettings) -> ScoreRequest:
    """The scorer request of an event, with the configured defaults filled in.

    Raises :class:`NoLabelsError` when neither the event nor the settings give labels.
    """
    labels = event.labels if event.labels is not None else tagging.labels
    if not labels:
        raise NoLabelsError()
    return ScoreRequest(
        text=event.text,
        labels=tuple(labels),
        multi_label=tagging.multi_label if event.multi_label is None else event.multi_label,
        hypothesis_template=event.hypothesis_template or tagging.hypothesis_template,
    )


def select_tags(scores: LabelScores, multi_label: bool, tagging: TaggingSettings) -> list[str]:
    """Labels that pass their threshold (multi-label), else the single top label.

    ``scores`` is sorted highest first, so the tags come out in score order.
    """
    if not multi_label:
        return list(scores.labels[:1])
    overrides = tagging.label_thresholds
    default = tagging.threshold
    return [
        label
        for label, score in zip(scores.labels, scores.scores, strict=True)
        if score >= overrides.get(label, default)
    ]


def _nli_probs(labels: tuple[str, ...], nli: Mapping[str, NliProbabilities]) -> dict[str, NliProbs]:
    return {
        label: NliProbs(
            entailment=probs.entailment,
            contradiction=probs.contradiction,
            neutral=probs.neutral,
        )
        for label in labels
        if (probs := nli.get(label)) is not None
    }


def _as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def event_id(event: InputEvent, source: Source) -> str:
    """The caller's id, else the record's coordinates ``topic:partition:offset``."""
    if event.id is not None:
        return event.id
    return f"{source.topic}:{source.partition}:{source.offset}"


# The positional signature is shared with the streaming worker, hence the noqa.
def build_scored_event(  # noqa: PLR0917
    event: InputEvent,
    request: ScoreRequest,
    scores: LabelScores,
    source: Source,
    tagging: TaggingSettings,
    model: ModelInfo,
    scored_at: datetime,
) -> ScoredEvent:
    """The output record of one scored event."""
    nli = scores.nli if tagging.include_nli_probs else None
    return ScoredEvent(
        id=event_id(event, source),
        source=source,
        labels=list(scores.labels),
        scores=list(scores.scores),
        tags=select_tags(scores, request.multi_label, tagging),
        multi_label=request.multi_label,
        hypothesis_template=request.hypothesis_template,
        truncated=scores.truncated,
        model=ModelRef(name=model.name, revision=model.revision),
        metadata=event.metadata,
        scored_at=_as_utc(scored_at),
        nli=None if nli is None else _nli_probs(scores.labels, nli),
    )


def encode_scored_event(event: ScoredEvent) -> bytes:
    """Compact JSON bytes of a scored event; ``nli`` is left out when absent."""
    exclude = {"nli"} if event.nli is None else None
    return orjson.dumps(event.model_dump(exclude=exclude), option=_ORJSON_OPTIONS)
