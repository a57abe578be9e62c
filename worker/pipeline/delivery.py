"""Writes scored and dead-letter records, and turns broker acknowledgements into done offsets.

Any thread may :meth:`ProducerStage.send`; only the main thread calls
:meth:`ProducerStage.serve` (the commit's "flush outputs" and "confirm delivery" steps are
repeated calls of it), so delivery callbacks, retries and offset bookkeeping all run there.

No thread ever waits for room in librdkafka's local queue: a record it refuses as full
joins a backlog, in order (later records queue behind it), that :meth:`ProducerStage.serve`
drains as acknowledgements make room; meanwhile :attr:`ProducerStage.congested` tells the
worker to pause its input, so the backlog is bounded by what was already consumed and the
main thread keeps serving the group protocol and signals.

What happens to a record the broker did not take:

* transient error (broker down, timeout, leader moving, topic missing): sent again after
  an exponential backoff; never dead-lettered. A record still unwritten
  ``retry_deadline_s`` after its first failure stops the worker with a message that
  names the topic and the error: the partition cannot move on without it, and a restart
  with an operator watching is better than a worker silently stuck;
* too large: sent once more alone (a batch can be too large because of its neighbours);
  a scored event that is too large on its own dead-letters its input (stage
  ``produce``); a dead-letter record that is too large is replaced by a bounded stub
  (original key and headers, no value, its size and SHA-256), and only a stub the broker
  refuses too stops the worker, because its offset can never be done;
* rejected for what it is (a null key on a compacted topic, a corrupt record, a broker
  policy): the broker refuses the whole produce batch, so the record too is sent once more
  alone; a scored event rejected alone dead-letters its input (stage ``produce``), and a
  rejected dead-letter record is replaced by a stub, as a too large one is;
* anything else (authorization, fatal idempotent-producer state, unknown permanent
  errors): stops the worker, which then commits only what is done.

A record acknowledged after its partition was revoked is written all the same (and counted
as such); one that failed, or waited for a retry, meanwhile is dropped and reported through
``on_abandoned``: the partition's next owner processes that input again.

**Exactly-once mode** (``transactional_id`` given): the producer is transactional and every
record goes into the open transaction, which :mod:`worker.pipeline.transactions` commits or
aborts. Inside a transaction nothing is retried: any failed delivery makes the transaction
abortable, so the stage only asks for an abort (:attr:`abort_reason`) and remembers the
records refused for what they are (too large, rejected). The broker refuses a whole produce
request, so when their inputs are scored again each of them is first sent alone
(:meth:`ProducerStage.serve` flushes before and after it, holding back other sends): one
refused alone is the culprit, and the next replay writes its input's dead letter (stage
``produce``) instead, or a dead-letter record's stub, as in at-least-once mode. So one bad
record costs two aborts, and cannot make every transaction abort. A fenced producer is
flagged (:attr:`fenced`) and replaced, never fatal.
Fates (scored, dead-lettered) are reported when the transaction commits, since only then
are the records visible; an aborted transaction's records count as discarded, ``aborted``.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol, cast

import structlog

from worker.config.settings import DEFAULT_RETRY_DEADLINE_S, KafkaSettings
from worker.contract.deadletter import (
    Failure,
    Header,
    Stage,
    WorkerIdentity,
    dead_letter_headers,
    stub_headers,
)
from worker.errors import KafkaFatalError, RecordRef
from worker.kafka.config import producer_config
from worker.kafka.errors import ClientError, ErrorKind, TxnError
from worker.kafka.producer import ClientErrorHook, DeliveryReport, KafkaProducer
from worker.kafka.records import OutHeaders, PartitionKey
from worker.pipeline.observer import DiscardReason, Observer
from worker.pipeline.offsets import Tracked
from worker.pipeline.tracing import discard_trace, with_trace

log = structlog.get_logger(__name__)

# First retry after a tenth of a second: most transient errors (leader moves) are over.
RETRY_BACKOFF_INITIAL_S: Final = 0.1
# Never wait more than half a minute between tries: a broker back from maintenance is
# picked up quickly.
RETRY_BACKOFF_MAX_S: Final = 30.0
# +-20 % jitter keeps many workers from retrying in lockstep after a shared outage.
RETRY_JITTER: Final = 0.2
# Exactly-once: inputs whose record the broker refused for what it is, remembered across the
# abort so that the replay writes a dead letter (or a stub) instead; more than any replay
# holds, few enough to keep in memory.
REFUSED_MEMORY: Final = 10_000
# Exactly-once: how long a record sent alone waits for the records before it, and for its
# own answer (a produce request takes milliseconds; a broker that does not answer in this
# time makes the transaction fail anyway).
ISOLATE_FLUSH_S: Final = 5.0
# How long the main thread waits for a replaced producer to close: once its records are
# purged a close that works returns in milliseconds; one still running waits on a
# transaction coordinator that is gone, and is left to itself.
PRODUCER_CLOSE_WAIT_S: Final = 5.0

RecordKind = Literal["output", "dead_letter"]
# Called (main or inference thread) for a record this worker gives up on because its
# partition is no longer assigned here; the worker turns it into a discard with a reason.
AbandonHook = Callable[[Tracked], None]


class ProducerClient(Protocol):
    """What the stage needs of a producer (:class:`~worker.kafka.producer.KafkaProducer`)."""

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: OutHeaders,
        on_delivery: DeliveryReport,
    ) -> ClientError | None: ...

    def poll(self, timeout_s: float) -> None: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...

    def abandon(self, wait_s: float) -> bool: ...

    # Exactly-once mode only (a producer configured with a transactional.id).

    def init_transactions(self, timeout_s: float) -> TxnError | None: ...

    def begin_transaction(self) -> TxnError | None: ...

    def send_offsets_to_transaction(
        self, positions: Mapping[PartitionKey, int], group_metadata: object, timeout_s: float
    ) -> TxnError | None: ...

    def commit_transaction(self, timeout_s: float) -> TxnError | None: ...

    def abort_transaction(self, timeout_s: float) -> TxnError | None: ...

    def purge(self) -> None: ...

    def flush(self, timeout_s: float) -> int: ...

    @property
    def stuck(self) -> bool: ...


# Builds a producer client from its librdkafka configuration and client-error hook.
ProducerFactory = Callable[[Mapping[str, Any], ClientErrorHook], ProducerClient]


def connect(config: Mapping[str, Any], on_error: ClientErrorHook) -> ProducerClient:
    """The default :data:`ProducerFactory`: a real librdkafka producer."""
    return KafkaProducer(config, on_error=on_error)


@dataclass(slots=True, eq=False)
class Outbound:
    """One record to write, and the input whose offset it completes."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: OutHeaders
    kind: RecordKind
    origin: Tracked
    attempts: int = 0
    solo: bool = False
    # Why the input is dead-lettered (dead-letter records only): counted on acknowledgement.
    failure: Failure | None = None
    # A bounded stand-in for a dead-letter record the broker refused (no value).
    stub: bool = False
    # When a delivery of this record first failed with a transient error (monotonic).
    first_failure_at: float | None = None
    # Exactly-once: the transaction it was written in (reports of older ones are ignored).
    txn: int = -1


