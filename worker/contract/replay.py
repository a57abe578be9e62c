"""Replaying dead letters: what a dead-letter record says, which ones to replay, and the
headers of the record that goes back into the stream.

A dead-letter record (:mod:`worker.contract.deadletter`) carries the input's own headers,
an input header named ``tagstream.*`` renamed ``tagstream.prev.*``, followed by the
``tagstream.*`` headers the worker added. The replayed record carries the original key and
value, the input's own headers as the input had them (``tagstream.prev.X`` named
``tagstream.X`` again), none of the headers the dead-letter record added (``error.*``,
``source.*``, ``group``, ``attempts``, ``worker``, ``model``, ``failed_at``, the stub
markers: they describe the failure, not the event, and the worker writes fresh ones if it
fails again), and:

=============================  ========================================================
``tagstream.replay.count``     how many times this input has been replayed, this time
                               included (``1`` on the first replay)
``tagstream.replay.of``        ``<topic>:<partition>:<offset>`` of the dead-letter
                               record it was replayed from
=============================  ========================================================

When a replayed record fails again, its dead-letter record keeps these two as
``tagstream.prev.replay.count`` and ``tagstream.prev.replay.of``, so the next replay reads
the count back and a record that fails forever stops after ``max_replays`` replays.

A *stub* (``tagstream.value.truncated: true``) has no value and cannot be replayed; the
value's SHA-256 finds it in the input topic.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.contract.deadletter import (
    HEADER_CLASS,
    HEADER_FAILED_AT,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    HEADER_STAGE,
    HEADER_VALUE_TRUNCATED,
    PREVIOUS_HEADER_PREFIX,
    TAGSTREAM_HEADER_PREFIX,
    Header,
)

HEADER_REPLAY_COUNT = "tagstream.replay.count"
HEADER_REPLAY_OF = "tagstream.replay.of"
# A record that fails again after three fixes is not going to be fixed by a fourth replay;
# it waits for a human instead of looping between the input and the dead-letter topic.
DEFAULT_MAX_REPLAYS = 3
# Written as a literal "true" by stub_headers; anything else is not a stub.
TRUE = b"true"
# Headers the replay sets itself: an input's own copies (from an earlier replay) give way.
_REPLAY_HEADERS = frozenset({HEADER_REPLAY_COUNT, HEADER_REPLAY_OF})


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def parse_time(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 time (``2024-05-01T12:00:00Z``, ``2024-05-01``) as an aware
    UTC datetime; a time without an offset is taken as UTC. Raises ``ValueError``."""
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def restored_input_headers(headers: Sequence[Header]) -> list[Header]:
    """The input's own headers, in their order, under the names the input gave them: the
    dead-letter record's own ``tagstream.*`` headers left out, ``tagstream.prev.X`` named
    ``tagstream.X`` again (the inverse of the renaming in ``dead_letter_headers``)."""
    restored: list[Header] = []
    for name, value in headers:
        if name.startswith(PREVIOUS_HEADER_PREFIX):
            restored.append(
                (TAGSTREAM_HEADER_PREFIX + name.removeprefix(PREVIOUS_HEADER_PREFIX), value)
            )
        elif not name.startswith(TAGSTREAM_HEADER_PREFIX):
            restored.append((name, value))
    return restored


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What the headers of one dead-letter record say (``None``: the header is missing or
    unreadable)."""

    stage: str | None
    error_class: str | None
    failed_at: datetime | None
    source_topic: str | None
    source_partition: int | None
    stub: bool
    replay_count: int
    input_headers: tuple[Header, ...]

    @classmethod
    def from_headers(cls, headers: Sequence[Header]) -> DeadLetter:
        """Read the dead-letter headers; the last value wins when a name repeats."""
        ours = {
            name: value for name, value in headers if not name.startswith(PREVIOUS_HEADER_PREFIX)
        }
        restored = restored_input_headers(headers)
        count = next(
            (
                _int_or_none(_text(value))
                for name, value in reversed(restored)
                if name == HEADER_REPLAY_COUNT
            ),
            None,
        )
        failed_at_text = _text(ours.get(HEADER_FAILED_AT))
        try:
            failed_at = None if failed_at_text is None else parse_time(failed_at_text)
        except ValueError:
            failed_at = None
        return cls(
            stage=_text(ours.get(HEADER_STAGE)),
            error_class=_text(ours.get(HEADER_CLASS)),
            failed_at=failed_at,
            source_topic=_text(ours.get(HEADER_SOURCE_TOPIC)) or None,
            source_partition=_int_or_none(_text(ours.get(HEADER_SOURCE_PARTITION))),
            stub=ours.get(HEADER_VALUE_TRUNCATED) == TRUE,
            replay_count=max(0, count or 0),
            input_headers=tuple(restored),
        )


def replay_of(topic: str, partition: int, offset: int) -> bytes:
    """The ``tagstream.replay.of`` value: ``<topic>:<partition>:<offset>`` (topic names
    cannot contain ``:``)."""
    return f"{topic}:{partition}:{offset}".encode()


def replay_headers(dead_letter: DeadLetter, of: bytes) -> list[Header]:
    """The headers of the replayed record: the input's own, then the replay count (one
    more than the dead-letter record's) and ``of``, the dead-letter coordinates."""
    kept = [header for header in dead_letter.input_headers if header[0] not in _REPLAY_HEADERS]
    return [
        *kept,
        (HEADER_REPLAY_COUNT, str(dead_letter.replay_count + 1).encode()),
        (HEADER_REPLAY_OF, of),
    ]


@dataclass(frozen=True, slots=True)
class ReplayFilter:
    """Which dead letters to replay; an empty collection or ``None`` matches everything.
    ``since`` is inclusive, ``until`` exclusive; a record without a readable
    ``failed_at`` does not match a time bound."""

    stages: Collection[str] = ()
    error_classes: Collection[str] = ()
    since: datetime | None = None
    until: datetime | None = None
    source_partitions: Collection[int] = ()

    def matches(self, dead_letter: DeadLetter) -> bool:
        if self.stages and dead_letter.stage not in self.stages:
            return False
        if self.error_classes and dead_letter.error_class not in self.error_classes:
            return False
        if self.source_partitions and dead_letter.source_partition not in self.source_partitions:
            return False
        return self._in_window(dead_letter.failed_at)

    def _in_window(self, failed_at: datetime | None) -> bool:
        if self.since is None and self.until is None:
            return True
        if failed_at is None:
            return False
        if self.since is not None and failed_at < self.since:
            return False
        return self.until is None or failed_at < self.until


class Verdict(enum.StrEnum):
    """What happens to one dead-letter record."""

    REPLAY = "replay"
    FILTERED = "filtered"  # does not match the filters
    STUB = "stub"  # no value to replay
    EXHAUSTED = "exhausted"  # replayed max_replays times already
    NO_TARGET = "no_target"  # no --to and no tagstream.source.topic header


def decide(
    dead_letter: DeadLetter, record_filter: ReplayFilter, max_replays: int, target: str | None
) -> Verdict:
    """The verdict for one record; ``target``: where it would go (``None``: nowhere)."""
    if not record_filter.matches(dead_letter):
        return Verdict.FILTERED
    if dead_letter.stub:
        return Verdict.STUB
    if dead_letter.replay_count >= max_replays:
        return Verdict.EXHAUSTED
    if target is None:
        return Verdict.NO_TARGET
    return Verdict.REPLAY
