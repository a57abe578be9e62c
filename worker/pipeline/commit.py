"""The commit: the one sequence by which input offsets become committed.

Wherever it happens (every ``commit_interval_ms``, on revoke, on shutdown, on a fatal
stop), a commit is these steps, in this order:

1. **flush outputs**: records handed to the producer are sent to the broker;
2. **confirm delivery**: the broker's acknowledgements (delivery callbacks) mark their
   input offsets done (:mod:`worker.pipeline.offsets`);
3. **commit offsets**: per partition, the first offset not done (else the last received
   + 1) is committed.

The periodic commit (:meth:`Committer.commit_if_due`) takes steps 1 and 2 as they come:
the producer sends continuously and the main loop serves delivery callbacks on every turn,
so only step 3 is left, asynchronously. A position sent is not a position committed: only
the broker's confirmation (:meth:`Committer.on_commit_result`) makes it one. A revoke, a
shutdown or a fatal stop settles the partitions synchronously (:meth:`Committer.settle`):
it waits, bounded in time, for steps 1 and 2, then commits whatever the broker has not
confirmed and waits for the answer, retrying while a rebalance makes the broker refuse.

Nothing is committed that is not acknowledged, so a crash at any point replays at most
the uncommitted tail: duplicates, never loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import structlog

from worker.errors import KafkaFatalError
from worker.kafka.consumer import CommitOutcome
from worker.kafka.errors import ClientError
from worker.kafka.records import PartitionKey
from worker.pipeline.intake import Intake
from worker.pipeline.observer import Observer
from worker.pipeline.offsets import OffsetTracker

log = structlog.get_logger(__name__)

# How often a revoke or a shutdown checks whether in-flight work is acknowledged.
DRAIN_POLL_S: Final = 0.05
# Pause between tries of a refused synchronous commit: a rebalance step or a coordinator
# lookup takes about this long.
COMMIT_RETRY_S: Final = 0.1


class Outputs(Protocol):
    """What the commit needs of the delivery stage
    (:class:`~worker.pipeline.delivery.ProducerStage`)."""

    @property
    def fatal(self) -> KafkaFatalError | None: ...

    def serve(self, timeout_s: float = 0.0) -> None: ...


class Committer:
    """Runs the commit sequence over the tracker's partitions (main thread only)."""

    def __init__(
        self,
        tracker: OffsetTracker,
        intake: Intake,
        outputs: Outputs,
        observer: Observer,
        *,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tracker = tracker
        self._intake = intake
        self._outputs = outputs
        self._observer = observer
        self._interval_s = interval_s
        self._clock = clock
        self._next_commit = clock() + interval_s

    def time_left(self) -> float:
        """Seconds until the next periodic commit is due."""
        return max(0.0, self._next_commit - self._clock())

    def commit_if_due(self) -> None:
        """Step 3 of the periodic commit: every ``commit_interval_ms``, commit the partitions
        whose position moved (asynchronously; :meth:`on_commit_result` hears the answer)."""
        if self._clock() < self._next_commit:
            return
        self._next_commit = self._clock() + self._interval_s
        positions = self._tracker.commits_due()
        if positions:
            self._tracker.mark_sent(positions)
            self._intake.consumer.commit_async(positions)

    def settle(
        self,
        keys: Sequence[PartitionKey],
        deadline: float,
        finished: Callable[[], bool],
        *,
        serve_group: bool,
    ) -> tuple[bool, bool]:
        """The whole sequence, synchronously, for ``keys``: steps 1 and 2 until
        ``finished()`` (or the deadline), then step 3. Returns (drained, committed).

        ``serve_group``: poll the consumer while waiting so a rebalance can complete;
        impossible inside a rebalance callback, where only time can help.
        """
        drained = self.drain(deadline, finished, serve_group=serve_group)
        committed = self.commit(keys, deadline, serve_group=serve_group)
        return drained, committed

    def drain(self, deadline: float, finished: Callable[[], bool], *, serve_group: bool) -> bool:
        """Steps 1 and 2: serve delivery callbacks and retries (and, with ``serve_group``,
        the group protocol) until ``finished()`` or the deadline."""
        while not finished():
            self._observer.loop_iteration()
            remaining = deadline - self._clock()
            if remaining <= 0 or self._outputs.fatal is not None:
                return False
            self._outputs.serve(min(DRAIN_POLL_S, remaining))
            if serve_group:
                self.serve_group(0)
        return True

    def commit(self, keys: Sequence[PartitionKey], deadline: float, *, serve_group: bool) -> bool:
        """Step 3, synchronously: commit the done offsets of ``keys``, retried until
        ``deadline`` (a rebalance or a coordinator move makes the broker refuse for a while)."""
        while True:
            # Whatever the broker has not confirmed, an asynchronous commit on its way included.
            positions = self._tracker.commits_due(keys, unconfirmed=True)
            if not positions:
                return True
            error = self._intake.consumer.commit_sync(positions)
            if error is None:
                self._tracker.mark_committed(positions)
                log.info("offsets committed", offsets=_describe_positions(positions))
                return True
            hopeless = not serve_group and error.needs_group_progress
            if hopeless or error.fatal or self._clock() >= deadline:
                log.warning("commit failed", error=error.name, offsets=len(positions))
                return False
            log.info("commit refused, retrying", error=error.name)
            if serve_group:
                self.serve_group(COMMIT_RETRY_S)
            else:
                time.sleep(COMMIT_RETRY_S)

    def serve_group(self, timeout_s: float) -> None:
        """Poll the consumer for its callbacks while stopping; records are not kept."""
        try:
            self._intake.discard(timeout_s)
        except KafkaFatalError as exc:
            log.warning("consumer failed while stopping", error=str(exc))

    def on_commit_result(self, error: ClientError | None, results: CommitOutcome) -> None:
        """The broker's answer to a commit. Confirmed positions become the committed ones;
        a failed partition is sent again at the next interval."""
        failed = [key for key, _, part_error in results if part_error is not None]
        if error is not None or failed:
            name = error.name if error is not None else "partition error"
            # Expected while a rebalance is under way; anything else deserves attention.
            during_rebalance = error is not None and error.during_rebalance
            report = log.info if during_rebalance else log.warning
            report("commit failed, retried at the next interval", error=name)
            self._observer.commit_failed(name)
        for key, offset, part_error in results:
            state = self._tracker.get(key)
            if state is None:
                continue
            if error is None and part_error is None:
                state.confirm(offset)
            else:
                state.sent = None
        if error is None and results and not failed:
            self._observer.commit_done(len(results))


def _describe_positions(positions: dict[PartitionKey, int]) -> dict[str, int]:
    return {f"{topic}[{partition}]": offset for (topic, partition), offset in positions.items()}
