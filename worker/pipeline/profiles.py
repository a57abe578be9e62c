"""Label profiles in force, read from the control topic and followed while the worker runs.

:class:`ProfileFeed` owns a reader of its own, outside the input group: it assigns every
partition of ``TAGSTREAM_CONTROL_TOPIC`` from the beginning and never commits, so every
worker of the group sees every profile. :meth:`ProfileFeed.start` reads the topic up to the
end offsets it finds at start (before the worker joins its group, so no event is judged
against a half-read table, and before ``/readyz`` passes); :meth:`ProfileFeed.poll` then
runs once per main-loop turn, without waiting. Both run on the main thread, which alone
changes the :class:`ProfileTable`.

Where a version is resolved, and why no batch mixes versions: the main thread resolves the
profile of each event when it admits it (:meth:`ProfileTable.resolve`, in
``Worker._admit``) and the event carries that immutable :class:`Profile` to the model and
into its output. Every event is batched under the table's :attr:`ProfileTable.revision`,
which grows with each applied change, and the batcher closes the open batch when the
revision changes (``CloseReason.PROFILES``). So one batch is resolved against one table:
a change applies from the next batch on, and the batches already closed finish with the
versions they were built with.

An invalid control record (:func:`~worker.contract.profiles.decode_control_record` refuses
it) is logged as a warning, counted (``tagstream_profile_records_rejected_total``) and not
applied: the last valid version of that profile stays in force. So does a record for a
profile past ``TAGSTREAM_MAX_PROFILES``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import structlog

from worker.contract.events import EventFields
from worker.contract.profiles import (
    DEFAULT_PROFILE,
    REJECT_TOO_MANY,
    Profile,
    ProfileLimits,
    decode_control_record,
)
from worker.errors import KafkaFatalError, ProfileError, UnknownProfileError
from worker.kafka.records import InputRecord, PartitionKey
from worker.pipeline.observer import Observer

log = structlog.get_logger(__name__)

# Control records taken per poll: a whole small topic in one call at start-up; while
# running, changes are rare and this bounds the time one loop turn spends on them.
CONTROL_POLL_MAX_RECORDS: Final = 500
# Start-up: how long one poll waits for control records while the end is not reached.
CONTROL_LOAD_POLL_S: Final = 0.1
# Metadata and watermark questions at start-up, each.
CONTROL_METADATA_TIMEOUT_S: Final = 10.0
# Pause before asking again for metadata a broker did not give (a topic just created).
CONTROL_METADATA_RETRY_S: Final = 0.5


class Change(enum.StrEnum):
    """What one valid control record did to the table."""

    SET = "set"
    DELETED = "deleted"
    # A tombstone of an unknown profile, or a version older than the one in force.
    NONE = "none"


class ProfileTable:
    """The profiles in force, by name (main thread only).

    ``control_topic`` is named in the error of an event asking for an unknown profile.
    """

    def __init__(self, max_profiles: int, control_topic: str | None = None) -> None:
        self.max_profiles = max_profiles
        self.control_topic = control_topic
        self._profiles: dict[str, Profile] = {}
        # Grows by one with every change applied: the key batches are closed on.
        self.revision = 0

    def __len__(self) -> int:
        return len(self._profiles)

    def get(self, name: str) -> Profile | None:
        return self._profiles.get(name)

    def profiles(self) -> list[Profile]:
        """Every profile, by name."""
        return [self._profiles[name] for name in sorted(self._profiles)]

    def resolve(self, event: EventFields) -> Profile | None:
        """The profile of an event: the one it names, else ``default`` if there is one;
        ``None`` means the settings (``TAGSTREAM_LABELS`` ...) apply. Raises
        :class:`UnknownProfileError` for a name the table does not hold."""
        name = event.profile
        if name is None:
            return self._profiles.get(DEFAULT_PROFILE) if self._profiles else None
        profile = self._profiles.get(name)
        if profile is None:
            raise UnknownProfileError(name, self.control_topic)
        return profile

    def apply(self, name: str, profile: Profile | None) -> Change:
        """Set (``profile``) or delete (``None``) one profile. Raises :class:`ProfileError`
        when a new name would pass ``max_profiles``."""
        current = self._profiles.get(name)
        if profile is None:
            if current is None:
                return Change.NONE
            del self._profiles[name]
            self.revision += 1
            return Change.DELETED
        if current is not None and current.version >= profile.version:
            return Change.NONE
        if current is None and len(self._profiles) >= self.max_profiles:
            raise ProfileError(
                REJECT_TOO_MANY,
                f"the worker already holds TAGSTREAM_MAX_PROFILES={self.max_profiles} profiles",
            )
        self._profiles[name] = profile
        self.revision += 1
        return Change.SET


class ControlConsumer(Protocol):
    """What the feed needs of its reader (``worker.kafka.consumer.KafkaConsumer`` is one)."""

    def partitions(self, topic: str, timeout_s: float) -> list[int] | None: ...

    def watermarks(self, key: PartitionKey, timeout_s: float) -> tuple[int, int]: ...

    def assign_from_beginning(self, keys: Sequence[PartitionKey]) -> None: ...

    def poll(self, max_records: int, timeout_s: float) -> list[InputRecord]: ...

    def position(self, keys: Sequence[PartitionKey]) -> dict[PartitionKey, int | None]: ...

    def close(self) -> object: ...


class ProfileFeed:
    """Reads the control topic into a :class:`ProfileTable` (main thread only)."""

    def __init__(
        self,
        consumer: ControlConsumer,
        topic: str,
        table: ProfileTable,
        limits: ProfileLimits,
        observer: Observer,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.table = table
        self.limits = limits
        self._observer = observer
        self._clock = clock
        self._sleep = sleep
        self.loaded = False

    def start(self, timeout_s: float) -> None:
        """Assign every partition from the beginning and read up to the end offsets found
        now. Raises :class:`KafkaFatalError` when the topic's metadata cannot be read or the
        end is not reached within ``timeout_s`` (``TAGSTREAM_CONTROL_LOAD_TIMEOUT_S``)."""
        self._observer.profiles_loading()
        deadline = self._clock() + timeout_s
        ends = self._end_offsets(deadline, timeout_s)
        self.consumer.assign_from_beginning(list(ends))
        remaining = {key for key, end in ends.items() if end > 0}
        while remaining:
            if self._clock() > deadline:
                raise KafkaFatalError(
                    f"the control topic {self.topic} was not read to its end within "
                    f"TAGSTREAM_CONTROL_LOAD_TIMEOUT_S={timeout_s:g} s"
                )
            records = self.consumer.poll(CONTROL_POLL_MAX_RECORDS, CONTROL_LOAD_POLL_S)
            self.apply(records)
            self._reached(remaining, ends, records)
        self.loaded = True
        log.info("profiles loaded", topic=self.topic, profiles=len(self.table))
        self._observer.profiles_loaded(len(self.table))

    def poll(self) -> bool:
        """Apply the control records that arrived, without waiting; True if any changed
        the table."""
        return self.apply(self.consumer.poll(CONTROL_POLL_MAX_RECORDS, 0.0))

    def apply(self, records: Sequence[InputRecord]) -> bool:
        """Apply each valid record in order, reject the others; True if any changed."""
        changed = False
        for record in records:
            changed = self._apply_one(record) or changed
        return changed

    def close(self) -> None:
        self.consumer.close()

    def _apply_one(self, record: InputRecord) -> bool:
        try:
            name, profile = decode_control_record(
                record.key, record.value, record.offset, self.limits
            )
            change = self.table.apply(name, profile)
        except ProfileError as exc:
            log.warning(
                "control record rejected, not applied",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                reason=exc.reason,
                error=str(exc),
            )
            self._observer.profile_rejected(exc.reason)
            return False
        if change is Change.NONE:
            return False
        if profile is None:
            log.info("profile deleted", profile=name, offset=record.offset)
        else:
            labels = len(profile.labels)
            log.info("profile set", profile=name, version=profile.version, labels=labels)
        self._observer.profile_changed(str(change), len(self.table))
        return True

    def _end_offsets(self, deadline: float, timeout_s: float) -> dict[PartitionKey, int]:
        """The end offset of every partition, asked again until ``deadline``: a topic
        created a moment ago, or a broker busy at start-up, answers a little later."""
        while True:
            try:
                partitions = self.consumer.partitions(self.topic, CONTROL_METADATA_TIMEOUT_S)
                if partitions is not None:
                    return {
                        (self.topic, partition): self.consumer.watermarks(
                            (self.topic, partition), CONTROL_METADATA_TIMEOUT_S
                        )[1]
                        for partition in partitions
                    }
                problem = "no such topic"
            except KafkaFatalError as exc:
                problem = str(exc)
            if self._clock() > deadline:
                raise KafkaFatalError(
                    f"the control topic {self.topic}: its partitions and end offsets could not "
                    f"be read within TAGSTREAM_CONTROL_LOAD_TIMEOUT_S={timeout_s:g} s: {problem}"
                )
            log.warning("control topic metadata not available yet", error=problem)
            self._sleep(CONTROL_METADATA_RETRY_S)

    def _reached(
        self,
        remaining: set[PartitionKey],
        ends: dict[PartitionKey, int],
        records: Sequence[InputRecord],
    ) -> None:
        """Drop the partitions read to their end: a record at the last offset, or (after
        compaction or transaction markers) a fetch position at or past the end."""
        for record in records:
            if record.offset >= ends.get(record.partition_key, 0) - 1:
                remaining.discard(record.partition_key)
        if remaining and not records:
            for key, position in self.consumer.position(sorted(remaining)).items():
                if position is not None and position >= ends[key]:
                    remaining.discard(key)
