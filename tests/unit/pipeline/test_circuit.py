"""The inference circuit breaker: the failure share over a sliding window of events."""

from __future__ import annotations

from worker.config.settings import CircuitSettings
from worker.pipeline.circuit import CIRCUIT_MIN_EVENTS, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _breaker(window: int = 200, share: float = 0.5, max_open_s: float = 600.0) -> CircuitBreaker:
    settings = CircuitSettings(
        circuit_window=window, circuit_failure_share=share, circuit_max_open_s=max_open_s
    )
    return CircuitBreaker(settings, clock=Clock())


def test_a_few_failures_at_start_up_do_not_trip_it() -> None:
    breaker = _breaker()
    assert not breaker.would_trip(CIRCUIT_MIN_EVENTS - 1, CIRCUIT_MIN_EVENTS - 1)
    assert breaker.would_trip(CIRCUIT_MIN_EVENTS, CIRCUIT_MIN_EVENTS)


def test_it_trips_at_the_share_over_the_window_not_per_batch() -> None:
    breaker = _breaker(window=100)
    breaker.record(80, 20)  # 25 %
    assert not breaker.would_trip(20, 20)  # 40 of 100
    assert breaker.would_trip(40, 40)  # the 20 oldest good ones pushed out: 60 of 100


def test_old_failures_slide_out_of_the_window() -> None:
    breaker = _breaker(window=50)
    breaker.record(50, 24)
    breaker.record(50, 0)
    assert breaker.failure_share == 0.0
    assert not breaker.would_trip(50, 24)


def test_an_open_circuit_closes_on_a_healthy_retry_and_starts_afresh() -> None:
    breaker = _breaker(window=20)
    assert breaker.would_trip(20, 20)
    breaker.open()
    assert breaker.is_open
    assert breaker.would_trip(20, 15)  # the retry still fails mostly
    assert not breaker.would_trip(20, 2)
    breaker.record(20, 2)
    assert (breaker.is_open, breaker.failure_share) == (False, 0.1)


def test_backoff_doubles_and_the_circuit_gives_up_after_its_bound() -> None:
    clock = Clock()
    settings = CircuitSettings(circuit_window=20, circuit_max_open_s=30.0)
    breaker = CircuitBreaker(settings, clock=clock)
    breaker.open()
    assert [breaker.next_backoff() for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    clock.now = 29.0
    assert not breaker.gave_up()
    clock.now = 30.0
    assert breaker.gave_up()
