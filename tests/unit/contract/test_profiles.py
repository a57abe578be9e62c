"""The label-profile control record: its key, its JSON value, the rules and the limits."""

from __future__ import annotations

from typing import Any, Final

import orjson
import pytest

from worker.contract.events import DEFAULT_HYPOTHESIS_TEMPLATE, InputEvent, is_profile_name
from worker.contract.profiles import (
    REJECT_INVALID,
    REJECT_JSON,
    REJECT_KEY,
    REJECT_TOO_LARGE,
    Profile,
    ProfileLimits,
    ProfileSpec,
    decode_control_record,
)
from worker.errors import ProfileError

LIMITS: Final = ProfileLimits(max_labels=3, max_label_chars=10, max_record_bytes=300)


def _decode(value: dict[str, Any] | bytes | None, key: bytes | None = b"news") -> Profile | None:
    raw = orjson.dumps(value) if isinstance(value, dict) else value
    return decode_control_record(key, raw, 41, LIMITS)[1]


def _rejected(value: dict[str, Any] | bytes | None, key: bytes | None = b"news") -> ProfileError:
    with pytest.raises(ProfileError) as caught:
        _decode(value, key)
    return caught.value


def test_a_full_record_becomes_the_profile_with_its_offset_as_version() -> None:
    profile = _decode(
        {
            "labels": ["sports", "finance"],
            "hypothesis_template": "It is about {}.",
            "multi_label": False,
            "threshold": 0.7,
            "label_thresholds": {"finance": 0.9},
        }
    )
    assert profile == Profile(
        name="news",
        version=41,
        labels=("sports", "finance"),
        multi_label=False,
        hypothesis_template="It is about {}.",
        threshold=0.7,
        label_thresholds={"finance": 0.9},
    )


def test_left_out_fields_take_fixed_defaults_not_the_worker_settings() -> None:
    profile = _decode({"labels": ["sports"]})
    assert profile is not None
    assert (profile.multi_label, profile.hypothesis_template, profile.threshold) == (
        True,
        DEFAULT_HYPOTHESIS_TEMPLATE,
        0.5,
    )
    assert profile.label_thresholds == {}


def test_thresholds_is_accepted_for_threshold() -> None:
    profile = _decode({"labels": ["sports"], "thresholds": 0.25})
    assert profile is not None
    assert profile.threshold == 0.25


def test_a_tombstone_deletes_the_named_profile() -> None:
    assert decode_control_record(b"news", None, 7, LIMITS) == ("news", None)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({}, "labels"),
        ({"labels": []}, "labels must not be empty"),
        ({"labels": ["a", "b", "c", "d"]}, "at most 3 labels"),
        ({"labels": ["a" * 11]}, "max_label_chars=10"),
        ({"labels": ["a", "a"]}, "unique"),
        ({"labels": [" "]}, "blank"),
        ({"labels": ["a", 7]}, "labels.1"),
        ({"labels": "a,b"}, "labels"),
        ({"labels": ["a"], "hypothesis_template": "no slot"}, "exactly once"),
        ({"labels": ["a"], "hypothesis_template": "{:>99}"}, "exactly once"),
        ({"labels": ["a"], "threshold": 1.5}, "threshold"),
        ({"labels": ["a"], "multi_label": "yes"}, "multi_label"),
        ({"labels": ["a"], "label_thresholds": {"b": 0.5}}, "not one of the labels"),
        ({"labels": ["a"], "label_thresholds": {"a": -0.1}}, "within 0..1"),
        ({"labels": ["a"], "lables": ["b"]}, "lables"),
    ],
)
def test_a_record_that_breaks_the_rules_is_rejected_naming_the_field(
    value: dict[str, Any], fragment: str
) -> None:
    error = _rejected(value)
    assert error.reason == REJECT_INVALID
    assert fragment in str(error)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", REJECT_JSON),
        (b'["a"]', REJECT_JSON),
        (b"", REJECT_JSON),
        (orjson.dumps({"labels": ["a"], "pad": "x" * 300}), REJECT_TOO_LARGE),
    ],
)
def test_a_value_that_is_not_a_small_json_object_is_rejected(value: bytes, reason: str) -> None:
    assert _rejected(value).reason == reason


def test_too_large_names_the_setting() -> None:
    error = _rejected(orjson.dumps({"labels": ["a"], "pad": "x" * 300}))
    assert "TAGSTREAM_MAX_PROFILE_RECORD_BYTES=300" in str(error)


@pytest.mark.parametrize(
    "key", [None, b"", b"\xff", b"-starts-with-dash", b"has space", b"x" * 101]
)
def test_a_record_without_a_valid_name_as_its_key_is_rejected(key: bytes | None) -> None:
    assert _rejected({"labels": ["a"]}, key).reason == REJECT_KEY
    with pytest.raises(ProfileError):
        decode_control_record(key, None, 0, LIMITS)  # a tombstone needs a name too


def test_profile_names() -> None:
    assert all(is_profile_name(name) for name in ("default", "news.v2", "A_b-9", "x" * 100))
    assert not any(is_profile_name(name) for name in ("", ".x", "x" * 101, "é", "a/b"))


def test_an_event_names_a_profile_with_the_same_rule() -> None:
    assert InputEvent.model_validate({"text": "t", "profile": "news"}).profile == "news"
    with pytest.raises(ValueError, match="profile name"):
        InputEvent.model_validate({"text": "t", "profile": "no spaces"})


def test_the_spec_written_by_the_command_reads_back_to_the_same_profile() -> None:
    spec = ProfileSpec(labels=["a", "b"], multi_label=False, label_thresholds={"a": 0.3})
    profile = _decode(spec.to_json())
    assert profile == Profile.of("news", 41, spec)
