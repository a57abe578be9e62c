"""Hooks at the worker's notable moments, for metrics and health (and anything else that watches).

The pipeline calls one method of an :class:`Observer` at each moment below; the base
class does nothing, so a metrics implementation overrides only what it measures. Hooks
run on the thread named in their docstring and must return quickly and never raise.

Accounting: every record a poll returns is reported once by :meth:`Observer.records_consumed`
and then ends in exactly one of :meth:`Observer.deliveries_acked`, among its ``outputs``
(scored), :meth:`Observer.record_dead_lettered` (its dead-letter record was acknowledged),
or :meth:`Observer.record_discarded` (this worker gave up on it; :class:`DiscardReason`
says why). See :mod:`worker.observability.metrics` for the resulting identity.

Logging is not done here: each stage logs for itself through structlog.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Sequence
from contextlib import AbstractContextManager

from worker.kafka.records import InputRecord, PartitionKey


class DiscardReason(enum.StrEnum):
    """Why a consumed record left neither an output nor a dead-letter record here."""

    # Polled for a partition this worker does not (or no longer) hold.
    NOT_ASSIGNED = "not_assigned"
    # An offset at or below one already received in this assignment (a refetch).
    SEEN = "seen"
    # Fetched under a previous assignment of its partition; the current one fetches it again.
    STALE = "stale"
    # Its partition was revoked before its result was written; the next owner redoes it.
    REVOKED = "revoked"
    # Its partition was lost (the group moved on); the next owner redoes it.
    LOST = "lost"
    # The worker stopped before processing it; it stays uncommitted for the next owner.
    SHUTDOWN = "shutdown"
    # Exactly-once: its transaction was aborted; the input is read and processed again.
    ABORTED = "aborted"


class Observer:
    """No-op hooks; subclass and override what you need."""

    def records_consumed(self, records: Sequence[InputRecord]) -> None:
        """Main thread: the records one poll returned (before decoding or any discard)."""

    def record_discarded(self, key: PartitionKey, reason: str) -> None:
        """Main or inference thread: a consumed record was dropped without an output or a
        dead-letter record (``reason``: a :class:`DiscardReason`)."""

    def batch_closed(self, size: int, tokens: int, reason: str, age_s: float) -> None:
        """Main thread: a micro-batch closed (``reason``: size, tokens or time)."""

    def batch_submitted(self, size: int, in_flight: int) -> None:
        """Main thread: a batch went to the inference thread; ``in_flight`` counts it."""

    def batch_scored(self, size: int, failed: int, duration_s: float) -> None:
        """Inference thread: the scorer returned; ``failed`` events got a ScoreError."""

    def record_dead_lettered(self, stage: str, error_class: str) -> None:
        """Main thread: the broker acknowledged a dead-letter record."""

    def deliveries_acked(self, records: int, outputs: int, latencies_s: Sequence[float]) -> None:
        """Main thread: the broker acknowledged ``records`` records, ``outputs`` of them
        scored events and the rest dead-letter records (also those of a partition revoked
        meanwhile: they are written all the same); ``latencies_s``: for each of them that
        has one, the seconds since its input record's timestamp. Called once per batch of
        acknowledgements, not per record."""

    def produce_retried(self, error_name: str, attempt: int, delay_s: float) -> None:
        """Main thread: a transient produce error, retried after ``delay_s``."""

    def commit_done(self, partitions: int) -> None:
        """Main thread: the broker stored new committed offsets for ``partitions``."""

    def commit_failed(self, error_name: str) -> None:
        """Main thread: a commit failed (it is retried at the next interval)."""

    def transaction_committed(self, records: int, duration_s: float, commit_s: float) -> None:
        """Main thread, exactly-once: a transaction of ``records`` records committed,
        ``duration_s`` after it began; its drain and commit took ``commit_s``."""

    def transaction_aborted(self, reason: str, records: int) -> None:
        """Main thread, exactly-once: a transaction was aborted (``reason``: an
        :class:`~worker.pipeline.transactions.AbortReason`); ``records`` were discarded."""

    def rebalance(self, kind: str, partitions: Sequence[PartitionKey]) -> None:
        """Main thread: partitions ``assigned``, ``revoked`` or ``lost``."""

    def uncommitted_window(self, oldest_pending_s: float, largest_window: int) -> None:
        """Main thread, every few loop turns: the age of the oldest record not done yet and
        the largest uncommitted window (records), over the assigned partitions."""

    def circuit_changed(self, is_open: bool, failure_share: float) -> None:
        """Inference thread: the circuit opened (most events fail: nothing is dead-lettered,
        the input pauses) or closed again."""

    def profiles_loading(self) -> None:
        """Main thread: the control topic is being read at start-up (not ready until
        :meth:`profiles_loaded`)."""

    def profiles_loaded(self, profiles: int) -> None:
        """Main thread: the control topic was read to its end offsets at start-up."""

    def profile_changed(self, kind: str, profiles: int) -> None:
        """Main thread: a control record ``set`` or ``deleted`` a profile; ``profiles``
        are in force now."""

    def profile_rejected(self, reason: str) -> None:
        """Main thread: a control record was rejected and not applied (``reason``: see
        ``worker.contract.profiles.REJECT_REASONS``)."""

    def paused(self, partitions: int) -> None:
        """Main thread: fetching is paused; ``partitions`` are paused now."""

    def resumed(self, partitions: int) -> None:
        """Main thread: there is room again; fetching resumed."""

    def loop_iteration(self) -> None:
        """Main thread: the poll loop made progress (once per turn, records or not, and
        on every wait while draining): the liveness heartbeat of the main thread."""

    def waiting_for_batch(self) -> AbstractContextManager[None]:
        """Inference thread: wraps its blocking wait for the next batch, so that an idle
        inference thread is told apart from a stuck one."""
        return contextlib.nullcontext()

    def stopping(self) -> None:
        """Main thread: the worker began to stop (a signal or a fatal error)."""
