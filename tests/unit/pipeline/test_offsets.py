"""The offset tracker (worker/offsets.py): what may be committed, per partition."""

from __future__ import annotations

from worker.kafka.records import InputRecord
from worker.pipeline.offsets import OffsetTracker, PartitionOffsets, Tracked

KEY = ("news", 0)


def _received(*offsets: int) -> PartitionOffsets:
    state = PartitionOffsets(KEY)
    for offset in offsets:
        assert state.receive(offset)
    return state


def test_nothing_received_means_nothing_to_commit() -> None:
    state = PartitionOffsets(KEY)
    assert state.position() is None
    assert state.commit_due() is None


def test_the_position_waits_for_the_first_offset_not_done() -> None:
    state = _received(0, 1, 2, 3)
    assert state.position() == 0
    state.mark_done(0)
    state.mark_done(1)
    assert state.position() == 2
    assert state.pending == 2


def test_out_of_order_acknowledgements_advance_the_position_only_when_contiguous() -> None:
    state = _received(10, 11, 12, 13, 14)
    for offset in (14, 12, 13):
        state.mark_done(offset)
        assert state.position() == 10
    state.mark_done(11)
    assert state.position() == 10
    state.mark_done(10)
    assert state.position() == 15  # everything done: last received + 1
    assert state.pending == 0


def test_offset_gaps_are_skipped() -> None:
    # Compaction or transaction markers: offsets 3..6 and 9 never arrive.
    state = _received(0, 1, 2, 7, 8, 10)
    for offset in (10, 8, 1, 0, 2):
        state.mark_done(offset)
    assert state.position() == 7
    state.mark_done(7)
    assert state.position() == 11


def test_acknowledging_twice_or_an_unknown_offset_changes_nothing() -> None:
    state = _received(0, 1, 2)
    state.mark_done(1)
    state.mark_done(1)
    state.mark_done(5)
    state.mark_done(-1)
    assert state.pending == 2
    assert state.position() == 0


def test_an_offset_not_after_the_last_received_is_refused() -> None:
    state = _received(5, 6)
    assert not state.receive(6)
    assert not state.receive(3)
    assert state.receive(9)


def test_truncating_forgets_the_tail_that_will_not_be_processed() -> None:
    # A revoke: 3..5 sat in a batch that never reached the model.
    state = _received(0, 1, 2, 3, 4, 5)
    state.mark_done(4)  # e.g. a dead-lettered record, acknowledged early
    state.truncate_from(3)
    assert state.pending == 3
    for offset in (0, 1, 2):
        state.mark_done(offset)
    assert state.position() == 3  # not 6: offsets 3..5 are the next owner's
    state.mark_done(5)  # a late acknowledgement of a truncated offset is ignored
    assert state.position() == 3


def test_commit_due_only_when_the_position_moved() -> None:
    state = _received(0, 1)
    assert state.commit_due() == 0  # where the fetch started: committed even before any ack
    state.committed = 0
    assert state.commit_due() is None
    state.mark_done(0)
    assert state.commit_due() == 1
    state.committed = 1
    assert state.commit_due() is None
    state.mark_done(1)
    assert state.commit_due() == 2


def test_the_tracker_commits_only_moved_partitions() -> None:
    tracker = OffsetTracker()
    tracker.assign([("news", 0), ("news", 1), ("sport", 0)])
    for key in tracker.keys:
        state = tracker.get(key)
        assert state is not None
        state.receive(0)
        state.receive(1)
    first = tracker.get(("news", 0))
    second = tracker.get(("news", 1))
    assert first is not None and second is not None
    first.mark_done(0)
    second.mark_done(1)  # out of order: news[1] cannot move past its start yet
    assert tracker.commits_due() == {("news", 0): 1, ("news", 1): 0, ("sport", 0): 0}
    tracker.mark_committed({("news", 1): 0, ("sport", 0): 0})
    assert tracker.commits_due() == {("news", 0): 1}
    assert tracker.pending(tracker.keys) == 4
    tracker.mark_committed({("news", 0): 1})
    assert tracker.commits_due() == {}
    assert tracker.commits_due([("sport", 0)]) == {}


def test_revoking_deactivates_the_partition_and_its_in_flight_work() -> None:
    tracker = OffsetTracker()
    tracker.assign([KEY])
    state = tracker.get(KEY)
    assert state is not None and state.receive(0)
    work = Tracked(record=_record(0), partition=state)
    active_before = work.active

    removed = tracker.remove([KEY])

    assert removed == [state]
    assert active_before
    assert work.active is False
    assert KEY not in tracker
    assert tracker.commits_due() == {}


def test_a_reassigned_partition_starts_from_a_clean_slate() -> None:
    tracker = OffsetTracker()
    tracker.assign([KEY])
    old = tracker.get(KEY)
    assert old is not None and old.receive(0)
    tracker.assign([KEY])
    new = tracker.get(KEY)
    assert new is not None and new is not old
    assert not old.active
    assert new.position() is None
    assert new.receive(0)


def _record(offset: int) -> InputRecord:
    return InputRecord(
        topic=KEY[0],
        partition=KEY[1],
        offset=offset,
        key=None,
        value=b"{}",
        headers=(),
        timestamp_ms=None,
    )
