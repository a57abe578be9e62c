"""Label profiles: named label sets read from the control topic (``TAGSTREAM_CONTROL_TOPIC``).

A control record's key is the profile name (UTF-8), its value
a JSON object (:class:`ProfileSpec`); the name rule is
:func:`worker.contract.events.is_profile_name`::

    {"labels": ["sports", "finance"], "hypothesis_template": "This text is about {}.",
     "multi_label": true, "threshold": 0.6, "label_thresholds": {"finance": 0.8}}

Only ``labels`` is required. A field left out takes the fixed default below, never the
worker's ``TAGSTREAM_*`` settings, so a profile name and its version say exactly which
label set, template and thresholds produced a scored event, whichever worker scored it.
``thresholds`` is accepted for ``threshold``. Unknown fields are refused (a misspelt
``lables`` would otherwise pass as a profile with the defaults). A tombstone (a record
without a value) deletes the profile.

The rules are those of events: labels by :func:`~worker.contract.events.check_labels` under
the worker's ``TAGSTREAM_MAX_LABELS`` / ``TAGSTREAM_MAX_LABEL_CHARS``, the template by
:func:`~worker.contract.events.check_template`, thresholds within 0..1; a per-label
threshold must name one of the profile's labels. The record value may be at most
``TAGSTREAM_MAX_PROFILE_RECORD_BYTES``.

A profile's *version* is the offset of the control record that set it, within its
partition (a key always goes to the same partition, so a name's versions only grow).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from worker.contract.events import (
    DEFAULT_HYPOTHESIS_TEMPLATE,
    DEFAULT_MAX_LABEL_CHARS,
    DEFAULT_MAX_LABELS,
    DEFAULT_THRESHOLD,
    check_labels,
    check_profile_name,
    check_template,
)
from worker.errors import ProfileError

# The profile that events without a "profile" field use, in place of TAGSTREAM_LABELS.
DEFAULT_PROFILE: Final = "default"
# A deployment holds a handful of profiles per team; 1,000 of them still take a few MiB,
# and a writer looping over fresh names cannot grow a worker's memory past that.
DEFAULT_MAX_PROFILES: Final = 1_000
# 100 labels of 200 characters plus their thresholds are about 30 KB of JSON: 64 KiB fits
# the largest profile the label limits allow and bounds what one record may cost.
DEFAULT_MAX_PROFILE_RECORD_BYTES: Final = 65_536
# Characters of a validation message kept in the warning about a rejected record.
MAX_PROFILE_ERROR_CHARS: Final = 500

# Metric labels of a rejected control record (ProfileError.reason).
REJECT_KEY: Final = "key"
REJECT_TOO_LARGE: Final = "too_large"
REJECT_JSON: Final = "json"
REJECT_INVALID: Final = "invalid"
REJECT_TOO_MANY: Final = "too_many"
REJECT_REASONS: Final = (REJECT_KEY, REJECT_TOO_LARGE, REJECT_JSON, REJECT_INVALID, REJECT_TOO_MANY)


def _limit(info: ValidationInfo, key: str, default: int) -> int:
    context = info.context
    if isinstance(context, dict) and isinstance(context.get(key), int):
        return int(context[key])
    return default


class ProfileSpec(BaseModel):
    """The value of a control record: one label set and how its scores become tags."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    labels: list[str] = Field(description="The candidate labels of the profile.")
    hypothesis_template: str = Field(
        default=DEFAULT_HYPOTHESIS_TEMPLATE, description="NLI hypothesis with '{}' once."
    )
    multi_label: bool = Field(default=True, description="Independent label scores or one choice.")
    threshold: float = Field(
        default=DEFAULT_THRESHOLD,
        ge=0.0,
        le=1.0,
        validation_alias=AliasChoices("threshold", "thresholds"),
        description="Score at which a label becomes a tag (multi-label).",
    )
    label_thresholds: dict[str, float] = Field(
        default_factory=dict, description="Per-label thresholds overriding 'threshold'."
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return check_labels(
            value,
            _limit(info, "max_labels", DEFAULT_MAX_LABELS),
            _limit(info, "max_label_chars", DEFAULT_MAX_LABEL_CHARS),
        )

    @field_validator("hypothesis_template")
    @classmethod
    def _template(cls, value: str) -> str:
        return check_template(value)

    @model_validator(mode="after")
    def _label_thresholds(self) -> ProfileSpec:
        known = set(self.labels)
        for label, threshold in self.label_thresholds.items():
            if label not in known:
                raise ValueError(f"label_thresholds names {label[:100]!r}, not one of the labels")
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"threshold for {label[:100]!r} must be within 0..1")
        return self

    def to_json(self) -> bytes:
        """The control record value (what ``tagstream profiles set`` writes)."""
        return orjson.dumps(self.model_dump())


