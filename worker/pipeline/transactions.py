"""Exactly-once: the transaction, the one sequence by which results and offsets become visible.

**Invariant.** A transaction never holds a record whose input offset is not covered by the
input offsets committed in that same transaction. So each input's output or dead letter
becomes visible together with the offset that says it is done, or not at all: a crash, an
abort or a fenced zombie leaves nothing visible that a replay writes again.

This pipeline writes out of input order (dead letters of invalid input at admit time while
earlier offsets are still in the model; the outputs of one batch before those of another),
so a transaction cannot commit "whatever is done" the way at-least-once commits do. Each
commit is a **checkpoint that drains**, in this order:

1. **stop intake**: the checkpoint runs synchronously on the main thread, so no record is
   polled or admitted until it returns (librdkafka keeps prefetching meanwhile, and a
   pause would throw that away);
2. **drain**: the open batch closes, every batch goes to the model, and the stage is served
   until nothing is waiting, in flight or unacknowledged: every received offset is done;
3. **send offsets**: every partition's position (its last received offset + 1) goes into
   the transaction with the consumer's group metadata
   (``send_offsets_to_transaction``), so the broker refuses them from a member of an older
   generation, a zombie (KIP-447);
4. **commit** the transaction (``commit_transaction``);
5. **begin** the next one; intake resumes with the next loop turn.

Every wait is bounded by the transaction's deadline: its begin plus
:data:`DEADLINE_SHARE` of ``transaction_timeout_ms``, before the coordinator would abort it.
A checkpoint is due every ``commit_interval_ms``, or earlier once the transaction holds
``max_uncommitted_records`` records, and on every revoke and shutdown.

**Abort.** A failed delivery, a fenced producer, a drain or commit past the deadline, a
refused offset commit (a zombie), a lost partition, or a revoke that cannot commit in
``revoke_timeout_ms`` aborts the transaction, in this order:

1. **seal**: the producer takes no more records (late ones of the inference thread are
   dropped as abandoned);
2. **rewind the state**: every partition with work past its last committed position gets
   a fresh offset state from that position on (the old one goes inactive, so results still
   in flight for it are dropped), and waiting batches are dropped;
3. **abort** the transaction (a fenced producer, one that cannot abort in time, or one
   whose transactional call hung inside the client (``stuck``, see
   :mod:`worker.kafka.producer`) is replaced instead: ``init_transactions`` with the same
   ``transactional.id`` aborts it);
4. **seek** those partitions to their positions (a new fetch generation: records polled
   before the seek are discarded as stale);
5. **begin** the next transaction and unseal.

Records of the aborted transaction count as discarded (``aborted``); they are read, scored
and written again. Nothing is lost (offsets only move with a commit) and nothing is visible
twice (the aborted records never are). A seek that fails stops the worker (exit 3): a
restart resumes from the committed offsets, which keeps the guarantee.
"""

from __future__ import annotations

import enum
import os
import socket
import time
import uuid
from collections.abc import Callable, Collection
from typing import Final, Protocol

import structlog

from worker.config.settings import DeliverySettings, KafkaSettings
from worker.errors import KafkaFatalError, TransactionStuckError
from worker.kafka.errors import TxnAction, TxnError
from worker.kafka.records import PartitionKey, describe_partitions
from worker.pipeline.delivery import ProducerStage
from worker.pipeline.intake import Intake
from worker.pipeline.observer import DiscardReason, Observer
from worker.pipeline.offsets import OffsetTracker

log = structlog.get_logger(__name__)

# A transaction's own waits end at this share of transaction_timeout_ms after it began:
# the rest is room for the abort before the coordinator aborts it (and fences the producer).
DEADLINE_SHARE: Final = 0.8
# How long one drain wait serves the producer before it checks the deadline again.
DRAIN_POLL_S: Final = 0.01
# Producers abandoned inside a hung call before the worker stops (exit 3) instead: each
# keeps its client threads and buffers, and a restart starts from clean clients.
MAX_STUCK_PRODUCERS: Final = 3
# Pause between tries of a transactional call the coordinator refused for the moment.
TXN_RETRY_S: Final = 0.1


