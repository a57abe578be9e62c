"""Flow control: when the input pauses, and why. The main thread never waits for a stage.

Whenever a later stage cannot keep up, the input is paused for a named reason (through
:class:`~worker.pipeline.intake.Intake`, which fetches a partition only while nothing holds
it) and released once the reason is gone. Polling goes on while paused: it serves the
group protocol, delivery callbacks, commits and a stop request.

============================  ==============  ==============================================
reason                        holds           on while
============================  ==============  ==============================================
``inference queue full``      every partition the events waiting for the model hold
                                              ``max_buffered_bytes`` (released at half)
``producer queue full``       every partition librdkafka's local queue refused records (backlog)
``scorer failing``            every partition the inference circuit is open
                                              (:mod:`worker.pipeline.circuit`)
``uncommitted window full``   one partition   its uncommitted window holds
                                              ``max_uncommitted_records``, or its oldest record
                                              not done is ``max_uncommitted_age_s`` old
``stopping``                  every partition the worker is shutting down (never released)
============================  ==============  ==============================================

The window bound keeps a write that fails for minutes (a dead-letter topic deleted, too few
replicas) from growing memory and the replay after a crash without bound; the producer's
retry deadline (``retry_deadline_s``) then stops the worker if it never succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from worker.config.settings import DeliverySettings
from worker.pipeline.intake import Intake
from worker.pipeline.observer import Observer
from worker.pipeline.offsets import OffsetTracker, PartitionOffsets

# A full buffer is released at half its size: each pause then lets the model work through
# half a buffer, so the refetch after a resume (librdkafka drops what it prefetched for a
# paused partition) is rare and always hidden behind work still waiting.
BUFFER_RESUME_FRACTION: Final = 0.5
# A full window is released at half its size, so a partition does not flap between paused
# and fetching at every acknowledgement.
WINDOW_RESUME_FRACTION: Final = 0.5
# The windows are checked (and the oldest-pending gauge set) at most this often: a scan of
# every partition per loop turn would cost more than it tells.
WINDOW_CHECK_INTERVAL_S: Final = 0.1

INFERENCE_QUEUE_FULL: Final = "inference queue full"
PRODUCER_QUEUE_FULL: Final = "producer queue full"
SCORER_FAILING: Final = "scorer failing"
WINDOW_FULL: Final = "uncommitted window full"
STOPPING: Final = "stopping"


class FlowControl:
    """Decides the pause reasons from the stages' state (main thread only)."""

    def __init__(
        self,
        intake: Intake,
        tracker: OffsetTracker,
        observer: Observer,
        delivery: DeliverySettings,
        *,
        max_buffered_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._intake = intake
        self._tracker = tracker
        self._observer = observer
        self._max_records = delivery.max_uncommitted_records
        self._max_age_s = delivery.max_uncommitted_age_s
        self._max_buffered = max_buffered_bytes
        self._clock = clock
        self._next_window_check = 0.0

    def update(self, *, buffered_bytes: int, producer_congested: bool, circuit_open: bool) -> None:
        """One loop turn's decisions."""
        self._inference_queue(buffered_bytes)
        self._set(PRODUCER_QUEUE_FULL, producer_congested)
        self._set(SCORER_FAILING, circuit_open)
        now = self._clock()
        if now >= self._next_window_check:
            self._next_window_check = now + WINDOW_CHECK_INTERVAL_S
            self.check_windows()

    def stop(self) -> None:
        self._intake.pause(STOPPING)

    def check_windows(self) -> None:
        """Pause each partition whose uncommitted window is full, release those drained
        below the resume mark, and report the oldest pending age and the largest window."""
        oldest, largest = 0.0, 0
        for state in self._tracker.states():
            age = state.oldest_pending_age()
            oldest, largest = max(oldest, age), max(largest, state.window)
            if self._window_full(state, age):
                self._intake.pause_partition(state.key, WINDOW_FULL)
            elif self._window_drained(state, age):
                self._intake.resume_partition(state.key, WINDOW_FULL)
        self._observer.uncommitted_window(oldest, largest)

    # -- internals ----------------------------------------------------------------------

    def _window_full(self, state: PartitionOffsets, age: float) -> bool:
        return state.window >= self._max_records or age >= self._max_age_s

    def _window_drained(self, state: PartitionOffsets, age: float) -> bool:
        return state.window <= self._max_records * WINDOW_RESUME_FRACTION and age < self._max_age_s

    def _inference_queue(self, buffered_bytes: int) -> None:
        """Pause the input only when the model really falls behind, with hysteresis.

        Pausing makes librdkafka drop its prefetched records and refetch them on resume, so
        pausing whenever a batch waits for the model starves the loop (it waits for input
        librdkafka already had). A byte bound with a gap between pause and resume keeps the
        model fed from the buffer across the refetch and bounds memory all the same.
        """
        if buffered_bytes >= self._max_buffered:
            self._intake.pause(INFERENCE_QUEUE_FULL)
        elif buffered_bytes <= self._max_buffered * BUFFER_RESUME_FRACTION:
            self._intake.resume(INFERENCE_QUEUE_FULL)

    def _set(self, reason: str, on: bool) -> None:
        if on:
            self._intake.pause(reason)
        else:
            self._intake.resume(reason)
