"""Flow control: pause reasons from the stages' state, per partition or for the whole input."""

from __future__ import annotations

from typing import Final

from tests.support.fake_kafka import FakeConsumer
from worker.config.settings import DeliverySettings
from worker.kafka.records import PartitionKey
from worker.pipeline.flow import PRODUCER_QUEUE_FULL, SCORER_FAILING, WINDOW_FULL, FlowControl
from worker.pipeline.intake import Intake
from worker.pipeline.observer import Observer
from worker.pipeline.offsets import OffsetTracker

P0: Final[PartitionKey] = ("news", 0)
P1: Final[PartitionKey] = ("news", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class WindowObserver(Observer):
    def __init__(self) -> None:
        self.windows: list[tuple[float, int]] = []

    def uncommitted_window(self, oldest_pending_s: float, largest_window: int) -> None:
        self.windows.append((oldest_pending_s, largest_window))


def _flow(
    **delivery: float,
) -> tuple[FlowControl, Intake, FakeConsumer, OffsetTracker, Clock, WindowObserver]:
    clock = Clock()
    observer = WindowObserver()
    consumer = FakeConsumer(on_commit=lambda error, results: None)
    intake = Intake(consumer, observer)
    tracker = OffsetTracker(clock)
    consumer.assigned = [P0, P1]
    tracker.assign([P0, P1])
    settings = DeliverySettings.model_validate(delivery)
    return (
        FlowControl(intake, tracker, observer, settings, max_buffered_bytes=1000, clock=clock),
        intake,
        consumer,
        tracker,
        clock,
        observer,
    )


def test_reasons_hold_the_input_independently() -> None:
    flow, intake, consumer, *_ = _flow()
    flow.update(buffered_bytes=0, producer_congested=True, circuit_open=True)
    assert intake.holds() == {PRODUCER_QUEUE_FULL, SCORER_FAILING}
    assert consumer.paused == {P0, P1}
    flow.update(buffered_bytes=0, producer_congested=False, circuit_open=True)
    assert consumer.paused == {P0, P1}  # still held by the failing scorer
    flow.update(buffered_bytes=0, producer_congested=False, circuit_open=False)
    assert consumer.paused == set() and not intake.paused


def test_a_full_window_pauses_its_partition_until_half_of_it_is_done() -> None:
    flow, intake, consumer, tracker, _, observer = _flow(max_uncommitted_records=4)
    state = tracker.get(P0)
    assert state is not None
    for offset in range(4):
        state.receive(offset)
    flow.check_windows()
    assert consumer.paused == {P0} and intake.holds(P0) == {WINDOW_FULL}
    assert observer.windows[-1][1] == 4
    state.mark_done(0)
    flow.check_windows()
    assert consumer.paused == {P0}  # 3 left: above the resume mark of 2
    state.mark_done(1)
    flow.check_windows()
    assert consumer.paused == set()


def test_a_record_not_done_for_too_long_pauses_its_partition_and_is_reported() -> None:
    flow, _, consumer, tracker, clock, observer = _flow(max_uncommitted_age_s=60)
    state = tracker.get(P1)
    assert state is not None
    state.receive(7)
    clock.now += 61
    flow.check_windows()
    assert consumer.paused == {P1}
    assert observer.windows[-1] == (61.0, 1)
    state.mark_done(7)
    flow.check_windows()
    assert consumer.paused == set()
    assert observer.windows[-1] == (0.0, 0)


def test_a_partition_paused_for_its_window_is_fetched_again_when_reassigned() -> None:
    flow, intake, consumer, tracker, _, _ = _flow(max_uncommitted_records=1)
    state = tracker.get(P0)
    assert state is not None
    state.receive(0)
    flow.check_windows()
    assert consumer.paused == {P0}
    intake.on_revoked([P0])
    consumer.assigned = [P1]
    consumer.assigned.append(P0)
    intake.on_assigned([P0])
    assert consumer.paused == set() and not intake.holds(P0)


def test_the_input_pauses_when_the_buffer_is_full_and_resumes_at_half() -> None:
    flow, intake, consumer, *_ = _flow()
    flow.update(buffered_bytes=999, producer_congested=False, circuit_open=False)
    assert not intake.paused
    flow.update(buffered_bytes=1000, producer_congested=False, circuit_open=False)
    assert consumer.paused == {P0, P1}
    flow.update(buffered_bytes=501, producer_congested=False, circuit_open=False)
    assert consumer.paused == {P0, P1}  # between the marks: no flapping
    flow.update(buffered_bytes=500, producer_congested=False, circuit_open=False)
    assert consumer.paused == set()