class AbortReason(enum.StrEnum):
    """Why a transaction was aborted (the ``reason`` label of the abort counter)."""

    # A record of the transaction failed to be written.
    PRODUCE_ERROR = "produce_error"
    # The producer was fenced (a newer one with the same id, or a transaction timeout).
    FENCED = "fenced"
    # The drain or the commit did not finish before the transaction's deadline.
    TIMEOUT = "timeout"
    # The broker refused the offsets or the commit (a zombie of an older generation).
    COMMIT_REFUSED = "commit_refused"
    # A revoke could not commit within revoke_timeout_ms.
    REBALANCE = "rebalance"
    # Partitions were lost: the group moved on, their work is someone else's.
    LOST = "lost"
    # A transactional call hung inside the client past its own timeout.
    STUCK = "stuck"


class Stages(Protocol):
    """What a checkpoint needs of the rest of the worker
    (:class:`~worker.pipeline.worker.Worker`)."""

    def push_work(self) -> None:
        """Close the open batch and hand batches to the model while it has room."""

    def work_done(self) -> bool:
        """Nothing waits for the model, is being scored or waits for an acknowledgement."""

    def drop_unstarted(self, reason: DiscardReason) -> int:
        """Drop the batches not handed over yet; returns how many events they held."""

    def check_health(self) -> None:
        """Raise :class:`KafkaFatalError` if a stage failed fatally."""

    def rewound(self, keys: Collection[PartitionKey]) -> None:
        """These partitions were rewound: late results of them are discarded as aborted."""


