"""The profile table and the control topic feed: start-up read, follow, tombstones, rejects."""

from __future__ import annotations

from typing import Final

import orjson
import pytest

from tests.support.fake_kafka import FakeControlConsumer
from worker.contract.events import DecodedEvent
from worker.contract.profiles import (
    REJECT_INVALID,
    REJECT_KEY,
    REJECT_TOO_MANY,
    Profile,
    ProfileLimits,
)
from worker.errors import KafkaFatalError, ProfileError, UnknownProfileError
from worker.pipeline.observer import Observer
from worker.pipeline.profiles import Change, ProfileFeed, ProfileTable

TOPIC: Final = "profiles"


class Recording(Observer):
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def profiles_loading(self) -> None:
        self.events.append(("loading", None))

    def profiles_loaded(self, profiles: int) -> None:
        self.events.append(("loaded", profiles))

    def profile_changed(self, kind: str, profiles: int) -> None:
        self.events.append((kind, profiles))

    def profile_rejected(self, reason: str) -> None:
        self.events.append(("rejected", reason))


def _profile(name: str, version: int, *labels: str) -> Profile:
    return Profile(name, version, labels, True, "This is {}.", 0.5)


def _value(*labels: str) -> bytes:
    return orjson.dumps({"labels": list(labels)})


def _feed(
    consumer: FakeControlConsumer, observer: Observer | None = None, max_profiles: int = 10
) -> ProfileFeed:
    table = ProfileTable(max_profiles, TOPIC)
    return ProfileFeed(consumer, TOPIC, table, ProfileLimits(), observer or Observer())


# -- the table ---------------------------------------------------------------------------


def test_set_replace_and_delete_bump_the_revision() -> None:
    table = ProfileTable(10)
    assert table.apply("news", _profile("news", 0, "a")) is Change.SET
    assert table.apply("news", _profile("news", 3, "b")) is Change.SET
    assert table.get("news") == _profile("news", 3, "b")
    assert table.apply("news", None) is Change.DELETED
    assert table.get("news") is None
    assert table.revision == 3


def test_an_older_version_or_the_tombstone_of_an_unknown_name_changes_nothing() -> None:
    table = ProfileTable(10)
    table.apply("news", _profile("news", 5, "a"))
    assert table.apply("news", _profile("news", 4, "old")) is Change.NONE
    assert table.apply("other", None) is Change.NONE
    assert table.get("news") == _profile("news", 5, "a")
    assert table.revision == 1


def test_a_new_name_past_max_profiles_is_refused_an_update_is_not() -> None:
    table = ProfileTable(1)
    table.apply("news", _profile("news", 0, "a"))
    with pytest.raises(ProfileError) as caught:
        table.apply("sport", _profile("sport", 1, "b"))
    assert caught.value.reason == REJECT_TOO_MANY
    assert "TAGSTREAM_MAX_PROFILES=1" in str(caught.value)
    assert table.apply("news", _profile("news", 2, "c")) is Change.SET
    assert len(table) == 1


def test_events_resolve_by_name_then_default_then_the_settings() -> None:
    table = ProfileTable(10, TOPIC)
    assert table.resolve(DecodedEvent("t")) is None  # nothing: the settings apply
    table.apply("news", _profile("news", 0, "a"))
    assert table.resolve(DecodedEvent("t")) is None  # no 'default' profile
    assert table.resolve(DecodedEvent("t", profile="news")) == _profile("news", 0, "a")
    table.apply("default", _profile("default", 1, "d"))
    assert table.resolve(DecodedEvent("t")) == _profile("default", 1, "d")


def test_an_unknown_profile_is_a_validate_error_naming_it_and_the_topic() -> None:
    table = ProfileTable(10, TOPIC)
    with pytest.raises(UnknownProfileError) as caught:
        table.resolve(DecodedEvent("t", profile="nope"))
    assert caught.value.stage == "validate"
    assert caught.value.fields == ("profile",)
    assert "'nope'" in str(caught.value)
    assert TOPIC in str(caught.value)
    without_topic = ProfileTable(10, None)
    with pytest.raises(UnknownProfileError, match="TAGSTREAM_CONTROL_TOPIC"):
        without_topic.resolve(DecodedEvent("t", profile="nope"))


# -- the feed ----------------------------------------------------------------------------


def test_start_reads_every_partition_to_its_end_then_reports_loaded() -> None:
    consumer = FakeControlConsumer(TOPIC, partition_count=2)
    consumer.append("news", _value("a"))
    consumer.append("news", _value("b"))
    consumer.append("sport", _value("c"), partition=1)
    consumer.append("gone", _value("x"), partition=1)
    consumer.append("gone", None, partition=1)
    observer = Recording()
    feed = _feed(consumer, observer)
    feed.start(timeout_s=5.0)
    assert feed.loaded
    assert [p.name for p in feed.table.profiles()] == ["news", "sport"]
    assert feed.table.get("news") == Profile("news", 1, ("b",), True, "This example is {}.", 0.5)
    assert observer.events[0] == ("loading", None)
    assert observer.events[-1] == ("loaded", 2)


