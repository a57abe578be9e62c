"""Micro-batching: valid events accumulate into batches that go to the inference thread.

A batch closes at ``max_batch_size`` events, at the scorer's token budget, or
``max_wait_ms`` after its first event, whichever comes first; and when an event comes with
another key than the open batch's (the label profile table's revision, see
:mod:`worker.pipeline.profiles`), so that one batch never mixes profile versions. Closed
batches wait in :attr:`Batcher.ready` until the :class:`Handoff` to the inference thread
has room: at most ``max_in_flight_batches`` batches are submitted and not yet finished, so
one batch is assembled while the model runs another. What waits here is counted in bytes
(:attr:`Batcher.buffered_bytes`); past ``max_buffered_bytes`` the main thread pauses
fetching (:mod:`worker.pipeline.flow`), so memory stays bounded when the model is slower
than the input.

The :class:`Batcher` is owned by the main thread; the :class:`Handoff` is the only object
shared with the inference thread.

The batching rules do not depend on what is batched: :class:`MicroBatcher` and
:class:`BatchHandoff` take any item with ``tokens`` and ``size``, so ``tagstream serve``
(:mod:`worker.serve.batcher`) batches HTTP requests with exactly the worker's rules;
:class:`Batcher` and :class:`Handoff` are the worker's instances, over :class:`PendingEvent`.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, Protocol, TypeVar

from worker.contract.events import EventFields
from worker.contract.profiles import Profile
from worker.contract.scorer import ScoreRequest
from worker.kafka.records import PartitionKey
from worker.pipeline.offsets import Tracked

# What one waiting event costs beyond its record value and text: the record, the event and
# its request, the offset bookkeeping (~1.3 KB for a 70-byte event, measured with
# tracemalloc); counted so that a stream of tiny events is bounded as well as big ones.
PENDING_EVENT_OVERHEAD_BYTES = 1_280


class CloseReason(enum.StrEnum):
    """Why a batch closed."""

    SIZE = "size"
    TOKENS = "tokens"
    TIME = "time"
    # Exactly-once: a transaction commit drains everything (worker.pipeline.transactions).
    CHECKPOINT = "checkpoint"
    # The label profiles changed: the next events are resolved against another table.
    PROFILES = "profiles"
    # tagstream serve, continuous batching: the inference thread was idle, so the open
    # batch went to it at once (worker.serve.batcher).
    IDLE = "idle"


class PendingEvent(NamedTuple):
    """A valid input event waiting to be scored (a named tuple: one is built per event)."""

    origin: Tracked
    event: EventFields
    request: ScoreRequest
    tokens: int
    # The label profile resolved for it at admission; None: the settings' labels applied.
    profile: Profile | None = None

    @property
    def size(self) -> int:
        """Bytes this event holds while it waits (value, its decoded text, the objects)."""
        value = self.origin.record.value
        return PENDING_EVENT_OVERHEAD_BYTES + (0 if value is None else 2 * len(value))


class Weighed(Protocol):
    """What the batcher reads of an item: its cost to the model and the bytes it holds."""

    @property
    def tokens(self) -> int: ...

    @property
    def size(self) -> int: ...


ItemT = TypeVar("ItemT", bound=Weighed)
BatchT = TypeVar("BatchT")


@dataclass(slots=True)
class MicroBatch(Generic[ItemT]):
    """Items scored together in one call of the scorer."""

    opened_at: float
    items: list[ItemT] = field(default_factory=list)
    tokens: int = 0
    reason: CloseReason | None = None
    # Numbered by the main thread on submission; both threads' log lines carry it.
    batch_id: int = 0
    # The profile table revision its events were resolved under (one per batch).
    key: int = 0

    def __len__(self) -> int:
        return len(self.items)


# The worker's batch: Kafka events.
Batch = MicroBatch[PendingEvent]


class MicroBatcher(Generic[ItemT]):
    """Fills micro-batches to a size cap, a token budget and a wait deadline."""

    def __init__(
        self,
        max_size: int,
        max_wait_s: float,
        max_tokens: int,
        clock: Callable[[], float] = time.monotonic,
        on_close: Callable[[MicroBatch[ItemT]], None] | None = None,
    ) -> None:
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.max_tokens = max_tokens
        self._clock = clock
        self._on_close = on_close
        self._open: MicroBatch[ItemT] | None = None
        self.ready: deque[MicroBatch[ItemT]] = deque()
        # Bytes held by the events of the open and the ready batches.
        self.buffered_bytes = 0

    @property
    def open_size(self) -> int:
        return 0 if self._open is None else len(self._open)

    def add(self, item: ItemT, key: int = 0) -> None:
        """Add an event; batches that close on it are appended to :attr:`ready`.

        An event that would push the open batch over the token budget closes that batch
        first and starts the next one; so does an event whose ``key`` (the profile table
        revision it was resolved under) is not the open batch's. An event over the budget
        on its own is scored in a batch of one (the scorer truncates it).
        """
        if self._open is not None and self._open.key != key:
            self._close(CloseReason.PROFILES)
        if self._open is not None and self._open.tokens + item.tokens > self.max_tokens:
            self._close(CloseReason.TOKENS)
        if self._open is None:
            self._open = MicroBatch[ItemT](opened_at=self._clock(), key=key)
        self._open.items.append(item)
        self._open.tokens += item.tokens
        self.buffered_bytes += item.size
        if len(self._open) >= self.max_size:
            self._close(CloseReason.SIZE)
        elif self._open.tokens >= self.max_tokens:
            self._close(CloseReason.TOKENS)

    def time_left(self) -> float | None:
        """Seconds until the open batch is due to close; None when there is none."""
        if self._open is None:
            return None
        return max(0.0, self._open.opened_at + self.max_wait_s - self._clock())

    def close_if_due(self) -> None:
        """Close the open batch if its first event has waited ``max_wait_ms``."""
        if self._open is not None and self.time_left() == 0.0:
            self._close(CloseReason.TIME)

    def flush(self, reason: CloseReason = CloseReason.CHECKPOINT) -> None:
        """Close the open batch now (a transaction commit waits for every event; an idle
        inference thread of ``tagstream serve`` takes what is there)."""
        self._close(reason)

    @property
    def empty(self) -> bool:
        """No event waits here, in the open or a ready batch."""
        return self._open is None and not self.ready

    def pop_ready(self) -> MicroBatch[ItemT]:
        """Take the oldest ready batch (it is handed to the inference thread)."""
        batch = self.ready.popleft()
        self.buffered_bytes -= sum(item.size for item in batch.items)
        return batch

    def drop_all(self) -> list[ItemT]:
        """Remove every event of the open and the ready batches."""
        batches = [*self.ready, *([self._open] if self._open is not None else [])]
        dropped = [item for batch in batches for item in batch.items]
        self.ready.clear()
        self._open = None
        self.buffered_bytes = 0
        return dropped

    def _close(self, reason: CloseReason) -> None:
        if self._open is None:
            return
        batch, self._open = self._open, None
        batch.reason = reason
        self.ready.append(batch)
        if self._on_close is not None:
            self._on_close(batch)


class Batcher(MicroBatcher[PendingEvent]):
    """The worker's batcher: Kafka events, which a revoke takes out by partition."""

    def drop(self, keys: Collection[PartitionKey]) -> list[PendingEvent]:
        """Remove the events of these partitions from the open and the ready batches."""
        dropped: list[PendingEvent] = []
        batches = [*self.ready, *([self._open] if self._open is not None else [])]
        for batch in batches:
            kept: list[PendingEvent] = []
            for item in batch.items:
                (dropped if item.origin.record.partition_key in keys else kept).append(item)
            if len(kept) != len(batch.items):
                batch.items = kept
                batch.tokens = sum(item.tokens for item in kept)
        self.ready = deque(batch for batch in self.ready if batch.items)
        if self._open is not None and not self._open.items:
            self._open = None
        self.buffered_bytes -= sum(item.size for item in dropped)
        return dropped


