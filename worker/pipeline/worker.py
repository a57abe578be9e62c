"""The streaming worker: consume, micro-batch, score, produce, commit — at least once, or
exactly once (``TAGSTREAM_PROCESSING_GUARANTEE=exactly-once``).

Threads: the *main* thread polls the input (:mod:`worker.pipeline.intake`), decodes
records, dead-letters invalid ones, fills micro-batches (:mod:`worker.pipeline.batching`),
runs delivery callbacks (:mod:`worker.pipeline.delivery`) and commits
(:mod:`worker.pipeline.commit`); the *inference* thread scores the batches and hands their
records to the producer (:mod:`worker.pipeline.inference`). All offset state
(:mod:`worker.pipeline.offsets`) is touched by the main thread only.

The commit, wherever it happens (every ``commit_interval_ms``, on revoke, on shutdown, on a
fatal stop), is the same numbered sequence of :mod:`worker.pipeline.commit`: flush outputs,
confirm delivery, commit offsets. Nothing is committed that is not acknowledged. In
exactly-once mode :mod:`worker.pipeline.transactions` replaces it: every commit interval
(and on revoke and shutdown) a checkpoint drains the pipeline and commits outputs, dead
letters and input offsets in one Kafka transaction; a failure aborts it and rewinds.

Every consumed record is reported to the :class:`~worker.pipeline.observer.Observer` once,
and its fate once: scored, dead-lettered, or discarded with a
:class:`~worker.pipeline.observer.DiscardReason` (see :mod:`worker.observability.metrics`
for the identity).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

import structlog

from worker.config.loading import RunSettings
from worker.contract.codec import decode_input, to_request
from worker.contract.deadletter import Failure, Stage, WorkerIdentity
from worker.contract.profiles import ProfileLimits
from worker.contract.scorer import Scorer
from worker.errors import EventError, EventTooCostlyError, KafkaFatalError, TagstreamError
from worker.exit_codes import EXIT_FATAL, EXIT_OK
from worker.kafka.config import consumer_config as _consumer_config
from worker.kafka.config import control_consumer_config
from worker.kafka.consumer import CommitOutcome, CommitResult, KafkaConsumer
from worker.kafka.errors import ClientError
from worker.kafka.records import InputRecord, PartitionKey, describe_partitions
from worker.pipeline.batching import Batch, Batcher, Handoff, PendingEvent
from worker.pipeline.commit import Committer
from worker.pipeline.delivery import ProducerFactory, ProducerStage, connect
from worker.pipeline.flow import FlowControl
from worker.pipeline.inference import InferenceStage
from worker.pipeline.intake import ConsumerClient, Intake
from worker.pipeline.observer import DiscardReason, Observer
from worker.pipeline.offsets import OffsetTracker, Tracked
from worker.pipeline.profiles import ControlConsumer, ProfileFeed, ProfileTable
from worker.pipeline.tracing import Tracer, discard_trace
from worker.pipeline.transactions import AbortReason, Transactions, transactional_id

log = structlog.get_logger(__name__)
# The stdlib logger structlog's level filter asks: the per-batch debug line is built only
# when it would be written (dropped, it still costs tens of microseconds).
_level = logging.getLogger(__name__)

# Records per poll: enough to fill several batches per loop, few enough that decoding them
# never delays the loop (and its delivery callbacks and commits) noticeably.
POLL_MAX_RECORDS: Final = 500
# Longest a poll waits for input when nothing else is due: bounds how late delivery
# callbacks, commits and a stop request are noticed on an idle stream.
POLL_IDLE_TIMEOUT_S: Final = 0.1
# Poll timeout while a closed batch waits for room in the inference queue, so it is handed
# over soon after the model finishes one.
POLL_WAITING_TIMEOUT_S: Final = 0.005
# A fatal stop still waits this long for acknowledgements that are already on their way.
FATAL_DRAIN_S: Final = 1.0
# Exactly-once: batches decoded ahead of the model (beyond those the Handoff holds). Every
# transaction commit drains what was read, so reading further ahead only lengthens it; the
# Handoff already keeps the next batch queued for the model.
READ_AHEAD_BATCHES: Final = 1

# The consumer's and the producer's close at shutdown each wait what is left of
# shutdown_timeout_s, but at least this long: a close that works takes milliseconds, and
# the settle before it may have used the whole timeout.
CLIENT_CLOSE_MIN_S: Final = 1.0


def _close_wait_s(deadline: float) -> float:
    return max(CLIENT_CLOSE_MIN_S, deadline - time.monotonic())


# Builds the input consumer from its librdkafka configuration, whether its group protocol
# assigns incrementally, and where asynchronous commit results go.
ConsumerFactory = Callable[[Mapping[str, Any], bool, CommitResult], ConsumerClient]


# Builds the control topic's reader from its librdkafka configuration.
ControlConsumerFactory = Callable[[Mapping[str, Any]], ControlConsumer]


def _ignore_commit_result(_error: ClientError | None, _outcome: CommitOutcome) -> None:
    """The control topic's reader never commits."""


