"""The producer wrapper's transactional calls never block far past their own timeout.

librdkafka's ``send_offsets_to_transaction`` can wait for good on a group coordinator that
restarted (confluentinc/librdkafka#5456, #5511): the wrapper reports such a call as
``STUCK`` instead of holding the worker's main thread. The client inside is replaced by a
stand-in that hangs on purpose; no broker is involved.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, Final

import pytest
from confluent_kafka import KafkaError, KafkaException

import worker.kafka.closing as closing_module
import worker.kafka.producer as producer_module
from worker.kafka.errors import ClientError, TxnAction
from worker.kafka.producer import KafkaProducer

GRACE_S: Final = 0.05
# Far more than the grace: a call that returned this late would fail the test.
WAIT_S: Final = 5.0


class HangingClient:
    """A client whose ``send_offsets_to_transaction`` does not return until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []
        self.closed = False

    def send_offsets_to_transaction(self, *_args: Any) -> None:
        self.calls.append("send_offsets")
        self.release.wait(WAIT_S)

    def commit_transaction(self, _timeout: float) -> None:
        self.calls.append("commit")

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[HangingClient]:
    monkeypatch.setattr(producer_module, "TXN_CALL_GRACE_S", GRACE_S)
    hanging = HangingClient()
    yield hanging
    hanging.release.set()


def _producer(client: HangingClient) -> KafkaProducer:
    # No broker is contacted: building a client only starts librdkafka's threads.
    producer = KafkaProducer({"bootstrap.servers": "127.0.0.1:9"}, on_error=lambda _e: None)
    producer._producer.close()
    producer._producer = client  # type: ignore[assignment]
    return producer


def test_a_call_that_returns_in_time_is_passed_through(client: HangingClient) -> None:
    producer = _producer(client)
    assert producer.commit_transaction(0.01) is None
    assert client.calls == ["commit"]
    assert not producer.stuck


def test_a_call_that_hangs_past_its_timeout_is_reported_stuck(client: HangingClient) -> None:
    producer = _producer(client)
    started = time.monotonic()
    error = producer.send_offsets_to_transaction({("news", 0): 1}, object(), 0.01)
    waited = time.monotonic() - started

    assert error is not None and error.action is TxnAction.STUCK
    assert "send_offsets_to_transaction" in error.message
    assert waited < WAIT_S
    assert producer.stuck


def test_a_stuck_producer_takes_no_further_calls_and_is_never_destroyed(
    client: HangingClient,
) -> None:
    producer = _producer(client)
    first = producer.send_offsets_to_transaction({("news", 0): 1}, object(), 0.01)

    assert producer.commit_transaction(0.01) == first
    assert producer.begin_transaction() == first
    assert client.calls == ["send_offsets"]
    producer.close()
    assert not client.closed
    assert client in closing_module._ABANDONED


class HangingCloseClient:
    """A client whose close does not return until released (an abort that waits for a
    coordinator that is gone)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.closed = False

    def close(self) -> None:
        self.release.wait(WAIT_S)
        self.closed = True


def test_abandoning_a_producer_whose_close_hangs_returns_in_time_and_keeps_it() -> None:
    hanging = HangingCloseClient()
    producer = KafkaProducer({"bootstrap.servers": "127.0.0.1:9"}, on_error=lambda _e: None)
    producer._producer.close()
    producer._producer = hanging  # type: ignore[assignment]
    started = time.monotonic()
    try:
        assert producer.abandon(GRACE_S) is False
        assert time.monotonic() - started < WAIT_S
        assert hanging in closing_module._ABANDONED
    finally:
        hanging.release.set()


def test_abandoning_a_producer_whose_close_returns_closes_it() -> None:
    closing = HangingCloseClient()
    closing.release.set()
    producer = KafkaProducer({"bootstrap.servers": "127.0.0.1:9"}, on_error=lambda _e: None)
    producer._producer.close()
    producer._producer = closing  # type: ignore[assignment]
    assert producer.abandon(WAIT_S) is True
    assert closing.closed
    assert closing not in closing_module._ABANDONED


def test_abandoning_a_stuck_producer_never_closes_it(client: HangingClient) -> None:
    producer = _producer(client)
    producer.send_offsets_to_transaction({("news", 0): 1}, object(), 0.01)
    assert producer.abandon(WAIT_S) is False
    assert not client.closed
    assert client in closing_module._ABANDONED


class FatalClient:
    """A client in a fatal state: its final flush raises, as librdkafka's does."""

    def close(self) -> None:
        raise KafkaException(KafkaError(KafkaError.INVALID_TXN_STATE, fatal=True))


def test_closing_a_client_in_a_fatal_state_does_not_raise() -> None:
    producer = KafkaProducer({"bootstrap.servers": "127.0.0.1:9"}, on_error=lambda _e: None)
    producer._producer.close()
    producer._producer = FatalClient()  # type: ignore[assignment]
    producer.close()


class RaisingPollClient:
    """A transactional client in a fatal state: its poll raises the error."""

    def poll(self, _timeout: float) -> None:
        raise KafkaException(KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, fatal=True))

    def close(self) -> None:
        pass


def test_a_fatal_error_raised_by_poll_reaches_the_error_hook() -> None:
    heard: list[ClientError] = []
    producer = KafkaProducer({"bootstrap.servers": "127.0.0.1:9"}, on_error=heard.append)
    producer._producer.close()
    heard.clear()  # the real client's own "connection refused" reports, if it got that far
    producer._producer = RaisingPollClient()  # type: ignore[assignment]
    producer.poll(0)
    assert [error.name for error in heard] == ["OUT_OF_ORDER_SEQUENCE_NUMBER"]
    assert heard[0].fatal
