"""Micro-batching (worker/batcher.py): size, time and token closing, drops, the handoff."""

from __future__ import annotations

import threading

import pytest

from worker.contract.events import InputEvent
from worker.contract.scorer import ScoreRequest
from worker.kafka.records import InputRecord
from worker.pipeline.batching import Batch, Batcher, CloseReason, Handoff, PendingEvent
from worker.pipeline.offsets import PartitionOffsets, Tracked

TOPIC = "news"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _item(offset: int, tokens: int = 10, partition: int = 0) -> PendingEvent:
    record = InputRecord(
        topic=TOPIC,
        partition=partition,
        offset=offset,
        key=None,
        value=b"{}",
        headers=(),
        timestamp_ms=None,
    )
    text = f"event {offset}"
    return PendingEvent(
        origin=Tracked(record, PartitionOffsets((TOPIC, partition))),
        event=InputEvent(text=text),
        request=ScoreRequest(text, ("a", "b"), True, "This is {}."),
        tokens=tokens,
    )


def _offsets(batch: Batch) -> list[int]:
    return [item.origin.record.offset for item in batch.items]


def test_a_new_profile_revision_closes_the_open_batch() -> None:
    """One batch is resolved against one profile table: it never mixes versions."""
    batcher = Batcher(max_size=10, max_wait_s=1.0, max_tokens=10_000, clock=Clock())
    for offset, revision in enumerate([0, 0, 1, 1, 1, 3]):
        batcher.add(_item(offset), revision)
    assert [_offsets(batch) for batch in batcher.ready] == [[0, 1], [2, 3, 4]]
    assert [batch.key for batch in batcher.ready] == [0, 1]
    assert all(batch.reason is CloseReason.PROFILES for batch in batcher.ready)
    batcher.flush()
    assert _offsets(batcher.ready[-1]) == [5]
    assert batcher.ready[-1].key == 3


def test_a_batch_closes_at_max_batch_size() -> None:
    closed: list[Batch] = []
    batcher = Batcher(
        max_size=3, max_wait_s=1.0, max_tokens=10_000, clock=Clock(), on_close=closed.append
    )
    for offset in range(7):
        batcher.add(_item(offset))
    assert [_offsets(batch) for batch in batcher.ready] == [[0, 1, 2], [3, 4, 5]]
    assert closed == list(batcher.ready)
    assert all(batch.reason is CloseReason.SIZE for batch in batcher.ready)
    assert batcher.open_size == 1


def test_a_batch_closes_max_wait_after_its_first_event() -> None:
    clock = Clock()
    batcher = Batcher(max_size=100, max_wait_s=0.05, max_tokens=10_000, clock=clock)
    assert batcher.time_left() is None
    batcher.add(_item(0))
    clock.now += 0.03
    batcher.add(_item(1))
    assert batcher.time_left() == pytest.approx(0.02)
    batcher.close_if_due()
    assert not batcher.ready

    clock.now += 0.02  # 50 ms after the first event, 20 ms after the second
    batcher.close_if_due()

    assert [_offsets(batch) for batch in batcher.ready] == [[0, 1]]
    assert batcher.ready[0].reason is CloseReason.TIME
    assert batcher.time_left() is None


def test_the_next_batch_gets_its_own_deadline() -> None:
    clock = Clock()
    batcher = Batcher(max_size=2, max_wait_s=0.05, max_tokens=10_000, clock=clock)
    batcher.add(_item(0))
    clock.now += 0.04
    batcher.add(_item(1))  # closes on size
    batcher.add(_item(2))  # opens the next batch now
    clock.now += 0.04
    batcher.close_if_due()
    assert len(batcher.ready) == 1
    assert batcher.open_size == 1


def test_an_event_that_would_exceed_the_token_budget_starts_the_next_batch() -> None:
    batcher = Batcher(max_size=100, max_wait_s=1.0, max_tokens=100, clock=Clock())
    for offset, tokens in enumerate([40, 40, 30, 50, 50]):
        batcher.add(_item(offset, tokens))
    assert [_offsets(batch) for batch in batcher.ready] == [[0, 1], [2, 3]]
    assert [batch.tokens for batch in batcher.ready] == [80, 80]
    assert all(batch.reason is CloseReason.TOKENS for batch in batcher.ready)
    assert batcher.open_size == 1


def test_a_batch_that_reaches_the_budget_exactly_closes_at_once() -> None:
    batcher = Batcher(max_size=100, max_wait_s=1.0, max_tokens=100, clock=Clock())
    batcher.add(_item(0, 60))
    batcher.add(_item(1, 40))
    assert [_offsets(batch) for batch in batcher.ready] == [[0, 1]]
    assert batcher.open_size == 0


def test_an_event_over_the_budget_on_its_own_is_a_batch_of_one() -> None:
    batcher = Batcher(max_size=100, max_wait_s=1.0, max_tokens=100, clock=Clock())
    batcher.add(_item(0, 10))
    batcher.add(_item(1, 500))
    batcher.add(_item(2, 10))
    assert [_offsets(batch) for batch in batcher.ready] == [[0], [1]]
    assert batcher.open_size == 1


def test_dropping_partitions_removes_their_events_from_open_and_ready_batches() -> None:
    batcher = Batcher(max_size=4, max_wait_s=1.0, max_tokens=10_000, clock=Clock())
    for offset in range(6):
        batcher.add(_item(offset, partition=offset % 2))
    dropped = batcher.drop({(TOPIC, 1)})
    assert sorted(item.origin.record.offset for item in dropped) == [1, 3, 5]
    assert [_offsets(batch) for batch in batcher.ready] == [[0, 2]]
    assert batcher.ready[0].tokens == 20
    assert batcher.open_size == 1
    assert batcher.drop({(TOPIC, 0)}) and not batcher.ready and batcher.open_size == 0


def test_the_handoff_admits_at_most_limit_batches_in_flight() -> None:
    handoff = Handoff(limit=2)
    batches = [Batch(opened_at=0.0, items=[_item(i)]) for i in range(3)]
    assert handoff.try_submit(batches[0])
    assert handoff.try_submit(batches[1])
    assert not handoff.try_submit(batches[2])
    assert handoff.in_flight == 2

    assert handoff.take() is batches[0]
    assert not handoff.try_submit(batches[2])  # taken but not finished: still in flight
    handoff.finished()
    assert handoff.try_submit(batches[2])
    assert handoff.in_flight == 2


def test_the_handoff_drains_then_stops_the_consumer_thread() -> None:
    handoff = Handoff(limit=2)
    taken: list[Batch] = []

    def consume() -> None:
        while (batch := handoff.take()) is not None:
            taken.append(batch)
            handoff.finished()

    thread = threading.Thread(target=consume)
    thread.start()
    batch = Batch(opened_at=0.0, items=[_item(0)])
    assert handoff.try_submit(batch)
    handoff.close()  # the thread takes the queued batch, then sees the close
    thread.join(5.0)
    assert handoff.in_flight == 0
    assert not thread.is_alive()
    assert taken == [batch]
    assert not handoff.try_submit(batch)


def test_closing_with_discard_forgets_queued_batches() -> None:
    handoff = Handoff(limit=3)
    for offset in range(2):
        assert handoff.try_submit(Batch(opened_at=0.0, items=[_item(offset)]))
    handoff.close(discard_queued=True)
    assert handoff.in_flight == 0
    assert handoff.take() is None
