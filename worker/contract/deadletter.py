"""Dead-letter records: the input's bytes unchanged, plus headers that say what went wrong.

A dead-letter record keeps the original key, value and headers (an input header named
``tagstream.*`` itself is renamed ``tagstream.prev.*``), so it can be replayed into the
input topic once the cause is fixed, and adds ``tagstream.*`` headers, each at most 1 KiB:

=============================  ========================================================
``tagstream.error.stage``      deserialize | validate | inference | produce
``tagstream.error.class``      the exception or Kafka error name
``tagstream.error.message``    what went wrong, at most 1 KiB of UTF-8
``tagstream.source.topic``     where the input was read (also partition, offset, and
                               timestamp in milliseconds, empty when the record has none)
``tagstream.group``            the consumer group
``tagstream.attempts``         how many times the worker tried (produce: produce attempts)
``tagstream.worker``           which worker process wrote it
``tagstream.model``            name@revision of the scorer
``tagstream.failed_at``        RFC 3339 UTC time of the failure
=============================  ========================================================

When the broker refuses the dead-letter record itself (too large for the dead-letter topic,
or rejected), a bounded *stub* is written instead: the original key, no value, the headers
above (the input's own ones only while they fit in ``MAX_STUB_INPUT_HEADER_BYTES``), and:

================================  =====================================================
``tagstream.value.truncated``     ``true``: the value is not in this record
``tagstream.value.size``          the original value's size in bytes
``tagstream.value.sha256``        its SHA-256, hex, to find it in the input topic
``tagstream.headers.truncated``   ``true`` when the input's own headers were left out
================================  =====================================================
"""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

from worker.contract.events import RecordCoordinates

# Error messages can embed arbitrary input (a pydantic message, a scorer traceback
# line); 1 KiB says what went wrong without letting one header dwarf the record.
MAX_ERROR_MESSAGE_BYTES: Final = 1024
TRUNCATION_MARK: Final = "..."
# Input partitions whose shared source headers are kept built: more than a worker is
# assigned, few enough to be nothing in memory.
PARTITION_HEADERS_CACHE: Final = 4096

HEADER_STAGE: Final = "tagstream.error.stage"
HEADER_CLASS: Final = "tagstream.error.class"
HEADER_MESSAGE: Final = "tagstream.error.message"
HEADER_SOURCE_TOPIC: Final = "tagstream.source.topic"
HEADER_SOURCE_PARTITION: Final = "tagstream.source.partition"
HEADER_SOURCE_OFFSET: Final = "tagstream.source.offset"
HEADER_SOURCE_TIMESTAMP: Final = "tagstream.source.timestamp"
HEADER_GROUP: Final = "tagstream.group"
HEADER_ATTEMPTS: Final = "tagstream.attempts"
HEADER_WORKER: Final = "tagstream.worker"
HEADER_MODEL: Final = "tagstream.model"
HEADER_FAILED_AT: Final = "tagstream.failed_at"
HEADER_VALUE_TRUNCATED: Final = "tagstream.value.truncated"
HEADER_VALUE_SIZE: Final = "tagstream.value.size"
HEADER_VALUE_SHA256: Final = "tagstream.value.sha256"
HEADER_HEADERS_TRUNCATED: Final = "tagstream.headers.truncated"
TAGSTREAM_HEADER_PREFIX: Final = "tagstream."
PREVIOUS_HEADER_PREFIX: Final = "tagstream.prev."
# The input's own headers a stub keeps: 16 KiB holds any ordinary set (trace context, ids)
# and keeps the stub far below the smallest max.message.bytes a topic has in practice.
MAX_STUB_INPUT_HEADER_BYTES: Final = 16_384


# One record header as written: name and bytes (or None, which Kafka allows).
Header = tuple[str, bytes | None]


class SourceRecord(RecordCoordinates, Protocol):
    """The input record a header set describes (``worker.kafka.records.InputRecord`` is one)."""

    @property
    def headers(self) -> Sequence[Header]: ...