def connect_control_consumer(config: Mapping[str, Any]) -> ControlConsumer:
    """The default :data:`ControlConsumerFactory`: a real librdkafka consumer."""
    return KafkaConsumer(config, incremental=False, on_commit=_ignore_commit_result)


def connect_consumer(
    config: Mapping[str, Any], incremental: bool, on_commit: CommitResult
) -> ConsumerClient:
    """The default :data:`ConsumerFactory`: a real librdkafka consumer."""
    return KafkaConsumer(config, incremental=incremental, on_commit=on_commit)


class Worker:
    """One ``tagstream run`` process: builds the stages and runs the loop until stopped.

    ``client_config`` and ``consumer_config``: extra librdkafka settings for every client
    and for the input consumer (observability: the log bridge, the statistics for the lag).
    ``consumer_factory``, ``producer_factory`` and ``control_consumer_factory`` build the
    Kafka clients (real ones unless a test passes fakes). ``tracer``: traces every accepted
    record (none by default).
    """

    def __init__(
        self,
        settings: RunSettings,
        scorer: Scorer,
        identity: WorkerIdentity,
        observer: Observer | None = None,
        *,
        client_config: Mapping[str, Any] | None = None,
        consumer_config: Mapping[str, Any] | None = None,
        consumer_factory: ConsumerFactory = connect_consumer,
        producer_factory: ProducerFactory = connect,
        control_consumer_factory: ControlConsumerFactory = connect_control_consumer,
        tracer: Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.scorer = scorer
        self.observer = observer or Observer()
        self.tracer = tracer or Tracer()
        self.tracker = OffsetTracker()
        # How each partition was last taken away, for the work of it still in flight.
        self._gone: dict[PartitionKey, DiscardReason] = {}
        self._next_batch_id = 1
        exactly_once = settings.delivery.exactly_once
        self.transactional_id = transactional_id(settings.kafka) if exactly_once else None
        self.producer = ProducerStage(
            settings.kafka,
            identity,
            self.observer,
            client_config=client_config,
            on_abandoned=self._abandoned,
            producer_factory=producer_factory,
            retry_deadline_s=settings.delivery.retry_deadline_s,
            transactional_id=self.transactional_id,
            transaction_timeout_ms=settings.delivery.transaction_timeout_ms,
        )
        batch = settings.batch
        self.batcher = Batcher(
            max_size=batch.max_batch_size,
            max_wait_s=batch.max_wait_ms / 1000,
            max_tokens=scorer.max_batch_tokens,
            on_close=self._batch_closed,
        )
        self.handoff = Handoff(batch.max_in_flight_batches)
        self.inference = InferenceStage(
            scorer,
            self.handoff,
            producer=self.producer,
            tagging=settings.tagging,
            output_topic=settings.kafka.output_topic,
            observer=self.observer,
            on_abandoned=self._abandoned,
            circuit=settings.circuit,
            tracer=self.tracer,
        )
        kafka = settings.kafka
        incremental = (
            kafka.group_protocol == "consumer" or kafka.assignment_strategy == "cooperative-sticky"
        )
        full_config = {**(consumer_config or {}), **_consumer_config(kafka)}
        self._new_consumer: Callable[[], ConsumerClient] = lambda: consumer_factory(
            full_config, incremental, self._on_commit_result
        )
        self.intake = Intake(self._new_consumer(), self.observer)
        self.committer = Committer(
            self.tracker,
            self.intake,
            self.producer,
            self.observer,
            interval_s=settings.delivery.commit_interval_ms / 1000,
        )
        self.flow = FlowControl(
            self.intake,
            self.tracker,
            self.observer,
            settings.delivery,
            max_buffered_bytes=batch.max_buffered_bytes,
        )
        self.transactions = (
            Transactions(
                self.tracker,
                self.intake,
                self.producer,
                self.observer,
                stages=self,
                delivery=settings.delivery,
            )
            if exactly_once
            else None
        )
        self.profiles = ProfileTable(
            settings.profiles.max_profiles, settings.profiles.control_topic
        )
        self.profile_feed = self._profile_feed(client_config or {}, control_consumer_factory)
        self._stop_requested = False
        # Set once the final commit is done: closing the consumer then revokes every
        # partition once more, and that revoke must not wait for in-flight work again.
        self._settled = False

    def _profile_feed(
        self, client_config: Mapping[str, Any], factory: ControlConsumerFactory
    ) -> ProfileFeed | None:
        profiles, tagging = self.settings.profiles, self.settings.tagging
        if profiles.control_topic is None:
            return None
        consumer = factory({**client_config, **control_consumer_config(self.settings.kafka)})
        limits = ProfileLimits(
            max_labels=tagging.max_labels,
            max_label_chars=tagging.max_label_chars,
            max_record_bytes=profiles.max_profile_record_bytes,
        )
        return ProfileFeed(consumer, profiles.control_topic, self.profiles, limits, self.observer)

    # -- lifecycle ----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish in-flight work, commit and leave (the first SIGTERM/SIGINT)."""
        self._stop_requested = True

    def run(self) -> int:
        """Run until :meth:`request_stop` or a fatal error; returns the exit code."""
        self.inference.start()
        try:
            if self.transactions is not None:
                self.transactions.start()
                log.info("exactly-once: transactions on", transactional_id=self.transactional_id)
            if self.profile_feed is not None:
                # Before joining: no event is judged against a half-read profile table.
                self.profile_feed.start(self.settings.profiles.control_load_timeout_s)
            self.intake.subscribe(self.settings.kafka.subscription, self)
            log.info("worker started", subscription=self.settings.kafka.subscription)
            while not self._stop_requested:
                self.step()
        except KafkaFatalError as exc:
            return self.stop_fatally(str(exc))
        except Exception as exc:  # a bug: still commit what is done before dying
            log.exception("unexpected error in the main loop")
            return self.stop_fatally(repr(exc))
        return self.shutdown()

    def step(self) -> None:
        """One turn of the main loop."""
        self.observer.loop_iteration()
        if self.profile_feed is not None:
            self.profile_feed.poll()
        if self.transactions is None:
            records = self.intake.poll(POLL_MAX_RECORDS, self._poll_timeout())
        else:
            records = self._poll_ahead()
        self.accept(records)
        self.recover_group()
        self.batcher.close_if_due()
        self.submit_ready_batches()
        self.producer.serve()
        self.control_flow()
        if self.transactions is None:
            self.committer.commit_if_due()
        else:
            self.transactions.step()
        self.check_health()

    def shutdown(self) -> int:
        """Graceful stop, bounded by ``shutdown_timeout_s``: the commit sequence for every
        partition, then leave the group.

        Batches not yet handed to the inference thread are dropped (their offsets stay
        uncommitted). Meanwhile the consumer keeps serving the group protocol, without
        keeping records, so a rebalance that is under way can finish and the final
        commit is accepted.
        """
        deadline = time.monotonic() + self.settings.shutdown.shutdown_timeout_s
        self.observer.stopping()
        self.flow.stop()
        if self.transactions is not None:
            return self._shutdown_transactional(self.transactions, deadline)
        dropped = self._abandon_unstarted(self.tracker.keys, DiscardReason.SHUTDOWN)
        log.info("stopping", in_flight_batches=self.handoff.in_flight, not_started=dropped)
        self.handoff.close()
        finished, committed = self.committer.settle(
            self.tracker.keys, deadline, self._all_delivered, serve_group=True
        )
        if not (finished and committed):
            log.warning(
                "shutdown timeout: unfinished work left uncommitted",
                in_flight_batches=self.handoff.in_flight,
                unacknowledged=self.producer.outstanding(),
                committed=committed,
            )
        self._settled = True
        self.intake.close(_close_wait_s(deadline))
        self._close_feed()
        self.producer.close(_close_wait_s(deadline))
        log.info("worker stopped")
        return EXIT_OK

    def _shutdown_transactional(self, transactions: Transactions, deadline: float) -> int:
        """Exactly-once: one last checkpoint (it drains every batch, handed over or not),
        then leave the group."""
        log.info("stopping", in_flight_batches=self.handoff.in_flight)
        committed = transactions.checkpoint(deadline)
        self.handoff.close()
        if not committed:
            log.warning("shutdown: the last transaction was aborted, its work is redone")
        self._settled = True
        self.intake.close(_close_wait_s(deadline))
        self._close_feed()
        self.producer.close(_close_wait_s(deadline))
        log.info("worker stopped")
        return EXIT_OK

    def stop_fatally(self, reason: str) -> int:
        """Fatal error: commit only what is done, leave the group, exit non-zero (in
        exactly-once mode: abort the open transaction, commit nothing)."""
        log.error("stopping on a fatal error", error=reason)
        self.observer.stopping()
        self.handoff.close(discard_queued=True)
        if self.transactions is not None:
            self.producer.seal()
            self.producer.abort_transaction(FATAL_DRAIN_S)
            self._settled = True
            self.intake.close()
            self._close_feed()
            return EXIT_FATAL
        deadline = time.monotonic() + FATAL_DRAIN_S
        self.committer.settle(self.tracker.keys, deadline, self._all_delivered, serve_group=False)
        self._settled = True
        self.intake.close()
        self._close_feed()
        return EXIT_FATAL

    # -- the loop's steps ---------------------------------------------------------------

    def accept(self, records: list[InputRecord]) -> None:
        """Count every polled record as consumed, then track each one (or discard it);
        dead-letter invalid ones at once, batch the valid ones."""
        if records:
            self.observer.records_consumed(records)
        for record in records:
            tracked = self._track(record)
            if tracked is not None:
                self._admit(tracked)

    def submit_ready_batches(self) -> None:
        """Hand closed batches to the inference thread while it has room."""
        ready = self.batcher.ready
        while ready:
            batch = ready[0]
            batch.batch_id = self._next_batch_id
            if not self.handoff.try_submit(batch):
                break
            self.batcher.pop_ready()
            self._next_batch_id += 1
            in_flight = self.handoff.in_flight
            self.observer.batch_submitted(len(batch), in_flight)
            if _level.isEnabledFor(logging.DEBUG):
                log.debug(
                    "batch submitted",
                    batch_id=batch.batch_id,
                    size=len(batch),
                    tokens=batch.tokens,
                    reason=str(batch.reason),
                    in_flight=in_flight,
                )

    def recover_group(self) -> None:
        """Replace a consumer that lost its partitions and got no assignment within
        ``rejoin_timeout_s``: librdkafka can keep waiting for good on a group coordinator
        that restarted, while the loop itself stays alive (so no liveness probe helps)."""
        timeout_s = self.settings.kafka.rejoin_timeout_s
        if not self.intake.rejoin_overdue(timeout_s):
            return
        log.warning(
            "no assignment since the partitions were lost, replacing the consumer",
            waited_s=timeout_s,
        )
        if not self.intake.replace_consumer(self._new_consumer()):
            log.warning("the replaced consumer did not close in time; it is abandoned")

    def control_flow(self) -> None:
        """Pause or resume the input for the stages that are behind (never wait for them)."""
        self.flow.update(
            buffered_bytes=self.batcher.buffered_bytes,
            producer_congested=self.producer.congested,
            circuit_open=self.inference.circuit_open,
        )

    def check_health(self) -> None:
        """Raise :class:`KafkaFatalError` if any stage hit a fatal error."""
        if self.producer.fatal is not None:
            raise self.producer.fatal
        crashed = self.inference.crashed
        if isinstance(crashed, TagstreamError):
            raise KafkaFatalError(f"inference stopped: {crashed}")
        if crashed is not None:
            raise KafkaFatalError(f"inference thread crashed: {crashed!r}")

    # -- rebalance callbacks (RebalanceListener, main thread inside poll) ---------------

    def on_assigned(self, keys: list[PartitionKey]) -> None:
        self.tracker.assign(keys, self.intake.consumer.generation)

    def on_revoked(self, keys: list[PartitionKey]) -> None:
        """Stop batching the partitions, wait (bounded) for their in-flight batches to be
        acknowledged, commit their done offsets, and drop the rest for the next owner.
        Exactly-once: commit the open transaction (a checkpoint), or abort it."""
        self._gone.update(dict.fromkeys(keys, DiscardReason.REVOKED))
        if self.transactions is not None:
            self._revoke_transactional(self.transactions, keys)
            return
        self._abandon_unstarted(keys, DiscardReason.REVOKED)
        if self._settled:
            # consumer.close() after the final commit: it already waited and committed.
            self.tracker.remove(keys)
            return
        deadline = time.monotonic() + self.settings.shutdown.revoke_timeout_ms / 1000
        drained, _ = self.committer.settle(
            keys, deadline, lambda: self.tracker.pending(keys) == 0, serve_group=False
        )
        if not drained:
            log.warning(
                "revoke timeout: unfinished work dropped",
                pending=self.tracker.pending(keys),
                partitions=describe_partitions(keys),
            )
        self.tracker.remove(keys)

    def on_lost(self, keys: list[PartitionKey]) -> None:
        """The group moved on without us: drop everything, commit nothing (exactly-once:
        abort the open transaction, which may hold their records)."""
        self._gone.update(dict.fromkeys(keys, DiscardReason.LOST))
        if self.transactions is not None:
            if not self._settled:
                self.transactions.abort(AbortReason.LOST, leaving=keys)
            self.tracker.remove(keys)
            return
        for item in self.batcher.drop(set(keys)):
            self._discard(item.origin, DiscardReason.LOST)
        self.tracker.remove(keys)

    def _revoke_transactional(self, transactions: Transactions, keys: list[PartitionKey]) -> None:
        if not self._settled:
            deadline = time.monotonic() + self.settings.shutdown.revoke_timeout_ms / 1000
            if not transactions.checkpoint(deadline, AbortReason.REBALANCE, leaving=keys):
                log.warning(
                    "revoke: the open transaction was aborted, the next owner redoes it",
                    partitions=describe_partitions(keys),
                )
        self.tracker.remove(keys)

    # -- Stages (worker.pipeline.transactions, main thread) -----------------------------

    def push_work(self) -> None:
        self.batcher.flush()
        self.submit_ready_batches()

    def work_done(self) -> bool:
        return self.batcher.empty and self._all_delivered()

    def drop_unstarted(self, reason: DiscardReason) -> int:
        dropped = self.batcher.drop_all()
        for item in dropped:
            self._discard(item.origin, reason)
        return len(dropped)

    def rewound(self, keys: Collection[PartitionKey]) -> None:
        self._gone.update(dict.fromkeys(keys, DiscardReason.ABORTED))

    # -- internals ----------------------------------------------------------------------

    def _poll_ahead(self) -> list[InputRecord]:
        """Exactly-once: poll only as many records as fill :data:`READ_AHEAD_BATCHES`
        batches; with those full, wait for the model instead (librdkafka keeps
        prefetching, heartbeats go on; the wait is bounded by the next checkpoint)."""
        waiting = self.batcher.open_size + sum(len(batch) for batch in self.batcher.ready)
        room = READ_AHEAD_BATCHES * self.settings.batch.max_batch_size - waiting
        if room <= 0:
            self.producer.serve(POLL_WAITING_TIMEOUT_S)
            return []
        return self.intake.poll(min(room, POLL_MAX_RECORDS), self._poll_timeout())

    def _poll_timeout(self) -> float:
        if self.batcher.ready:
            return POLL_WAITING_TIMEOUT_S
        commit_left = (
            self.committer.time_left()
            if self.transactions is None
            else self.transactions.time_left()
        )
        candidates = [
            POLL_IDLE_TIMEOUT_S,
            commit_left,
            self.batcher.time_left(),
            self.producer.next_retry_in(),
        ]
        return min(value for value in candidates if value is not None)

    def _track(self, record: InputRecord) -> Tracked | None:
        key = (record.topic, record.partition)
        state = self.tracker.get(key)
        if state is None or not state.active:
            self.observer.record_discarded(key, DiscardReason.NOT_ASSIGNED)
            return None
        if record.generation != state.generation:
            self.observer.record_discarded(key, DiscardReason.STALE)
            return None
        if not state.receive(record.offset):
            self.observer.record_discarded(key, DiscardReason.SEEN)
            return None
        tracer = self.tracer
        return Tracked(record, state, tracer.start_event(record) if tracer.enabled else None)

    def _close_feed(self) -> None:
        if self.profile_feed is not None:
            self.profile_feed.close()

    def _admit(self, tracked: Tracked) -> None:
        """Decode, resolve the label profile (here, once per event: see
        :mod:`worker.pipeline.profiles`), estimate, batch under the profile revision."""
        tagging = self.settings.tagging
        try:
            event = decode_input(tracked.record.value, tagging)
            profile = self.profiles.resolve(event)
            request = to_request(event, tagging, profile)
        except EventError as exc:
            failure = Failure(Stage(exc.stage), type(exc).__name__, str(exc))
            self.producer.dead_letter(tracked, failure)
            return
        try:
            tokens = self.scorer.estimate_tokens(request)
        except Exception as exc:
            failure = Failure(Stage.INFERENCE, type(exc).__name__, str(exc))
            self.producer.dead_letter(tracked, failure)
            return
        if tokens > tagging.max_event_tokens:
            too_costly = EventTooCostlyError(tokens, tagging.max_event_tokens)
            failure = Failure(Stage.VALIDATE, type(too_costly).__name__, str(too_costly))
            self.producer.dead_letter(tracked, failure)
            return
        self.batcher.add(
            PendingEvent(tracked, event, request, tokens, profile), self.profiles.revision
        )

    def _abandon_unstarted(self, keys: list[PartitionKey], reason: DiscardReason) -> int:
        """Take the partitions' events out of the batches not handed over yet; they will
        not be committed (the first of them per partition bounds the commit) and count as
        discarded for ``reason``. Returns how many were dropped."""
        first_dropped: dict[PartitionKey, int] = {}
        dropped = self.batcher.drop(set(keys))
        for item in dropped:
            record = item.origin.record
            self._discard(item.origin, reason)
            current = first_dropped.get(record.partition_key)
            if current is None or record.offset < current:
                first_dropped[record.partition_key] = record.offset
        for key, offset in first_dropped.items():
            state = self.tracker.get(key)
            if state is not None:
                state.truncate_from(offset)
        return len(dropped)

    def _abandoned(self, origin: Tracked) -> None:
        """A stage gave up on a record of a partition no longer assigned here (main or
        inference thread)."""
        self._discard(origin, self._gone.get(origin.record.partition_key, DiscardReason.REVOKED))

    def _discard(self, origin: Tracked, reason: DiscardReason) -> None:
        """A tracked record is dropped without an output or a dead-letter record."""
        self.observer.record_discarded(origin.record.partition_key, reason)
        discard_trace(origin.trace, reason)

    def _batch_closed(self, batch: Batch) -> None:
        age = time.monotonic() - batch.opened_at
        self.observer.batch_closed(len(batch), batch.tokens, str(batch.reason), age)

    def _on_commit_result(self, error: ClientError | None, results: CommitOutcome) -> None:
        # The consumer exists before the committer that reads its results.
        self.committer.on_commit_result(error, results)

    def _all_delivered(self) -> bool:
        return self.handoff.in_flight == 0 and self.producer.outstanding() == 0
