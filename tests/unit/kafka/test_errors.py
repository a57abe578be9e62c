"""What a Kafka error means for the worker, as data the pipeline can act on."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from worker.errors import RecordRef
from worker.kafka.errors import (
    ErrorKind,
    TxnAction,
    classify,
    client_error,
    delivery_error,
    fatal_error,
    transaction_action,
)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (KafkaError._MSG_TIMED_OUT, ErrorKind.RETRIABLE),
        (KafkaError._TRANSPORT, ErrorKind.RETRIABLE),
        (KafkaError.NOT_ENOUGH_REPLICAS, ErrorKind.RETRIABLE),
        (KafkaError.LEADER_NOT_AVAILABLE, ErrorKind.RETRIABLE),
        (KafkaError.REQUEST_TIMED_OUT, ErrorKind.RETRIABLE),
        (KafkaError.MSG_SIZE_TOO_LARGE, ErrorKind.TOO_LARGE),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, ErrorKind.FATAL),
        (KafkaError.SASL_AUTHENTICATION_FAILED, ErrorKind.FATAL),
        (KafkaError._FATAL, ErrorKind.FATAL),
        (KafkaError.INVALID_RECORD, ErrorKind.REJECTED),
        (KafkaError.INVALID_MSG, ErrorKind.REJECTED),
        (KafkaError.POLICY_VIOLATION, ErrorKind.REJECTED),
        # A neighbour in the same produce request was the invalid one: sent again.
        (KafkaError._INVALID_DIFFERENT_RECORD, ErrorKind.RETRIABLE),
        (KafkaError.UNSUPPORTED_VERSION, ErrorKind.FATAL),
    ],
)
def test_error_classification(code: int, kind: ErrorKind) -> None:
    assert classify(KafkaError(code)) is kind


@pytest.mark.parametrize(
    ("error", "action"),
    [
        (KafkaError(KafkaError._FENCED, fatal=True), TxnAction.FENCED),
        (KafkaError(KafkaError.INVALID_PRODUCER_EPOCH, fatal=True), TxnAction.FENCED),
        # EndTxn after a coordinator restart that already ended the transaction.
        (KafkaError(KafkaError.INVALID_TXN_STATE, fatal=True), TxnAction.FENCED),
        (KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, fatal=True), TxnAction.FATAL),
        (KafkaError(KafkaError._TIMED_OUT, retriable=True), TxnAction.RETRY),
        (KafkaError(KafkaError._TIMED_OUT, txn_requires_abort=True), TxnAction.ABORT),
    ],
)
def test_a_failed_transactional_call_says_what_it_needs(
    error: KafkaError, action: TxnAction
) -> None:
    assert transaction_action(error) is action


def test_a_delivery_error_is_classified_and_keeps_the_client_s_words() -> None:
    error = delivery_error(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too big"))
    assert (error.kind, error.name, error.message) == (
        ErrorKind.TOO_LARGE,
        "MSG_SIZE_TOO_LARGE",
        "too big",
    )
    assert not error.fatal


def test_a_client_error_is_fatal_only_when_the_client_says_so() -> None:
    # Unknown permanent errors are fatal for a record's delivery, not for the client.
    assert delivery_error(KafkaError(KafkaError.UNSUPPORTED_VERSION)).fatal
    assert not client_error(KafkaError(KafkaError.UNSUPPORTED_VERSION)).fatal
    assert client_error(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED)).fatal


@pytest.mark.parametrize(
    ("code", "during_rebalance", "needs_group"),
    [
        (KafkaError.REBALANCE_IN_PROGRESS, True, False),
        (KafkaError.ILLEGAL_GENERATION, True, True),
        (KafkaError.UNKNOWN_MEMBER_ID, True, True),
        (KafkaError.FENCED_MEMBER_EPOCH, False, True),
        (KafkaError.COORDINATOR_NOT_AVAILABLE, False, False),
    ],
)
def test_commit_errors_say_whether_a_rebalance_explains_them(
    code: int, during_rebalance: bool, needs_group: bool
) -> None:
    error = client_error(KafkaError(code))
    assert (error.during_rebalance, error.needs_group_progress) == (during_rebalance, needs_group)


def test_a_fatal_error_keeps_the_code_and_the_record() -> None:
    failure = fatal_error("stop", KafkaError(KafkaError._FATAL), RecordRef("news", 2, 41))
    assert (failure.error is not None and failure.error.fatal is False) or failure.error
    assert failure.error is not None and failure.error.code == KafkaError._FATAL
    assert str(failure.record) == "news[2]@41"