class Stage(enum.StrEnum):
    """The pipeline step that gave up on an input."""

    DESERIALIZE = "deserialize"
    VALIDATE = "validate"
    INFERENCE = "inference"
    PRODUCE = "produce"


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an input is dead-lettered."""

    stage: Stage
    error_class: str
    message: str
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """Who writes the dead-letter records."""

    group: str
    worker: str
    model: str  # name@revision


def truncate_utf8(message: str, limit: int = MAX_ERROR_MESSAGE_BYTES) -> bytes:
    """``message`` as UTF-8, cut to at most ``limit`` bytes on a character boundary,
    ending in ``...`` when cut."""
    encoded = message.encode("utf-8", errors="replace")
    if len(encoded) <= limit:
        return encoded
    mark = TRUNCATION_MARK.encode()
    head = encoded[: limit - len(mark)].decode("utf-8", errors="ignore").encode("utf-8")
    return head + mark


def source_headers(record: SourceRecord) -> list[Header]:
    """Where the input came from; on scored and dead-letter records alike."""
    return [
        *_partition_headers(record.topic, record.partition),
        (HEADER_SOURCE_OFFSET, b"%d" % record.offset),
    ]


@functools.lru_cache(maxsize=PARTITION_HEADERS_CACHE)
def _partition_headers(topic: str, partition: int) -> tuple[Header, Header]:
    """The headers every record of one input partition shares, built once."""
    return (HEADER_SOURCE_TOPIC, topic.encode()), (HEADER_SOURCE_PARTITION, b"%d" % partition)


def rfc3339(moment: datetime) -> str:
    """``2024-05-01T12:00:00.123456Z``."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def dead_letter_headers(
    record: SourceRecord, failure: Failure, identity: WorkerIdentity, failed_at: datetime
) -> list[Header]:
    """The input's own headers first, then the ``tagstream.*`` ones, each at most
    ``MAX_ERROR_MESSAGE_BYTES``. An input header that is itself named ``tagstream.*`` (a
    replayed or chained record) is kept as ``tagstream.prev.*``, so a reader never sees two
    values under one of the names this record sets."""
    timestamp = b"" if record.timestamp_ms is None else str(record.timestamp_ms).encode()
    added: list[Header] = [
        (HEADER_STAGE, failure.stage.value.encode()),
        (HEADER_CLASS, truncate_utf8(failure.error_class)),
        (HEADER_MESSAGE, truncate_utf8(failure.message)),
        *source_headers(record),
        (HEADER_SOURCE_TIMESTAMP, timestamp),
        (HEADER_GROUP, truncate_utf8(identity.group)),
        (HEADER_ATTEMPTS, str(failure.attempts).encode()),
        (HEADER_WORKER, truncate_utf8(identity.worker)),
        (HEADER_MODEL, truncate_utf8(identity.model)),
        (HEADER_FAILED_AT, rfc3339(failed_at).encode()),
    ]
    return [*(_kept(header) for header in record.headers), *added]


def _kept(header: Header) -> Header:
    name, value = header
    if name.startswith(TAGSTREAM_HEADER_PREFIX):
        return (PREVIOUS_HEADER_PREFIX + name.removeprefix(TAGSTREAM_HEADER_PREFIX), value)
    return header


def _is_ours(name: str) -> bool:
    """A header this dead-letter record set (not one of the input's, renamed or not)."""
    return name.startswith(TAGSTREAM_HEADER_PREFIX) and not name.startswith(PREVIOUS_HEADER_PREFIX)


def _header_size(header: Header) -> int:
    name, value = header
    return len(name.encode("utf-8", errors="replace")) + (0 if value is None else len(value))


def stub_headers(
    headers: Sequence[Header], value: bytes | None, limit: int = MAX_STUB_INPUT_HEADER_BYTES
) -> list[Header]:
    """The headers of the stub that stands in for a dead-letter record the broker refused:
    the ``tagstream.*`` ones of ``headers`` always, the input's own while they fit in
    ``limit`` bytes, and the value's size and SHA-256 (see the module docstring)."""
    own = [header for header in headers if not _is_ours(header[0])]
    ours = [header for header in headers if _is_ours(header[0])]
    fits = sum(_header_size(header) for header in own) <= limit
    body = value or b""
    added: list[Header] = [
        (HEADER_VALUE_TRUNCATED, b"true"),
        (HEADER_VALUE_SIZE, str(len(body)).encode()),
        (HEADER_VALUE_SHA256, hashlib.sha256(body).hexdigest().encode()),
    ]
    if not fits:
        added.append((HEADER_HEADERS_TRUNCATED, b"true"))
    return [*(own if fits else []), *ours, *added]