@dataclass(frozen=True, slots=True)
class Profile:
    """A profile in force: its spec, its name and its version (the control record's offset).

    Immutable: the main thread resolves one per event and the inference thread reads it
    while the table may already hold a newer version.
    """

    name: str
    version: int
    labels: tuple[str, ...]
    multi_label: bool
    hypothesis_template: str
    threshold: float
    label_thresholds: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, version: int, spec: ProfileSpec) -> Profile:
        return cls(
            name=name,
            version=version,
            labels=tuple(spec.labels),
            multi_label=spec.multi_label,
            hypothesis_template=spec.hypothesis_template,
            threshold=spec.threshold,
            label_thresholds=dict(spec.label_thresholds),
        )

    def describe(self) -> dict[str, Any]:
        """The profile as ``tagstream profiles list --json`` prints it."""
        return {
            "name": self.name,
            "version": self.version,
            "labels": list(self.labels),
            "hypothesis_template": self.hypothesis_template,
            "multi_label": self.multi_label,
            "threshold": self.threshold,
            "label_thresholds": dict(self.label_thresholds),
        }


@dataclass(frozen=True, slots=True)
class ProfileLimits:
    """What a control record may hold: the event label limits and the record size."""

    max_labels: int = DEFAULT_MAX_LABELS
    max_label_chars: int = DEFAULT_MAX_LABEL_CHARS
    max_record_bytes: int = DEFAULT_MAX_PROFILE_RECORD_BYTES

    @property
    def context(self) -> dict[str, int]:
        return {"max_labels": self.max_labels, "max_label_chars": self.max_label_chars}


def profile_name(key: bytes | None) -> str:
    """The profile name of a control record key; raises :class:`ProfileError`."""
    if key is None:
        raise ProfileError(REJECT_KEY, "a control record needs the profile name as its key")
    try:
        name = key.decode("utf-8")
    except UnicodeDecodeError:
        raise ProfileError(REJECT_KEY, "the key is not UTF-8") from None
    try:
        return check_profile_name(name)
    except ValueError as exc:
        raise ProfileError(REJECT_KEY, f"key {name[:100]!r}: {exc}") from None


def parse_spec(value: bytes, limits: ProfileLimits) -> ProfileSpec:
    """The spec of a control record value; raises :class:`ProfileError`."""
    if len(value) > limits.max_record_bytes:
        raise ProfileError(
            REJECT_TOO_LARGE,
            f"the value is {len(value)} bytes, more than "
            f"TAGSTREAM_MAX_PROFILE_RECORD_BYTES={limits.max_record_bytes}",
        )
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ProfileError(REJECT_JSON, f"the value is not JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProfileError(REJECT_JSON, "the value is not a JSON object")
    return validate_spec(obj, limits)


def validate_spec(obj: dict[str, Any], limits: ProfileLimits) -> ProfileSpec:
    """The spec of a JSON object; raises :class:`ProfileError` naming the broken fields."""
    try:
        return ProfileSpec.model_validate(obj, context=limits.context)
    except ValidationError as exc:
        raise ProfileError(REJECT_INVALID, _summary(exc)) from None


def _summary(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error["loc"]) or "value"
        parts.append(f"{location}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)[:MAX_PROFILE_ERROR_CHARS]


def decode_control_record(
    key: bytes | None, value: bytes | None, version: int, limits: ProfileLimits
) -> tuple[str, Profile | None]:
    """(name, profile) of one control record; ``None`` for a tombstone (delete the profile).
    Raises :class:`ProfileError`: the record must not be applied."""
    name = profile_name(key)
    if value is None:
        return name, None
    return name, Profile.of(name, version, parse_spec(value, limits))
