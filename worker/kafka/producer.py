"""The producer, typed: records in, delivery reports out as :class:`ClientError` data.

No policy here: retries, the one-record resend, dead-letter routing, offsets and when a
transaction commits or aborts are the pipeline's (:mod:`worker.pipeline.delivery`,
:mod:`worker.pipeline.transactions`). The transactional calls return a failure as a
:class:`~worker.kafka.errors.TxnError` instead of raising, and never block much past
their own timeout: each runs on a short-lived thread, and one that has not returned
:data:`TXN_CALL_GRACE_S` after its timeout is reported as
:data:`~worker.kafka.errors.TxnAction.STUCK` (librdkafka's
``send_offsets_to_transaction`` can wait for good on a group coordinator that restarted:
confluentinc/librdkafka#5456 and #5511). A stuck producer is never destroyed, since a
thread is still inside it; the caller replaces it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, Final, cast

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from worker.kafka.closing import close_within, keep_forever
from worker.kafka.errors import (
    ClientError,
    TxnError,
    client_error,
    delivery_error,
    stuck_error,
    transaction_error,
)
from worker.kafka.records import OutHeaders, PartitionKey

log = structlog.get_logger(__name__)

# Called on the polling thread with None (acknowledged) or the classified error.
DeliveryReport = Callable[[ClientError | None], None]
# Called with a client-level error (not about one record).
ClientErrorHook = Callable[[ClientError], None]

# How long past its own timeout a transactional call may take before it counts as hung:
# librdkafka returns on time when it works, so seconds late means it never will.
TXN_CALL_GRACE_S: Final = 5.0


class KafkaProducer:
    """One librdkafka producer. ``config``: the complete librdkafka configuration
    (:func:`worker.kafka.config.producer_config` plus any client extras)."""

    def __init__(self, config: Mapping[str, Any], *, on_error: ClientErrorHook) -> None:
        self._on_error = on_error
        self._producer = Producer({**config, "error_cb": self._client_error})
        # The transactional call that hung inside the client, if one did, as its error.
        self._stuck: TxnError | None = None

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: OutHeaders,
        on_delivery: DeliveryReport,
    ) -> ClientError | None:
        """Hand one record to librdkafka; the error if it was refused at once.

        Raises ``BufferError`` when librdkafka's local queue is full: :meth:`poll` (or
        waiting) makes room.
        """

        def report(error: KafkaError | None, _message: Message) -> None:
            on_delivery(None if error is None else delivery_error(error))

        # The client takes a list and only reads it; the pipeline always passes one.
        as_list = cast("list[tuple[str, str | bytes | None]]", headers)
        try:
            self._producer.produce(topic, value=value, key=key, headers=as_list, on_delivery=report)
        except KafkaException as exc:
            return delivery_error(exc.args[0])
        return None

    def poll(self, timeout_s: float) -> None:
        """Run the delivery reports that arrived (waiting up to ``timeout_s`` for one).
        A fatal error the client raises here (a transactional producer does) goes to the
        ``on_error`` hook, as the ones it reports do."""
        try:
            self._producer.poll(timeout_s)
        except KafkaException as exc:
            self._client_error(exc.args[0])

    def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for every outstanding record; returns how many remain
        (a fatal error raised meanwhile goes to the ``on_error`` hook, as in :meth:`poll`)."""
        try:
            return int(self._producer.flush(timeout_s))
        except KafkaException as exc:
            self._client_error(exc.args[0])
            return len(self._producer)

    # -- transactions (a producer configured with transactional.id) -----------------------

    def init_transactions(self, timeout_s: float) -> TxnError | None:
        """Register the transactional.id: fences older producers with the same id and
        aborts the transaction one of them left open."""
        return self._bounded(
            "init_transactions", lambda: self._producer.init_transactions(timeout_s), timeout_s
        )

    def begin_transaction(self) -> TxnError | None:
        if self._stuck is not None:
            return self._stuck
        return _txn_call(self._producer.begin_transaction)

    def send_offsets_to_transaction(
        self, positions: Mapping[PartitionKey, int], group_metadata: object, timeout_s: float
    ) -> TxnError | None:
        """Add the consumer's next offsets to the transaction; the broker checks
        ``group_metadata`` (the consumer's generation) and fences a zombie (KIP-447)."""
        offsets = [TopicPartition(topic, part, pos) for (topic, part), pos in positions.items()]
        return self._bounded(
            "send_offsets_to_transaction",
            lambda: self._producer.send_offsets_to_transaction(offsets, group_metadata, timeout_s),
            timeout_s,
        )

    def commit_transaction(self, timeout_s: float) -> TxnError | None:
        """Flush, then commit: every record and offset of the transaction becomes visible."""
        return self._bounded(
            "commit_transaction", lambda: self._producer.commit_transaction(timeout_s), timeout_s
        )

    def abort_transaction(self, timeout_s: float) -> TxnError | None:
        """Purge what is queued, then abort: nothing of the transaction becomes visible."""
        return self._bounded(
            "abort_transaction", lambda: self._producer.abort_transaction(timeout_s), timeout_s
        )

    def purge(self) -> None:
        """Fail every record not yet acknowledged (their reports come with the next poll)."""
        self._producer.purge()

    def __len__(self) -> int:
        """Records handed over and not yet reported."""
        return len(self._producer)

    @property
    def stuck(self) -> bool:
        """Whether a transactional call hung inside the client (see the module docstring)."""
        return self._stuck is not None

    def close(self) -> None:
        """Flush what is outstanding and release the client (a stuck one is abandoned).
        A client in a fatal state raises from its final flush: that is logged, not raised,
        since the caller is done with it either way."""
        if self._stuck is not None:
            keep_forever(self._producer)
            return
        try:
            self._producer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("producer close failed", error=str(exc))

    def abandon(self, wait_s: float) -> bool:
        """Close on a thread of its own, waiting at most ``wait_s``: for a client being
        replaced, whose close may hang (it aborts the open transaction first, with a
        coordinator that may be gone). False if it did not finish in time; the client is
        then kept, never destroyed."""
        if self._stuck is not None:
            keep_forever(self._producer)
            return False
        return close_within(self._producer, self.close, wait_s, "tagstream-producer-close")

    def _bounded(self, name: str, call: Callable[[], object], timeout_s: float) -> TxnError | None:
        """Run ``call`` on its own thread and wait for it at most ``timeout_s`` plus
        :data:`TXN_CALL_GRACE_S`; a call still running then makes the producer stuck."""
        if self._stuck is not None:
            # librdkafka refuses a second call while one is running: do not queue behind it.
            return self._stuck
        outcome: list[TxnError | None] = []
        raised: list[BaseException] = []
        done = threading.Event()

        def run() -> None:
            try:
                outcome.append(_txn_call(call))
            except BaseException as exc:  # handed to the waiting thread below
                raised.append(exc)
            finally:
                done.set()

        threading.Thread(target=run, name=f"tagstream-{name}", daemon=True).start()
        waited = max(0.0, timeout_s) + TXN_CALL_GRACE_S
        if not done.wait(waited):
            self._stuck = stuck_error(name, waited)
            return self._stuck
        if raised:
            raise raised[0]
        return outcome[0]

    def _client_error(self, error: KafkaError) -> None:
        self._on_error(client_error(error))


def _txn_call(call: Callable[[], object]) -> TxnError | None:
    try:
        call()
    except KafkaException as exc:
        return transaction_error(exc.args[0])
    return None
