"""Which offsets are done, per partition, and so which offset may be committed.

An offset is *done* when its output or dead-letter record is acknowledged by the broker.
Acknowledgements arrive out of order (batches finish in any order, dead-letter records
of invalid input are written at once), and partition offsets have gaps (compaction,
transaction markers), so the tracker keeps the received offsets in arrival order and
commits the first one that is not done yet, or the last received one + 1 when all are.

Every assignment of a partition gets a fresh :class:`PartitionOffsets`. Revoking or
losing the partition deactivates it: work still in flight for it then knows, through
``active``, that its results belong to a past assignment and must be ignored.

Not thread-safe: only the worker's main thread calls it (delivery callbacks run there).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

from worker.kafka.records import InputRecord, PartitionKey
from worker.pipeline.tracing import EventTrace


class PartitionOffsets:
    """The received and done offsets of one partition during one assignment."""

    __slots__ = (
        "_clock",
        "_last_received",
        "_order",
        "_waiting",
        "active",
        "committed",
        "generation",
        "key",
        "sent",
        "start",
    )

    def __init__(
        self,
        key: PartitionKey,
        clock: Callable[[], float] = time.monotonic,
        generation: int = 0,
    ) -> None:
        self.key = key
        # The consumer's count of this partition's assignments (InputRecord.generation).
        self.generation = generation
        self._clock = clock
        self.active = True
        # The last position the broker confirmed, and one sent but not yet confirmed:
        # kept apart, so a revoke or a shutdown commits whatever the broker has not
        # confirmed even when an asynchronous commit of it is still on its way (or lost).
        self.committed: int | None = None
        self.sent: int | None = None
        # Received offsets (and when, by the clock) from the first one not done yet, in
        # arrival (= offset) order: the uncommitted window.
        self._order: deque[tuple[int, float]] = deque()
        # The offsets in _order that are not done yet.
        self._waiting: set[int] = set()
        self._last_received: int | None = None
        # The first offset received in this assignment: where a rewind goes back to when
        # nothing was committed yet.
        self.start: int | None = None

    @property
    def pending(self) -> int:
        """Received offsets that are not done yet."""
        return len(self._waiting)

    @property
    def window(self) -> int:
        """Received offsets from the first one not done on: what a crash would replay."""
        return len(self._order)

    def oldest_pending_age(self) -> float:
        """Seconds since the oldest offset not done yet was received (0 when none is)."""
        if not self._order:
            return 0.0
        return max(0.0, self._clock() - self._order[0][1])

    def receive(self, offset: int) -> bool:
        """Record a consumed offset; ``False`` (ignore the record) if it is not new.

        The first offset of an assignment is not taken for a committed one: where the fetch
        started may be a reset (``auto_offset_reset=latest``) the group never stored, and a
        crash before anything is done would then send the next owner to the log end again,
        past these records. So the first commit of an assignment stores at least its start.
        """
        if self._last_received is not None and offset <= self._last_received:
            return False
        self._order.append((offset, self._clock()))
        self._waiting.add(offset)
        self._last_received = offset
        if self.start is None:
            self.start = offset
        return True

    def mark_done(self, offset: int) -> None:
        """Its output or dead-letter record was acknowledged. Offsets that are not waiting
        (already done, or truncated away by a revoke) are ignored."""
        if offset not in self._waiting:
            return
        self._waiting.remove(offset)
        while self._order and self._order[0][0] not in self._waiting:
            self._order.popleft()

    def truncate_from(self, offset: int) -> None:
        """Forget received offsets ``>= offset``: this worker will not process them, the
        next owner of the partition will (they are not committed)."""
        while self._order and self._order[-1][0] >= offset:
            self._waiting.discard(self._order.pop()[0])
        if self._last_received is not None and self._last_received >= offset:
            self._last_received = offset - 1

    def position(self) -> int | None:
        """The offset to commit: the first one not done, else the last received + 1."""
        if self._order:
            return self._order[0][0]
        return None if self._last_received is None else self._last_received + 1

    def commit_due(self, *, unconfirmed: bool = False) -> int | None:
        """The position, if it differs from the last confirmed commit and (unless
        ``unconfirmed``) from the commit already sent."""
        position = self.position()
        if position is None or position == self.committed:
            return None
        if not unconfirmed and position == self.sent:
            return None
        return position

    def rewind_target(self) -> int | None:
        """Exactly-once: where to fetch again after an abort (the last committed position,
        else the first offset received); None when nothing was received past it."""
        if self._last_received is None:
            return None
        target = self.committed if self.committed is not None else self.start
        if target is None or target > self._last_received:
            return None
        return target

    def resume_at(self, position: int) -> None:
        """A fresh state that starts at ``position``: it was committed (or is the start of
        the assignment), and offsets below it are not taken again."""
        self._last_received = position - 1
        self.start = position

    def confirm(self, position: int) -> None:
        """The broker stored ``position``."""
        self.committed = position
        if self.sent == position:
            self.sent = None


class OffsetTracker:
    """Per-partition offset state of the current assignment."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._partitions: dict[PartitionKey, PartitionOffsets] = {}
        self._clock = clock

    def __contains__(self, key: PartitionKey) -> bool:
        return key in self._partitions

    def get(self, key: PartitionKey) -> PartitionOffsets | None:
        return self._partitions.get(key)

    @property
    def keys(self) -> list[PartitionKey]:
        return list(self._partitions)

    def states(self) -> list[PartitionOffsets]:
        return list(self._partitions.values())

    def assign(
        self, keys: Iterable[PartitionKey], generation: Callable[[PartitionKey], int] | None = None
    ) -> None:
        """Start tracking newly assigned partitions from a clean slate; ``generation`` gives
        each one's assignment count, which its records carry."""
        for key in keys:
            previous = self._partitions.get(key)
            if previous is not None:
                previous.active = False
            stamp = 0 if generation is None else generation(key)
            self._partitions[key] = PartitionOffsets(key, self._clock, stamp)

    def rewind(self, key: PartitionKey, position: int, generation: int) -> None:
        """Exactly-once, after an abort: forget everything received past ``position`` (the
        old state goes inactive, so work still in flight for it is dropped) and start again
        there, under the fetch ``generation`` the seek began."""
        previous = self._partitions.get(key)
        if previous is None:
            return
        previous.active = False
        fresh = PartitionOffsets(key, self._clock, generation)
        fresh.committed = previous.committed
        fresh.resume_at(position)
        self._partitions[key] = fresh

    def remove(self, keys: Iterable[PartitionKey]) -> list[PartitionOffsets]:
        """Stop tracking partitions (revoked or lost); their in-flight work is now stale."""
        removed = []
        for key in keys:
            state = self._partitions.pop(key, None)
            if state is not None:
                state.active = False
                removed.append(state)
        return removed

    def pending(self, keys: Iterable[PartitionKey]) -> int:
        """Offsets of these partitions still waiting for an acknowledgement."""
        return sum(state.pending for key in keys if (state := self._partitions.get(key)))

    def commits_due(
        self, keys: Iterable[PartitionKey] | None = None, *, unconfirmed: bool = False
    ) -> dict[PartitionKey, int]:
        """Positions that moved since their last commit (all partitions, or ``keys``);
        with ``unconfirmed`` also those sent already but not confirmed by the broker."""
        chosen = self._partitions if keys is None else keys
        due: dict[PartitionKey, int] = {}
        for key in chosen:
            state = self._partitions.get(key)
            position = state.commit_due(unconfirmed=unconfirmed) if state is not None else None
            if position is not None:
                due[key] = position
        return due

    def mark_sent(self, positions: dict[PartitionKey, int]) -> None:
        """An asynchronous commit of ``positions`` is on its way."""
        for key, position in positions.items():
            state = self._partitions.get(key)
            if state is not None:
                state.sent = position

    def mark_committed(self, positions: dict[PartitionKey, int]) -> None:
        """The broker confirmed ``positions``."""
        for key, position in positions.items():
            state = self._partitions.get(key)
            if state is not None:
                state.confirm(position)


class Tracked(NamedTuple):
    """A consumed record and the assignment of its partition that received it (a named
    tuple: one is built per record), and its trace when tracing is on."""

    record: InputRecord
    partition: PartitionOffsets
    trace: EventTrace | None = None

    @property
    def active(self) -> bool:
        """False once the partition was revoked or lost: the work is someone else's now."""
        return self.partition.active

    def mark_done(self) -> None:
        self.partition.mark_done(self.record.offset)