class BatchHandoff(Generic[BatchT]):
    """The bounded hand-over of batches from the main thread to the inference thread.

    ``in_flight`` counts batches submitted and not yet finished (queued or being scored);
    :meth:`try_submit` refuses a batch while it is at ``limit``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._queue: deque[BatchT] = deque()
        self._in_flight = 0
        self._closed = False
        self._condition = threading.Condition()

    @property
    def in_flight(self) -> int:
        with self._condition:
            return self._in_flight

    def try_submit(self, batch: BatchT) -> bool:
        """Main thread: hand a batch over unless ``limit`` batches are in flight."""
        with self._condition:
            if self._in_flight >= self.limit or self._closed:
                return False
            self._in_flight += 1
            self._queue.append(batch)
            self._condition.notify_all()
            return True

    def take(self) -> BatchT | None:
        """Inference thread: the next batch, blocking; None once closed and drained."""
        with self._condition:
            while not self._queue and not self._closed:
                self._condition.wait()
            return self._queue.popleft() if self._queue else None

    def finished(self) -> None:
        """Inference thread: the batch taken last is done (its records are produced)."""
        with self._condition:
            self._in_flight -= 1
            self._condition.notify_all()

    def wait_closed(self, timeout_s: float) -> bool:
        """Inference thread: wait up to ``timeout_s`` for :meth:`close`; True if closed."""
        with self._condition:
            return self._condition.wait_for(lambda: self._closed, timeout_s)

    def close(self, *, discard_queued: bool = False) -> None:
        """No more batches; the inference thread stops after the queued ones (or at once)."""
        with self._condition:
            self._closed = True
            if discard_queued:
                self._in_flight -= len(self._queue)
                self._queue.clear()
            self._condition.notify_all()


class Handoff(BatchHandoff[Batch]):
    """The worker's hand-over: batches of Kafka events."""
