"""What a Kafka error means for the worker: retry it, give up on the record, or stop.

The classification sets live here, in one place: produce errors (:func:`classify`),
client errors (:func:`is_fatal`), the commit errors a rebalance causes, and what a
transactional call's error asks for (:func:`transaction_action`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from confluent_kafka import KafkaError

from worker.errors import KafkaErrorInfo, KafkaFatalError, RecordRef


class ErrorKind(enum.Enum):
    """What the worker does about a Kafka error."""

    RETRIABLE = "retriable"  # back off and try again; never dead-letter
    TOO_LARGE = "too_large"  # the record can never be written to this topic
    REJECTED = "rejected"  # the broker refuses this record for what it is, not for its size
    FATAL = "fatal"  # stop the worker, committing only what is done


_FATAL_CODES: Final = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError._FATAL,
        KafkaError._FENCED,
    }
)
_TOO_LARGE_CODES: Final = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        18,  # RECORD_LIST_TOO_LARGE: larger than the broker's segment size
    }
)
# Errors that go away by themselves: brokers restarting, leaders moving, slow requests.
_TRANSIENT_CODES: Final = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TIMED_OUT_QUEUE,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._QUEUE_FULL,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._WAIT_COORD,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.NOT_COORDINATOR,
        KafkaError.REBALANCE_IN_PROGRESS,
    }
)


# Per-record refusals: a null key on a compacted topic (INVALID_RECORD), a corrupt record
# (CORRUPT_MESSAGE, librdkafka's INVALID_MSG), a broker-side policy. Sending it again gives
# the same answer; the record, not the worker, is the problem.
_REJECTED_CODES: Final = frozenset(
    {KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG, KafkaError.POLICY_VIOLATION}
)


# Refused only because another record of the same produce request was (librdkafka maps the
# broker's per-record errors, KIP-467: the culprit gets INVALID_RECORD, its neighbours this):
# the record itself is fine, so it is sent again and never dead-lettered.
_NEIGHBOUR_REFUSED_CODES: Final = frozenset({KafkaError._INVALID_DIFFERENT_RECORD})


def classify(error: KafkaError) -> ErrorKind:
    """Retriable, too large, rejected, or fatal. Unknown permanent errors count as fatal:
    retrying them forever would stall the partition, dead-lettering them could drop good
    events."""
    code = error.code()
    if error.fatal() or code in _FATAL_CODES:
        return ErrorKind.FATAL
    if code in _TOO_LARGE_CODES:
        return ErrorKind.TOO_LARGE
    if code in _REJECTED_CODES:
        return ErrorKind.REJECTED
    if error.retriable() or code in _TRANSIENT_CODES or code in _NEIGHBOUR_REFUSED_CODES:
        return ErrorKind.RETRIABLE
    return ErrorKind.FATAL


# A newer producer with the same transactional.id (or the coordinator, after a transaction
# timeout) bumped the epoch: this producer can never write again, only a new one can.
# INVALID_TXN_STATE (fatal in librdkafka) is the same case seen from EndTxn: a coordinator
# that restarted past the transaction timeout had already ended the transaction itself.
FENCED_CODES: Final = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.INVALID_TXN_STATE,
    }
)


# A produce refused at once because the open transaction already failed (it must abort).
TXN_STATE_CODES: Final = frozenset({KafkaError._STATE})


class TxnAction(enum.Enum):
    """What a failed transactional call (init, begin, send offsets, commit, abort) asks for."""

    RETRY = "retry"  # call it again: the coordinator is moving, the request timed out
    ABORT = "abort"  # the transaction cannot commit: abort it and redo its work
    FENCED = "fenced"  # the producer is fenced: replace it, redo the work
    FATAL = "fatal"  # nothing helps (authorization, a broker without transactions): stop
    STUCK = "stuck"  # the call overran its own timeout (a client hang): replace the producer


def transaction_action(error: KafkaError) -> TxnAction:
    """Fenced before fatal (librdkafka reports fencing as a fatal error); a retriable error
    is only retriable when the transaction does not need an abort anyway."""
    if error.code() in FENCED_CODES:
        return TxnAction.FENCED
    if error.fatal():
        return TxnAction.FATAL
    if error.txn_requires_abort():
        return TxnAction.ABORT
    if error.retriable() or error.code() in _TRANSIENT_CODES:
        return TxnAction.RETRY
    if error.code() in _FATAL_CODES:
        return TxnAction.FATAL
    # Unknown: aborting is always safe, the work is redone.
    return TxnAction.ABORT


@dataclass(frozen=True, slots=True)
class TxnError:
    """A failed transactional call as data: its name, message and :class:`TxnAction`."""

    code: int
    name: str
    message: str
    action: TxnAction


# The code of a :data:`TxnAction.STUCK` error (librdkafka's own codes are above -200).
STUCK_CODE: Final = -1000


def stuck_error(call: str, waited_s: float) -> TxnError:
    """A transactional call that had not returned ``waited_s`` after it began."""
    return TxnError(
        STUCK_CODE,
        "_STUCK",
        f"{call} did not return within {waited_s:.1f} s, past its own timeout",
        TxnAction.STUCK,
    )


def transaction_error(error: KafkaError) -> TxnError:
    return TxnError(
        int(error.code()), str(error.name()), str(error.str()), transaction_action(error)
    )


def is_fatal(error: KafkaError) -> bool:
    """Whether a client-level (non-delivery) error must stop the worker."""
    return bool(error.fatal()) or error.code() in _FATAL_CODES


# Commit errors a rebalance causes: the next commit, in the new generation, succeeds.
REBALANCE_COMMIT_ERRORS: Final = frozenset(
    {KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS, KafkaError.UNKNOWN_MEMBER_ID}
)
# Commit errors that only clear once this member takes part in the rebalance.
NEEDS_GROUP_PROGRESS: Final = frozenset(
    {KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID, KafkaError.FENCED_MEMBER_EPOCH}
)


def error_info(error: KafkaError) -> KafkaErrorInfo:
    """The client's error as plain data, for :class:`KafkaFatalError`."""
    return KafkaErrorInfo(
        code=int(error.code()),
        name=str(error.name()),
        retriable=bool(error.retriable()),
        fatal=bool(error.fatal()),
    )