def test_start_on_an_empty_topic_is_loaded_at_once() -> None:
    observer = Recording()
    _feed(FakeControlConsumer(TOPIC), observer).start(timeout_s=5.0)
    assert observer.events == [("loading", None), ("loaded", 0)]


def test_start_ends_at_a_position_past_the_end_without_a_record_at_the_last_offset() -> None:
    consumer = FakeControlConsumer(TOPIC)
    consumer.append("news", _value("a"))
    consumer.append("news", _value("b"))
    consumer.log[0].pop()  # compacted away (or a transaction marker): the position says it
    feed = _feed(consumer)
    ends = {(TOPIC, 0): 2}
    consumer.watermarks = lambda key, timeout_s: (0, ends[key])  # type: ignore[method-assign]
    consumer.position = lambda keys: dict.fromkeys(keys, 2)  # type: ignore[method-assign]
    feed.start(timeout_s=5.0)
    assert feed.table.get("news") is not None


def test_start_times_out_naming_the_setting() -> None:
    consumer = FakeControlConsumer(TOPIC)
    consumer.append("news", _value("a"))
    consumer.poll = lambda max_records, timeout_s: []  # type: ignore[method-assign]
    consumer.position = lambda keys: dict.fromkeys(keys, None)  # type: ignore[method-assign]
    ticks = iter(range(100))
    feed = ProfileFeed(
        consumer, TOPIC, ProfileTable(10), ProfileLimits(), Observer(), clock=lambda: next(ticks)
    )
    with pytest.raises(KafkaFatalError, match="TAGSTREAM_CONTROL_LOAD_TIMEOUT_S=3"):
        feed.start(timeout_s=3.0)
    assert not feed.loaded


def test_metadata_is_asked_again_until_the_deadline_then_the_start_stops() -> None:
    consumer = FakeControlConsumer(TOPIC, partition_count=None)
    ticks = iter(range(100))
    pauses: list[float] = []
    feed = ProfileFeed(
        consumer,
        TOPIC,
        ProfileTable(10),
        ProfileLimits(),
        Observer(),
        clock=lambda: next(ticks),
        sleep=pauses.append,
    )
    with pytest.raises(KafkaFatalError, match="no such topic"):
        feed.start(timeout_s=3.0)
    assert len(pauses) == 3


def test_a_topic_whose_metadata_comes_late_is_read_once_it_does() -> None:
    consumer = FakeControlConsumer(TOPIC, partition_count=None)
    consumer.append("news", _value("a"))

    def appears(_pause: float) -> None:
        consumer.partition_count = 1

    table = ProfileTable(10)
    feed = ProfileFeed(consumer, TOPIC, table, ProfileLimits(), Observer(), sleep=appears)
    feed.start(timeout_s=5.0)
    assert feed.table.get("news") is not None


def test_poll_follows_changes_and_says_whether_the_table_changed() -> None:
    consumer = FakeControlConsumer(TOPIC)
    consumer.append("news", _value("a"))
    observer = Recording()
    feed = _feed(consumer, observer)
    feed.start(timeout_s=5.0)
    assert not feed.poll()
    consumer.append("news", _value("b"))
    assert feed.poll()
    news = feed.table.get("news")
    assert news is not None
    assert (news.labels, news.version) == (("b",), 1)
    consumer.append("news", None)
    assert feed.poll()
    assert feed.table.get("news") is None
    assert observer.events[-2:] == [("set", 1), ("deleted", 0)]


def test_an_invalid_record_is_rejected_and_the_last_valid_version_stays() -> None:
    consumer = FakeControlConsumer(TOPIC)
    consumer.append("news", _value("a"))
    observer = Recording()
    feed = _feed(consumer, observer)
    feed.start(timeout_s=5.0)
    revision = feed.table.revision
    consumer.append("news", orjson.dumps({"labels": []}))
    consumer.append("news", b"{broken")
    consumer.append(None, _value("z"))
    assert not feed.poll()
    news = feed.table.get("news")
    assert news is not None
    assert (news.labels, news.version) == (("a",), 0)
    assert feed.table.revision == revision
    assert observer.events[-3:] == [
        ("rejected", REJECT_INVALID),
        ("rejected", "json"),
        ("rejected", REJECT_KEY),
    ]
    consumer.append("news", _value("c"))  # a valid one after them applies again
    assert feed.poll()
    assert feed.table.get("news") == Profile("news", 4, ("c",), True, "This example is {}.", 0.5)


def test_records_past_max_profiles_are_rejected_at_start_up_too() -> None:
    consumer = FakeControlConsumer(TOPIC)
    for name in ("a", "b", "c"):
        consumer.append(name, _value("x"))
    observer = Recording()
    feed = _feed(consumer, observer, max_profiles=2)
    feed.start(timeout_s=5.0)
    assert [p.name for p in feed.table.profiles()] == ["a", "b"]
    assert ("rejected", REJECT_TOO_MANY) in observer.events


def test_close_closes_the_reader() -> None:
    consumer = FakeControlConsumer(TOPIC)
    feed = _feed(consumer)
    feed.close()
    assert consumer.closed
