"""Every error tagstream raises on purpose: one root, one line per kind.

``except TagstreamError`` catches what the worker means to report; anything else is a bug.
Where an error says *which* setting or field is wrong, the message names it by its
``TAGSTREAM_*`` environment name or its event field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


class TagstreamError(Exception):
    """The root of every error tagstream raises on purpose."""


# -- configuration (exit code 2) -------------------------------------------------------------


class ConfigError(TagstreamError, ValueError):
    """A setting is invalid or missing; the message names it."""


class ScorerConfigError(ConfigError):
    """The configured scorer cannot be built; the message names the setting."""


class EmbeddingModelError(ScorerConfigError):
    """The embedding model is missing or is not a sentence-embedding model."""


class ObservabilityServerError(TagstreamError):
    """The metrics and health HTTP server cannot start (the port is taken, say)."""


# -- one event (dead-lettered, never fatal) --------------------------------------------------


class EventError(TagstreamError, ValueError):
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


class EventTooCostlyError(ValidateError):
    """Labels x text: the event would cost the model more tokens than one event may."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(
            f"labels x text: the event would cost about {tokens} tokens, more than "
            f"TAGSTREAM_MAX_EVENT_TOKENS={limit} (fewer labels or a shorter text)",
            fields=("labels", "text"),
        )


class UnknownProfileError(ValidateError):
    """The event names a label profile the control topic does not hold (or there is none)."""

    def __init__(self, name: str, control_topic: str | None) -> None:
        where = (
            f"the control topic {control_topic} holds no such profile"
            if control_topic
            else "no control topic is configured (TAGSTREAM_CONTROL_TOPIC)"
        )
        super().__init__(f"profile: unknown profile {name[:100]!r}: {where}", fields=("profile",))


class ScoresError(TagstreamError, ValueError):
    """Scores that break the output contract; the event goes to the dead-letter topic."""


class HypothesisTooLongError(TagstreamError, ValueError):
    """The hypothesis alone leaves no room for the premise within the model's maximum length."""


# -- one control record (rejected with a warning, never applied) ----------------------------


class ProfileError(TagstreamError, ValueError):
    """A label-profile control record that breaks the profile contract; ``reason`` is the
    metric label (``key``, ``too_large``, ``json``, ``invalid``, ``too_many``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- the running worker (exit code 3) --------------------------------------------------------


class WarmUpError(TagstreamError):
    """The model could not score the warm-up request."""


class DeviceError(TagstreamError):
    """The accelerator is in a state no retry clears (a sticky CUDA error): only a new
    process helps, so the worker stops instead of dead-lettering every later event."""


class TransientScoreError(TagstreamError):
    """A scorer's failure of the moment (a timeout, memory another process holds): the
    event is scored again instead of dead-lettered. Scorers raise it for such failures."""


class ScorerFailingError(TagstreamError):
    """Most events fail for long enough that the model, not the input, is broken."""


@dataclass(frozen=True, slots=True)
class KafkaErrorInfo:
    """What the client said about a Kafka error, kept without the client's types."""

    code: int
    name: str
    retriable: bool
    fatal: bool


@dataclass(frozen=True, slots=True)
class RecordRef:
    """The coordinates of the record an error is about."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


class KafkaFatalError(TagstreamError):
    """A Kafka error that stops the worker (authorization, fatal producer state, ...).

    ``error``: the client's error, where there is one; ``record``: the record it is about.
    """

    def __init__(
        self, message: str, error: KafkaErrorInfo | None = None, record: RecordRef | None = None
    ) -> None:
        super().__init__(message)
        self.error = error
        self.record = record


class TransactionStuckError(KafkaFatalError):
    """A transaction could be neither committed nor aborted within its timeout (exactly-once)."""
