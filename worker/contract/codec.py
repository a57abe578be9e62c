"""From raw Kafka values to scorer requests, and from scores to scored-event records.

These functions sit on the worker's hot path (one call each per event), so they avoid
needless copies: ``decode_input`` hands the record's bytes straight to orjson, and
pydantic validates the parsed object in place.

Errors are split by the stage that rejected the event, which is what the dead-letter
record reports: ``deserialize`` (the value is not a JSON object) or ``validate`` (a JSON
object that breaks the :class:`~worker.contract.events.InputEvent` contract).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, Protocol

import orjson
from pydantic import ValidationError

from worker.contract.events import (
    DecodedEvent,
    EventFields,
    InputEvent,
    RecordCoordinates,
    check_labels,
    check_template,
    is_profile_name,
    metadata_depth,
)
from worker.contract.profiles import Profile
from worker.contract.scorer import LabelScores, ModelInfo, ScoreRequest
from worker.errors import DeserializeError, NoLabelsError, ScoresError, ValidateError

# How many pydantic errors one ValidateError message lists; the rest are counted. A
# dead-letter reason should name the broken fields, not echo a whole malformed event.
MAX_REPORTED_ERRORS: Final = 5
# Characters of an error message kept from orjson/pydantic; they never need more, and a
# bound keeps a hostile value from blowing up the dead-letter record.
MAX_ERROR_MESSAGE_CHARS: Final = 500
_VALUE_ERROR_PREFIX: Final = "Value error, "
# 'Z' instead of '+00:00' for UTC, and a naive datetime is taken to be UTC.
_ORJSON_OPTIONS: Final = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC


class TaggingOptions(Protocol):
    """The settings the codec reads (``worker.config.settings.TaggingSettings`` is one):
    input limits, the defaults an event may leave out, and the tag thresholds."""

    @property
    def labels(self) -> list[str]: ...

    @property
    def multi_label(self) -> bool: ...

    @property
    def threshold(self) -> float: ...

    @property
    def label_thresholds(self) -> dict[str, float]: ...

    @property
    def hypothesis_template(self) -> str: ...

    @property
    def include_nli_probs(self) -> bool: ...

    @property
    def max_text_chars(self) -> int: ...

    @property
    def max_labels(self) -> int: ...

    @property
    def max_label_chars(self) -> int: ...

    @property
    def max_metadata_bytes(self) -> int: ...

    @property
    def max_metadata_depth(self) -> int: ...


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


class _Limits(NamedTuple):
    """The input limits of one settings object, read once (``decode_input`` runs per record)."""

    context: dict[str, int]  # the same limits as pydantic validation context
    max_text_chars: int
    max_labels: int
    max_label_chars: int
    max_metadata_bytes: int
    max_metadata_depth: int


def _limits(tagging: TaggingOptions) -> _Limits:
    cached = _limits_cache.get(id(tagging))
    if cached is not None and cached[0] is tagging:
        return cached[1]
    context = {
        "max_text_chars": tagging.max_text_chars,
        "max_labels": tagging.max_labels,
        "max_label_chars": tagging.max_label_chars,
        "max_metadata_bytes": tagging.max_metadata_bytes,
        "max_metadata_depth": tagging.max_metadata_depth,
    }
    limits = _Limits(context, *context.values())
    if len(_limits_cache) >= _LIMITS_CACHE_SIZE:
        _limits_cache.clear()
    _limits_cache[id(tagging)] = (tagging, limits)
    return limits


# A worker has one TaggingOptions; tests build many. Keyed by id, checked by identity.
_limits_cache: dict[int, tuple[TaggingOptions, _Limits]] = {}
_LIMITS_CACHE_SIZE: Final = 64


def validation_context(tagging: TaggingOptions) -> dict[str, int]:
    """The pydantic context that applies the configured input limits (one dict per
    settings object, built once: this runs for every consumed record)."""
    return _limits(tagging).context


def fast_event(obj: dict[str, Any], tagging: TaggingOptions) -> DecodedEvent | None:
    """The event, when ``obj`` is a plainly valid one (the common case), checked exactly as
    :class:`InputEvent` checks it but without building the model; ``None`` for anything
    else, which the model then judges and explains. Never accepts what the model refuses
    (the fuzz tests hold the two side by side)."""
    limits = _limits(tagging)
    text = obj.get("text")
    if type(text) is not str or len(text) > limits.max_text_chars or not text.strip():
        return None
    event_id = obj.get("id")
    labels = obj.get("labels")
    multi_label = obj.get("multi_label")
    template = obj.get("hypothesis_template")
    metadata = obj.get("metadata")
    profile = obj.get("profile")
    if (
        (event_id is not None and type(event_id) is not str)
        or (profile is not None and (type(profile) is not str or not is_profile_name(profile)))
        or (multi_label is not None and type(multi_label) is not bool)
        or (labels is not None and not _plain_labels(labels, limits))
        or (template is not None and not _plain_template(template))
        or (metadata is not None and not _plain_metadata(metadata, limits))
    ):
        return None
    return DecodedEvent(text, event_id, labels, multi_label, template, metadata, profile)


def _plain_labels(labels: Any, limits: _Limits) -> bool:
    if type(labels) is not list or not all(type(label) is str for label in labels):
        return False
    try:
        check_labels(labels, limits.max_labels, limits.max_label_chars)
    except ValueError:
        return False
    return True


def _plain_template(template: Any) -> bool:
    if type(template) is not str:
        return False
    try:
        check_template(template)
    except ValueError:
        return False
    return True


def _plain_metadata(metadata: Any, limits: _Limits) -> bool:
    return (
        type(metadata) is dict
        and metadata_depth(metadata, limits.max_metadata_depth) <= limits.max_metadata_depth
        and len(orjson.dumps(metadata)) <= limits.max_metadata_bytes
    )


def validate_event(obj: dict[str, Any], tagging: TaggingOptions) -> DecodedEvent:
    """The event as the :class:`InputEvent` model validates it; raises
    :class:`ValidateError` naming the broken fields."""
    try:
        model = InputEvent.model_validate(obj, context=validation_context(tagging))
    except ValidationError as exc:
        message, fields = summarize_validation_error(exc)
        raise ValidateError(message, fields) from None
    return DecodedEvent.of(model)


def decode_input(
    value: bytes | bytearray | memoryview | None, tagging: TaggingOptions
) -> DecodedEvent:
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
    return fast_event(obj, tagging) or validate_event(obj, tagging)


def to_request(
    event: EventFields, tagging: TaggingOptions, profile: Profile | None = None
) -> ScoreRequest:
    """The scorer request of an event, with the defaults filled in: the event's own fields
    first, then those of its label ``profile`` when one applies, else the settings.

    Raises :class:`NoLabelsError` when neither the event nor the settings give labels.
    """
    if profile is not None:
        return ScoreRequest(
            event.text,
            tuple(event.labels) if event.labels is not None else profile.labels,
            profile.multi_label if event.multi_label is None else event.multi_label,
            event.hypothesis_template or profile.hypothesis_template,
        )
    labels = tuple(event.labels) if event.labels is not None else _default_labels(tagging)
    if not labels:
        raise NoLabelsError()
    return ScoreRequest(
        event.text,
        labels,
        tagging.multi_label if event.multi_label is None else event.multi_label,
        event.hypothesis_template or tagging.hypothesis_template,
    )


def _default_labels(tagging: TaggingOptions) -> tuple[str, ...]:
    """The configured labels as a tuple, converted once per list (not per event)."""
    labels = tagging.labels
    cached = _default_labels_cache.get(id(tagging))
    if cached is not None and cached[0] is labels:
        return cached[1]
    if len(_default_labels_cache) >= _LIMITS_CACHE_SIZE:
        _default_labels_cache.clear()
    as_tuple = tuple(labels)
    _default_labels_cache[id(tagging)] = (labels, as_tuple)
    return as_tuple


_default_labels_cache: dict[int, tuple[list[str], tuple[str, ...]]] = {}


class Thresholds(Protocol):
    """Where tag thresholds come from: the settings (:class:`TaggingOptions`) or a label
    profile (:class:`~worker.contract.profiles.Profile`)."""

    @property
    def threshold(self) -> float: ...

    @property
    def label_thresholds(self) -> Mapping[str, float]: ...


def select_tags(scores: LabelScores, multi_label: bool, tagging: Thresholds) -> list[str]:
    """Labels that pass their threshold (multi-label), else the single top label.

    ``scores`` is sorted highest first, so the tags come out in score order.
    """
    if len(scores.labels) != len(scores.scores):
        raise ScoresError(f"{len(scores.scores)} scores for {len(scores.labels)} labels")
    return _tags(scores.labels, scores.scores, multi_label, tagging)


def _tags(
    labels: Sequence[str], values: Sequence[float], multi_label: bool, tagging: Thresholds
) -> list[str]:
    """:func:`select_tags` of labels and scores of the same length."""
    if not multi_label:
        return list(labels[:1])
    overrides = tagging.label_thresholds
    default = tagging.threshold
    if not overrides:
        return [label for label, score in zip(labels, values) if score >= default]  # noqa: B905
    return [
        label
        for label, score in zip(labels, values)  # noqa: B905
        if score >= overrides.get(label, default)
    ]


def as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is UTC:
        return moment  # the worker's own clock: nothing to convert
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def rendered_time(moment: datetime) -> str:
    """``moment`` as the output contract writes it (RFC 3339, UTC, ``Z``), exactly as
    orjson renders the datetime itself. A batch's events share one ``scored_at``, so the
    last one rendered is kept: formatting a datetime costs more than the rest of a field."""
    last = _rendered.last
    if last is not None and last[0] is moment:
        return last[1]
    text: str = orjson.dumps(as_utc(moment), option=_ORJSON_OPTIONS)[1:-1].decode()
    # One tuple, replaced whole: another thread reads either the old pair or the new one.
    _rendered.last = (moment, text)
    return text


class _Rendered:
    """The datetime rendered last and its text (the object is kept, so its id is not
    reused while it is here)."""

    last: tuple[datetime, str] | None = None


_rendered = _Rendered()


def checked_scores(scores: LabelScores) -> tuple[list[str], list[float]]:
    """The scorer's labels and scores as the output contract wants them (what the
    :class:`~worker.contract.events.ScoredEvent` model checks): one score per label,
    labels strings, scores numbers within 0..1 (NaN is not). Raises :class:`ScoresError`."""
    labels = list(scores.labels)
    try:
        values = list(map(float, scores.scores))
    except (TypeError, ValueError) as exc:
        raise ScoresError(f"scores must be numbers: {exc}") from None
    if len(labels) != len(values):
        raise ScoresError(f"{len(values)} scores for {len(labels)} labels")
    if _plain_scores(labels, values):
        return labels, values
    for label, value in zip(labels, values, strict=True):
        if not isinstance(label, str):
            raise ScoresError(f"label {label!r} is not a string")
        if not 0.0 <= value <= 1.0:
            raise ScoresError(f"score of {label!r} is {value}, not within 0..1")
    return labels, values


def _plain_scores(labels: list[str], values: list[float]) -> bool:
    """The common case in C-speed calls; the caller's loop only finds what to report.
    ``str.join`` refuses anything but strings; a NaN makes the sum NaN (unequal to itself)
    and slips past min and max alone."""
    if not values:
        return True
    try:
        "".join(labels)
    except TypeError:
        return False
    total = sum(values)
    return min(values) >= 0.0 and max(values) <= 1.0 and total == total  # noqa: PLR0124


# One argument per part of a scored event, hence the noqa.
def encode_output(  # noqa: PLR0917
    event: EventFields,
    request: ScoreRequest,
    scores: LabelScores,
    record: RecordCoordinates,
    tagging: TaggingOptions,
    model: ModelInfo,
    scored_at: datetime,
    profile: Profile | None = None,
) -> bytes:
    """The scored event's JSON bytes straight from its parts: the same bytes as
    ``encode_scored_event(build_scored_event(...))`` without building the pydantic
    objects (Source, ScoredEvent) on the way, which costs most of the time per event.
    With a label ``profile``, its thresholds make the tags and ``profile`` names it and
    its version.

    Raises :class:`ScoresError` for scores that break the contract (dead-letter them).
    """
    labels, values = checked_scores(scores)
    nli = scores.nli if tagging.include_nli_probs else None
    document: dict[str, Any] = {
        "id": event.id
        if event.id is not None
        else f"{record.topic}:{record.partition}:{record.offset}",
        "source": {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "timestamp": record.timestamp_ms,
        },
        "labels": labels,
        "scores": values,
        "tags": _tags(labels, values, request.multi_label, tagging if profile is None else profile),
        "multi_label": request.multi_label,
        "hypothesis_template": request.hypothesis_template,
        "truncated": bool(scores.truncated),
        "model": {"name": model.name, "revision": model.revision},
        "metadata": event.metadata,
        "scored_at": rendered_time(scored_at),
    }
    if nli is not None:
        document["nli"] = {
            label: {
                "entailment": float(probs.entailment),
                "contradiction": float(probs.contradiction),
                "neutral": None if probs.neutral is None else float(probs.neutral),
            }
            for label in labels
            if (probs := nli.get(label)) is not None
        }
    if profile is not None:
        document["profile"] = {"name": profile.name, "version": profile.version}
    if scores.chunks is not None:
        document["chunks_read"] = int(scores.chunks)
    return orjson.dumps(document, option=_ORJSON_OPTIONS)