def transactional_id(kafka: KafkaSettings) -> str:
    """``TAGSTREAM_TRANSACTIONAL_ID``; else ``<group_id>-<group_instance_id>`` (stable per
    replica); else ``<group_id>-<host>-<pid>-<random>``, unique per process."""
    if kafka.transactional_id is not None:
        return kafka.transactional_id
    if kafka.group_instance_id is not None:
        return f"{kafka.group_id}-{kafka.group_instance_id}"
    return f"{kafka.group_id}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Transactions:
    """Begins, commits (by the checkpoint above) and aborts the worker's transactions
    (main thread only)."""

    def __init__(
        self,
        tracker: OffsetTracker,
        intake: Intake,
        producer: ProducerStage,
        observer: Observer,
        *,
        stages: Stages,
        delivery: DeliverySettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tracker = tracker
        self._intake = intake
        self._producer = producer
        self._observer = observer
        self._stages = stages
        self._interval_s = delivery.commit_interval_ms / 1000
        self._timeout_s = delivery.transaction_timeout_ms / 1000
        self._max_records = delivery.max_uncommitted_records
        # A producer that cannot start again (the broker away) is retried this long, as a
        # record is in at-least-once mode, before the worker stops.
        self._restart_deadline_s = delivery.retry_deadline_s
        self._clock = clock
        self._stuck_producers = 0
        self._began_at = clock()
        self._next_commit = self._began_at + self._interval_s

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Register the transactional.id (aborting what a predecessor left open) and begin
        the first transaction. Raises :class:`KafkaFatalError` if the broker refuses."""
        self._init(self._clock() + self._timeout_s)
        self._begin()

    def time_left(self) -> float:
        """Seconds until the next checkpoint is due."""
        return max(0.0, self._next_commit - self._clock())

    def step(self) -> None:
        """One loop turn: abort what must be aborted, else commit when due."""
        if self._producer.fenced:
            self.abort(AbortReason.FENCED)
        elif self._producer.abort_reason is not None:
            self.abort(AbortReason.PRODUCE_ERROR, detail=self._producer.abort_reason)
        elif self._due():
            self.checkpoint(self.deadline())

    def deadline(self) -> float:
        """When the open transaction's own waits must end."""
        return self._began_at + self._timeout_s * DEADLINE_SHARE

    # -- the checkpoint -----------------------------------------------------------------

    def checkpoint(
        self,
        deadline: float,
        on_timeout: AbortReason = AbortReason.TIMEOUT,
        *,
        leaving: Collection[PartitionKey] = (),
    ) -> bool:
        """Steps 1-5 of the module docstring; True if the transaction committed (or held
        nothing), False if it was aborted instead (``on_timeout``: the reason when time ran
        out; ``leaving``: partitions being revoked, not sought after an abort)."""
        started = self._clock()
        deadline = min(deadline, self.deadline())
        drained = self._drain(deadline)
        if drained is not None:
            reason = drained if drained is not AbortReason.TIMEOUT else on_timeout
            self.abort(reason, leaving=leaving)
            return False
        positions = self._tracker.commits_due(unconfirmed=True)
        records = self._producer.transaction_size
        if not positions and records == 0:
            self._next_commit = self._clock() + self._interval_s
            return True
        failure = self._commit(positions, deadline)
        if failure is not None:
            reason, error = failure
            self.abort(
                on_timeout if reason is AbortReason.TIMEOUT else reason,
                detail=None if error is None else error.name,
                leaving=leaving,
            )
            return False
        self._tracker.mark_committed(positions)
        committed = self._producer.transaction_committed()
        now = self._clock()
        self._observer.transaction_committed(committed, now - self._began_at, now - started)
        if positions:
            self._observer.commit_done(len(positions))
        log.debug(
            "transaction committed",
            records=committed,
            offsets=_describe(positions),
            commit_ms=round((now - started) * 1000, 1),
        )
        self._begin()
        return True

    def _due(self) -> bool:
        return (
            self._clock() >= self._next_commit
            or self._producer.transaction_size >= self._max_records
        )

    def _drain(self, deadline: float) -> AbortReason | None:
        """Step 2: until every received offset is done; the reason to abort instead."""
        while True:
            self._stages.push_work()
            self._producer.serve(0)
            self._stages.check_health()
            if self._producer.fenced:
                return AbortReason.FENCED
            if self._producer.abort_reason is not None:
                return AbortReason.PRODUCE_ERROR
            if self._stages.work_done():
                return None
            remaining = deadline - self._clock()
            if remaining <= 0:
                return AbortReason.TIMEOUT
            self._observer.loop_iteration()
            self._producer.serve(min(DRAIN_POLL_S, remaining))

    def _commit(
        self, positions: dict[PartitionKey, int], deadline: float
    ) -> tuple[AbortReason, TxnError | None] | None:
        """Steps 3 and 4, each retried while the coordinator asks for it; the reason (and
        error) to abort instead."""
        if positions:
            metadata = self._intake.consumer.group_metadata()
            failure = self._retried(
                lambda left: self._producer.send_offsets(positions, metadata, left), deadline
            )
            if failure is not None:
                return failure
        return self._retried(self._producer.commit_transaction, deadline)

    def _retried(
        self, call: Callable[[float], TxnError | None], deadline: float
    ) -> tuple[AbortReason, TxnError | None] | None:
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return AbortReason.TIMEOUT, None
            error = call(remaining)
            if error is None:
                return None
            if error.action is TxnAction.FATAL:
                raise KafkaFatalError(f"transaction failed: {error.message}")
            if error.action is TxnAction.FENCED:
                return AbortReason.FENCED, error
            if error.action is TxnAction.STUCK:
                return AbortReason.STUCK, error
            if error.action is TxnAction.ABORT:
                return AbortReason.COMMIT_REFUSED, error
            log.info("transactional call refused, retrying", error=error.name)
            time.sleep(min(TXN_RETRY_S, max(0.0, deadline - self._clock())))

    # -- the abort ----------------------------------------------------------------------

    def abort(
        self,
        reason: AbortReason,
        *,
        detail: str | None = None,
        leaving: Collection[PartitionKey] = (),
    ) -> None:
        """Steps 1-5 of the abort (module docstring): seal, rewind the state, abort (or
        replace the producer), seek (all but the ``leaving`` partitions), begin."""
        self._producer.seal()
        positions = self._rewind_state()
        dropped = self._stages.drop_unstarted(DiscardReason.ABORTED)
        self._abort_or_replace(reason)
        discarded = self._producer.transaction_aborted() + dropped
        self._seek({key: pos for key, pos in positions.items() if key not in leaving})
        self._begin()
        self._observer.transaction_aborted(str(reason), discarded)
        log.warning(
            "transaction aborted, partitions rewound to their committed offsets",
            reason=str(reason),
            detail=detail,
            discarded=discarded,
            rewound=_describe(positions),
        )

    def _rewind_state(self) -> dict[PartitionKey, int]:
        positions: dict[PartitionKey, int] = {}
        for state in self._tracker.states():
            target = state.rewind_target()
            if target is not None:
                positions[state.key] = target
        generation = self._intake.consumer.generation
        for key, position in positions.items():
            # The seek below starts the next generation: the fresh state expects it.
            self._tracker.rewind(key, position, generation(key) + 1)
        self._stages.rewound(list(positions))
        return positions

    def _abort_or_replace(self, reason: AbortReason) -> None:
        deadline = self._clock() + self._timeout_s
        replace = reason in (AbortReason.FENCED, AbortReason.STUCK)
        if not replace and not self._producer.fenced:
            failure = self._retried(self._producer.abort_transaction, deadline)
            if failure is None:
                return
            log.warning("abort failed, replacing the producer", reason=str(failure[0]))
        self._replace()

    def _replace(self) -> None:
        """A new producer with the same ``transactional.id``; its ``init_transactions``
        fences the old one and aborts what it left open."""
        if self._producer.stuck:
            self._stuck_producers += 1
            if self._stuck_producers > MAX_STUCK_PRODUCERS:
                raise TransactionStuckError(
                    f"{self._stuck_producers} transactional producers hung inside the client "
                    f"(more than {MAX_STUCK_PRODUCERS}); stopping, the restart resumes from the "
                    "committed offsets"
                )
            log.warning(
                "transactional call hung past its timeout, abandoning the producer",
                abandoned=self._stuck_producers,
            )
        self._producer.replace_producer()
        self._init(self._clock() + self._restart_deadline_s)

    def _seek(self, positions: dict[PartitionKey, int]) -> None:
        if not positions:
            return
        error = self._intake.consumer.seek(positions)
        if error is not None:
            raise KafkaFatalError(
                f"cannot rewind {describe_partitions(list(positions))} after an abort: "
                f"{error.message}; stopping, the restart resumes from the committed offsets"
            )

    # -- internals ----------------------------------------------------------------------

    def _init(self, deadline: float) -> None:
        failure = self._retried(self._producer.init_transactions, deadline)
        if failure is not None:
            raise TransactionStuckError(
                f"the transactional producer cannot start ({failure[0]}"
                f"{'' if failure[1] is None else ': ' + failure[1].message}) in time "
                f"(TAGSTREAM_TRANSACTION_TIMEOUT_MS={int(self._timeout_s * 1000)} at start-up, "
                f"TAGSTREAM_RETRY_DEADLINE_S={self._restart_deadline_s:g} after an abort)"
            )

    def _begin(self) -> None:
        error = self._producer.begin_transaction()
        if error is not None:
            raise TransactionStuckError(f"cannot begin a transaction: {error.message}")
        self._began_at = self._clock()
        self._next_commit = self._began_at + self._interval_s


def _describe(positions: dict[PartitionKey, int]) -> dict[str, int]:
    return {f"{topic}[{partition}]": offset for (topic, partition), offset in positions.items()}