def fatal_error(
    message: str, error: KafkaError | None = None, record: RecordRef | None = None
) -> KafkaFatalError:
    """A :class:`KafkaFatalError` that keeps the client's error and the record's coordinates."""
    return KafkaFatalError(message, None if error is None else error_info(error), record)


@dataclass(frozen=True, slots=True)
class ClientError:
    """A Kafka error as data: what it is called, what it says, and what it means here.

    ``kind``: for a delivery report, :func:`classify`; for a client or commit error,
    ``FATAL`` when :func:`is_fatal` says so, else ``RETRIABLE``.
    """

    code: int
    name: str
    message: str
    kind: ErrorKind

    @property
    def fatal(self) -> bool:
        return self.kind is ErrorKind.FATAL

    @property
    def fenced(self) -> bool:
        """The producer was fenced (exactly-once): a new one can carry on."""
        return self.code in FENCED_CODES

    @property
    def transaction_failed(self) -> bool:
        """A produce refused because the open transaction must be aborted (exactly-once)."""
        return self.code in TXN_STATE_CODES

    def as_info(self) -> KafkaErrorInfo:
        """The plain form a :class:`KafkaFatalError` keeps."""
        retriable = self.kind is ErrorKind.RETRIABLE
        return KafkaErrorInfo(self.code, self.name, retriable=retriable, fatal=self.fatal)

    @property
    def during_rebalance(self) -> bool:
        """A commit refused because a rebalance is under way (expected, retried)."""
        return self.code in REBALANCE_COMMIT_ERRORS

    @property
    def needs_group_progress(self) -> bool:
        """A commit refusal that clears only once this member joins the rebalance."""
        return self.code in NEEDS_GROUP_PROGRESS


def _described(error: KafkaError, kind: ErrorKind) -> ClientError:
    return ClientError(int(error.code()), str(error.name()), str(error.str()), kind)


def delivery_error(error: KafkaError) -> ClientError:
    """A failed delivery report or produce call, classified by :func:`classify`."""
    return _described(error, classify(error))


def client_error(error: KafkaError) -> ClientError:
    """A client-level or commit error: fatal only when :func:`is_fatal` says so."""
    return _described(error, ErrorKind.FATAL if is_fatal(error) else ErrorKind.RETRIABLE)
