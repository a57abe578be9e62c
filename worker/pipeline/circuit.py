"""The inference circuit: tells a failing model apart from failing events.

One event that cannot be scored is the event's fault: it is dead-lettered. Half of all
events failing is the model's or the device's fault (bad weights, a broken driver, a
dependency gone): dead-lettering them would flood the dead-letter topic with good input
and commit past it. So the inference stage records the outcome of every scored event in
a sliding window; when the share of failures in it reaches ``circuit_failure_share``, the
circuit *opens*:

1. the failing batch is not dead-lettered; it is kept and scored again after a backoff
   (doubling from ``CIRCUIT_BACKOFF_INITIAL_S`` to ``CIRCUIT_BACKOFF_MAX_S``);
2. the main thread pauses the input (``scorer failing``) and ``/readyz`` fails;
3. a retry whose failure share is below the threshold *closes* the circuit: its results
   are written as usual and the window starts afresh;
4. a circuit open for ``circuit_max_open_s`` ends the worker with a fatal error (exit
   non-zero, nothing dead-lettered, offsets of the kept batch uncommitted).

Not thread-safe: only the inference thread records outcomes; the main thread reads
:attr:`CircuitBreaker.is_open`, a plain attribute.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Final

from worker.config.settings import CircuitSettings

# First retry of a failing batch after a second: long enough for a transient device
# problem (memory taken by another process) to clear.
CIRCUIT_BACKOFF_INITIAL_S: Final = 1.0
# Never more than a minute between retries, so a fixed dependency is noticed quickly.
CIRCUIT_BACKOFF_MAX_S: Final = 60.0
# Fewer outcomes than this say nothing about the model: one bad event in the first
# batch after start-up is not half the traffic.
CIRCUIT_MIN_EVENTS: Final = 20


class CircuitBreaker:
    """A sliding window of event outcomes and the open/closed state it implies."""

    def __init__(
        self, settings: CircuitSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._share = settings.circuit_failure_share
        self._max_open_s = settings.circuit_max_open_s
        self._min_events = min(CIRCUIT_MIN_EVENTS, settings.circuit_window)
        self._clock = clock
        # The last ``circuit_window`` outcomes, True for a failed event.
        self._outcomes: deque[bool] = deque(maxlen=settings.circuit_window)
        self.is_open = False
        self._opened_at = 0.0
        self._retries = 0

    @property
    def failure_share(self) -> float:
        """Failed events ÷ events in the window (0 when empty)."""
        return _share(self._outcomes)

    def would_trip(self, events: int, failed: int) -> bool:
        """Whether a batch of ``events`` with ``failed`` failures opens the circuit, or (when
        open) keeps it open: decided before the batch's records are written."""
        if events == 0:
            return self.is_open
        if self.is_open:
            return failed / events >= self._share
        trial = deque(self._outcomes, maxlen=self._outcomes.maxlen)
        trial.extend(_outcomes(events, failed))
        return len(trial) >= self._min_events and _share(trial) >= self._share

    def record(self, events: int, failed: int) -> None:
        """A batch's results were written: a retry that got here closes the circuit."""
        if self.is_open:
            self.close()
        self._outcomes.extend(_outcomes(events, failed))

    def open(self) -> None:
        if not self.is_open:
            self.is_open = True
            self._opened_at = self._clock()
            self._retries = 0

    def close(self) -> None:
        self.is_open = False
        self._outcomes.clear()

    def next_backoff(self) -> float:
        """Seconds before the next retry of the kept batch (counts the retry)."""
        delay = min(CIRCUIT_BACKOFF_MAX_S, CIRCUIT_BACKOFF_INITIAL_S * 2**self._retries)
        self._retries += 1
        return float(delay)

    def open_for(self) -> float:
        return self._clock() - self._opened_at if self.is_open else 0.0

    def gave_up(self) -> bool:
        """Open for ``circuit_max_open_s`` or longer: only a restart can help."""
        return self.is_open and self.open_for() >= self._max_open_s


def _outcomes(events: int, failed: int) -> list[bool]:
    # Failures last, so that they stay in the window longest: a conservative order.
    return [False] * (events - failed) + [True] * failed


def _share(outcomes: deque[bool]) -> float:
    return sum(outcomes) / len(outcomes) if outcomes else 0.0