def backoff_delay(attempt: int) -> float:
    """Seconds before try ``attempt + 1``: doubling from 0.1 s up to 30 s, jittered."""
    base = min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_INITIAL_S * 2 ** max(0, attempt - 1))
    return float(base * random.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER))


def abandon_as_revoked(observer: Observer) -> AbandonHook:
    """The default :data:`AbandonHook`: report the record as discarded, ``revoked``."""

    def abandon(origin: Tracked) -> None:
        observer.record_discarded(origin.record.partition_key, DiscardReason.REVOKED)
        discard_trace(origin.trace, DiscardReason.REVOKED)

    return abandon


class ProducerStage:
    """The worker's idempotent producer (plus a lazily created one-record-per-request one),
    or with ``transactional_id`` its one transactional producer (exactly-once).

    ``client_config``: extra librdkafka settings for both producers (the structlog
    ``logger``), under the worker's own settings.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        identity: WorkerIdentity,
        observer: Observer,
        *,
        client_config: Mapping[str, Any] | None = None,
        on_abandoned: AbandonHook | None = None,
        producer_factory: ProducerFactory = connect,
        retry_deadline_s: float = DEFAULT_RETRY_DEADLINE_S,
        transactional_id: str | None = None,
        transaction_timeout_ms: int | None = None,
    ) -> None:
        self._kafka = kafka
        self.transactional = transactional_id is not None
        self._main_config = producer_config(
            kafka, transactional_id=transactional_id, transaction_timeout_ms=transaction_timeout_ms
        )
        self._connect = producer_factory
        self._identity = identity
        self._observer = observer
        self._client_config = dict(client_config or {})
        self._on_abandoned = on_abandoned or abandon_as_revoked(observer)
        self._dead_letter_topic = kafka.dead_letter_topic
        self._producer = self._connect(self._config(self._main_config), self._on_client_error)
        self._solo: ProducerClient | None = None
        self._retry_deadline_s = retry_deadline_s
        # Records acknowledged and not reported yet (main thread: see _report_fates).
        self._acked: list[Outbound] = []
        # Records librdkafka's queue had no room for, oldest first (any thread appends).
        self._backlog: deque[Outbound] = deque()
        self._backlog_lock = threading.Lock()
        self._failed_sends: deque[tuple[Outbound, ClientError]] = deque()
        self._retries: list[tuple[float, int, Outbound]] = []
        self._sequence = itertools.count()
        self.fatal: KafkaFatalError | None = None
        # -- exactly-once state ------------------------------------------------------------
        # Records written in the open transaction (appended under the backlog lock).
        self._txn_records: list[Outbound] = []
        self._txn_seq = 0
        # Set while no transaction may take records (an abort is under way): they are
        # dropped, their inputs are processed again after the rewind.
        self._sealed = False
        # Why the open transaction must be aborted (a failed delivery), if it must.
        self.abort_reason: str | None = None
        # The producer was fenced: it must be replaced before anything else is written.
        self.fenced = False
        # (input topic, partition, offset, record kind) -> why the broker refused it, and
        # whether it was refused alone (the culprit) or in a request with others (a suspect).
        self._refused: OrderedDict[tuple[str, int, int, RecordKind], tuple[ClientError, bool]] = (
            OrderedDict()
        )
        # Suspects of the replay, to be sent alone by the main thread (any thread appends).
        self._isolated: deque[Outbound] = deque()

    # -- any thread ---------------------------------------------------------------------

    def send(self, record: Outbound) -> None:
        """Hand a record to librdkafka, or to the backlog when its queue is full (never
        waits); failures are handled on the main thread."""
        if self.transactional:
            self._send_transactional(record)
            return
        record.attempts += 1
        with self._backlog_lock:
            if self._backlog or not self._produce(record):
                self._backlog.append(record)

    def send_all(self, records: list[Outbound]) -> None:
        """:meth:`send` of each record, in order, under one lock (a batch's outputs)."""
        if self.transactional:
            for record in records:
                self._send_transactional(record)
            return
        with self._backlog_lock:
            backlog = self._backlog
            for record in records:
                record.attempts += 1
                if backlog or not self._produce(record):
                    backlog.append(record)

    def _send_transactional(self, record: Outbound) -> None:
        """Exactly-once: into the open transaction, unless an abort is under way or the
        input's partition state was rewound (then its input is processed again)."""
        refused = self._refusal(record)
        if refused is not None and not refused[1]:
            record.solo = True  # a suspect: sent alone, so that the broker judges it alone
            self._isolated.append(record)
            return
        if refused is not None:
            refusal = refused[0]
            # Refused alone before: dead-letter the input instead, or write the dead-letter
            # record's stub.
            if record.kind == "output":
                failure = Failure(Stage.PRODUCE, refusal.name, refusal.message, record.attempts)
                self.dead_letter(record.origin, failure)
            else:
                self._send_transactional(self._stub(record))
            return
        record.attempts += 1
        with self._backlog_lock:
            dropped = self._sealed or not record.origin.active
            if not dropped and (self._backlog or not self._produce(record)):
                self._backlog.append(record)
        if dropped:
            self._on_abandoned(record.origin)

    @property
    def congested(self) -> bool:
        """Records wait for room in librdkafka's queue: the input should pause."""
        return bool(self._backlog)

    def dead_letter(self, origin: Tracked, failure: Failure) -> None:
        """Send the input, unchanged, to the dead-letter topic (any thread)."""
        record = origin.record
        headers = with_trace(
            dead_letter_headers(record, failure, self._identity, datetime.now(UTC)), origin.trace
        )
        log.warning(
            "dead-lettering input",
            stage=failure.stage.value,
            error_class=failure.error_class,
            error=failure.message[:200],
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        self.send(
            Outbound(
                topic=self._dead_letter_topic,
                key=record.key,
                value=record.value,
                headers=headers,
                kind="dead_letter",
                origin=origin,
                failure=failure,
            )
        )

    # -- main thread --------------------------------------------------------------------

    def serve(self, timeout_s: float = 0.0) -> None:
        """Run delivery callbacks, drain the backlog into the room they made, handle
        failed sends, and resend due retries."""
        self._producer.poll(timeout_s)
        if self._solo is not None:
            self._solo.poll(0)
        self._drain_backlog()
        while self._failed_sends:
            record, error = self._failed_sends.popleft()
            self._handle_failure(record, error)
        self._resend_due()
        while self._isolated:
            self._send_alone(self._isolated.popleft())
        self._report_fates()

    def _send_alone(self, record: Outbound) -> None:
        """Exactly-once: one record in a produce request of its own. Other sends wait on
        the lock meanwhile (milliseconds: two flushes)."""
        with self._backlog_lock:
            dropped = self._sealed or not record.origin.active
            if not dropped:
                self._producer.flush(ISOLATE_FLUSH_S)
                if not self._produce(record):
                    self._backlog.append(record)
                self._producer.flush(ISOLATE_FLUSH_S)
        if dropped:
            self._on_abandoned(record.origin)

    # -- main thread, exactly-once: the transaction's steps ------------------------------

    @property
    def transaction_size(self) -> int:
        """Records written in the open transaction so far."""
        return len(self._txn_records)

    def init_transactions(self, timeout_s: float) -> TxnError | None:
        return self._producer.init_transactions(timeout_s)

    def begin_transaction(self) -> TxnError | None:
        """Open the next transaction; records are taken again from now on."""
        error = self._producer.begin_transaction()
        if error is None:
            with self._backlog_lock:
                self._sealed = False
        return error

    def send_offsets(
        self, positions: Mapping[PartitionKey, int], group_metadata: object, timeout_s: float
    ) -> TxnError | None:
        return self._producer.send_offsets_to_transaction(positions, group_metadata, timeout_s)

    def commit_transaction(self, timeout_s: float) -> TxnError | None:
        return self._producer.commit_transaction(timeout_s)

    def abort_transaction(self, timeout_s: float) -> TxnError | None:
        return self._producer.abort_transaction(timeout_s)

    def seal(self) -> None:
        """Take no more records (they are dropped as abandoned) until the next
        :meth:`begin_transaction`: an abort is under way. Reports from now on are about the
        aborted transaction (purged records among them) and are ignored."""
        with self._backlog_lock:
            self._sealed = True
            self._txn_seq += 1

    def transaction_committed(self) -> int:
        """The open transaction committed: its records are visible, report their fates.
        Returns how many there were."""
        with self._backlog_lock:
            records, self._txn_records = self._txn_records, []
            self._txn_seq += 1
        self._acked.extend(records)
        self._report_fates()
        return len(records)

    def transaction_aborted(self) -> int:
        """The open transaction was aborted: nothing of it is visible. Its records, and
        those still waiting for room, count as discarded (``aborted``). Returns how many."""
        with self._backlog_lock:
            records = [*self._txn_records, *self._backlog, *self._isolated]
            self._txn_records = []
            self._backlog.clear()
            self._isolated.clear()
            self._failed_sends.clear()
            self._txn_seq += 1
        self.abort_reason = None
        for record in records:
            self._observer.record_discarded(
                record.origin.record.partition_key, DiscardReason.ABORTED
            )
            discard_trace(record.origin.trace, DiscardReason.ABORTED)
        return len(records)

    @property
    def stuck(self) -> bool:
        """Whether a transactional call hung inside the producer client (it must be
        replaced; see :mod:`worker.kafka.producer`)."""
        return self._producer.stuck

    def replace_producer(self) -> None:
        """The producer was fenced (or is stuck): drop it (its records are aborted) and
        build a new one with the same configuration; the caller then calls
        :meth:`init_transactions`."""
        old, self._producer = (
            self._producer,
            self._connect(self._config(self._main_config), self._on_client_error),
        )
        self.fenced = False
        old.purge()
        if not old.abandon(PRODUCER_CLOSE_WAIT_S):
            log.warning("replaced producer left to close on its own", wait_s=PRODUCER_CLOSE_WAIT_S)

    def outstanding(self) -> int:
        """Records not acknowledged yet (queued in librdkafka or waiting for a retry)."""
        queued = len(self._producer) + (len(self._solo) if self._solo is not None else 0)
        waiting = len(self._backlog) + len(self._retries) + len(self._failed_sends)
        return queued + waiting + len(self._isolated)

    def next_retry_in(self) -> float | None:
        """Seconds until the next retry is due, if any is scheduled."""
        if not self._retries:
            return None
        return max(0.0, self._retries[0][0] - time.monotonic())

    def close(self, wait_s: float | None = None) -> bool:
        """Close the producers (their final flush reports what it acknowledged). With
        ``wait_s``, each closes on a thread of its own and is waited for at most that
        long: a close flushes records the broker may never take (it is down), and a
        stopping worker must not outlive its shutdown timeout for them; they are not
        committed, the next owner processes their inputs again. False if a producer was
        left closing."""
        closed = True
        for producer in (self._producer, self._solo):
            if producer is None:
                continue
            if wait_s is None:
                producer.close()
            elif not producer.abandon(wait_s):
                log.warning("producer still closing, left to itself", wait_s=round(wait_s, 1))
                closed = False
        self._report_fates()  # what the closing flush acknowledged
        return closed

    # -- internals ----------------------------------------------------------------------

    def _config(self, config: dict[str, Any]) -> dict[str, Any]:
        return {**self._client_config, **config}

    def _solo_producer(self) -> ProducerClient:
        if self._solo is None:
            config = self._config(producer_config(self._kafka, solo=True))
            self._solo = self._connect(config, self._on_client_error)
        return self._solo

    def _produce(self, record: Outbound) -> bool:
        """One try to queue the record in librdkafka; ``False`` if its queue is full.
        Called with the backlog lock held, so records enter the queue in order."""
        # Exactly-once: every record goes through the transactional producer, a record
        # sent alone too (:meth:`_send_alone` isolates it by flushing around it). The solo
        # producer is not transactional: what it writes is visible at once to
        # read_committed readers and no abort takes it back.
        solo = record.solo and not self.transactional
        producer = self._solo_producer() if solo else self._producer
        if self.transactional:
            # Before the produce call: its delivery report may run on the main thread as
            # soon as the call returns, and a report without its transaction is ignored.
            record.txn = self._txn_seq
        try:
            error = producer.produce(
                record.topic,
                record.key,
                record.value,
                record.headers,
                functools.partial(self._on_delivery, record),
            )
        except BufferError:
            return False
        if self.transactional:
            self._txn_records.append(record)
        if error is not None:
            self._failed_sends.append((record, error))
        return True

    def _drain_backlog(self) -> None:
        with self._backlog_lock:
            while self._backlog and self._produce(self._backlog[0]):
                self._backlog.popleft()

    def _on_client_error(self, error: ClientError) -> None:
        if self.transactional and (error.fenced or error.fatal):
            # Exactly-once: whatever killed the producer (fencing, or a fatal error such as
            # the sequence desynchronization a broker restart can leave), its transaction is
            # aborted and a new producer takes over; a cause that persists (authorization)
            # stops the worker when the new producer's init_transactions fails.
            log.warning("producer fenced or failed, replacing it", error=error.message)
            self.fenced = True
        elif error.fatal:
            self._fail(f"producer error: {error.message}", error)
        else:
            log.warning("producer client error (retried by librdkafka)", error=error.message)

    def _on_delivery(self, record: Outbound, error: ClientError | None) -> None:
        if self.transactional:
            self._on_transactional_delivery(record, error)
            return
        if error is not None:
            self._handle_failure(record, error)
            return
        if record.origin.active:
            record.origin.mark_done()
        # Counted even for a revoked partition: the record is in the topic all the same.
        self._acked.append(record)

    def _report_fates(self) -> None:
        """Report the records acknowledged since the last call (written for good): one
        observer call for all of them, since there is one acknowledgement per record."""
        if not self._acked:
            return
        records, self._acked = self._acked, []
        now = time.time()
        outputs = 0
        latencies: list[float] = []
        for record in records:
            if record.kind == "output":
                outputs += 1
            timestamp_ms = record.origin.record.timestamp_ms
            if timestamp_ms is not None:
                latencies.append(now - timestamp_ms / 1000)
            failure = record.failure
            if failure is not None:
                self._observer.record_dead_lettered(failure.stage.value, failure.error_class)
            trace = record.origin.trace
            if trace is not None:
                trace.end("scored" if record.kind == "output" else "dead_lettered", failure)
        self._observer.deliveries_acked(len(records), outputs, latencies)

    def _on_transactional_delivery(self, record: Outbound, error: ClientError | None) -> None:
        if record.txn != self._txn_seq:
            return  # a report of an aborted transaction (purged records among them)
        if error is None:
            if record.solo:
                self._forget_refusal(record)  # accepted alone: not the culprit
            if record.origin.active:
                record.origin.mark_done()
            return
        self._transactional_failure(record, error)

    def _transactional_failure(self, record: Outbound, error: ClientError) -> None:
        """Any failed record makes the transaction abortable: ask for the abort; remember a
        refusal of the record itself for the replay."""
        if error.fenced:
            self.fenced = True
            return
        if error.fatal and not error.transaction_failed:
            self._fail(f"cannot write to {record.topic}: {error.message}", error, record)
            return
        source = record.origin.record
        if error.kind in (ErrorKind.TOO_LARGE, ErrorKind.REJECTED) and not record.stub:
            key = (source.topic, source.partition, source.offset, record.kind)
            self._refused[key] = (error, record.solo)
            while len(self._refused) > REFUSED_MEMORY:
                self._refused.popitem(last=False)
        if self.abort_reason is None:
            log.warning(
                "produce failed inside a transaction, aborting it",
                destination=record.topic,
                topic=source.topic,
                partition=source.partition,
                offset=source.offset,
                error=error.message,
            )
            self.abort_reason = f"produce error {error.name}"

    def _forget_refusal(self, record: Outbound) -> None:
        source = record.origin.record
        self._refused.pop((source.topic, source.partition, source.offset, record.kind), None)

    def _refusal(self, record: Outbound) -> tuple[ClientError, bool] | None:
        """Why the broker refused this record of this input before, if it did."""
        if record.stub or not self._refused:
            return None
        source = record.origin.record
        return self._refused.get((source.topic, source.partition, source.offset, record.kind))

    def _handle_failure(self, record: Outbound, error: ClientError) -> None:
        if self.transactional:
            self._transactional_failure(record, error)
            return
        kind = error.kind
        if kind is ErrorKind.FATAL:
            self._fail(f"cannot write to {record.topic}: {error.message}", error, record)
        elif not record.origin.active:
            self._on_abandoned(record.origin)  # the next owner of the partition redoes it
        elif kind is ErrorKind.RETRIABLE:
            self._schedule_retry(record, error)
        elif not record.solo:
            # Too large or rejected: the broker judges a whole batch, so a neighbour may be
            # the cause. Alone, the record gets its own answer.
            record.solo = True
            self.send(record)
        elif record.kind == "output":
            failure = Failure(Stage.PRODUCE, error.name, error.message, record.attempts)
            self.dead_letter(record.origin, failure)
        elif not record.stub:
            self._send_stub(record, error)
        else:
            self._fail(
                f"dead-letter record for {record.origin.record.topic}"
                f"[{record.origin.record.partition}]@{record.origin.record.offset} "
                f"cannot be written to {record.topic}: {error.message}; "
                "its offset stays uncommitted",
                error,
                record,
            )

    def _send_stub(self, record: Outbound, error: ClientError) -> None:
        """The broker refused a dead-letter record (too large for the dead-letter topic, or
        rejected): write a bounded stub in its place, so that no record can stop the worker
        (and, one by one, every member that takes the partition after it)."""
        source = record.origin.record
        log.warning(
            "dead-letter record refused, writing a stub without the value",
            error=error.message,
            topic=source.topic,
            partition=source.partition,
            offset=source.offset,
            value_bytes=0 if record.value is None else len(record.value),
        )
        self.send(self._stub(record))

    def _stub(self, record: Outbound) -> Outbound:
        """A bounded stand-in for a refused dead-letter record: its key and headers, no
        value (its size and SHA-256 in the headers)."""
        headers = stub_headers(cast("list[Header]", record.headers), record.value)
        return Outbound(
            topic=record.topic,
            key=record.key,
            value=None,
            headers=headers,
            kind="dead_letter",
            origin=record.origin,
            failure=record.failure,
            stub=True,
            solo=not self.transactional,
        )

    def _schedule_retry(self, record: Outbound, error: ClientError) -> None:
        now = time.monotonic()
        if record.first_failure_at is None:
            record.first_failure_at = now
        failing_for = now - record.first_failure_at
        source = record.origin.record
        if failing_for >= self._retry_deadline_s:
            self._fail(
                f"{record.topic} has refused the {record.kind.replace('_', '-')} record of "
                f"{source.topic}[{source.partition}]@{source.offset} for {failing_for:.1f} s "
                f"(last error: {error.message}); stopping after "
                f"TAGSTREAM_RETRY_DEADLINE_S={self._retry_deadline_s:g}: its offset stays "
                "uncommitted, so the input is processed again after the restart",
                error,
                record,
            )
            return
        delay = backoff_delay(record.attempts)
        log.warning(
            "transient produce error, retrying",
            destination=record.topic,
            topic=source.topic,
            partition=source.partition,
            offset=source.offset,
            error=error.message,
            attempt=record.attempts,
            delay_s=round(delay, 3),
        )
        self._observer.produce_retried(error.name, record.attempts, delay)
        heapq.heappush(self._retries, (time.monotonic() + delay, next(self._sequence), record))

    def _resend_due(self) -> None:
        now = time.monotonic()
        while self._retries and self._retries[0][0] <= now:
            _, _, record = heapq.heappop(self._retries)
            if record.origin.active:
                self.send(record)
            else:
                self._on_abandoned(record.origin)

    def _fail(
        self, message: str, error: ClientError | None = None, record: Outbound | None = None
    ) -> None:
        if self.fatal is None:
            log.error("fatal Kafka error", error=message)
            source = None if record is None else record.origin.record
            self.fatal = KafkaFatalError(
                message,
                None if error is None else error.as_info(),
                None
                if source is None
                else RecordRef(source.topic, source.partition, source.offset),
            )
