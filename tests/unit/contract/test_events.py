"""The input/output event contract (worker/events.py), exercised through decode_input.

Every way a record value can be rejected is listed here with the stage the worker
reports in its dead-letter record and the field the message must name.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from worker.config.settings import TaggingSettings
from worker.contract.codec import decode_input
from worker.contract.events import (
    DEFAULT_MAX_LABELS,
    DEFAULT_MAX_TEXT_CHARS,
    MAX_TEMPLATE_CHARS,
    DecodedEvent,
    InputEvent,
    ModelRef,
    ScoredEvent,
    Source,
    render_hypothesis,
)
from worker.errors import DeserializeError, EventError, ValidateError

SETTINGS = TaggingSettings(max_text_chars=50, max_labels=3)


def _nested(levels: int) -> dict[str, Any]:
    """An object ``levels`` deep: {"k": {"k": ... {}}}."""
    obj: dict[str, Any] = {}
    for _ in range(levels - 1):
        obj = {"k": obj}
    return obj


def _json(obj: Any) -> bytes:
    return orjson.dumps(obj)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param(None, "value is null", id="none"),
        pytest.param(b"", "value is empty", id="empty"),
        pytest.param(b"   ", "not valid JSON", id="whitespace"),
        pytest.param(b'{"text": "unterminated', "not valid JSON", id="malformed-json"),
        pytest.param(b'{"text": "a"} trailing', "not valid JSON", id="trailing-garbage"),
        pytest.param(b'{"text": "caf\xe9"}', "not valid UTF-8", id="invalid-utf8"),
        pytest.param(b"\x00\x01\x02\xff\xfe", "not valid UTF-8", id="binary"),
        pytest.param(b"\x00\x01\x02", "not valid JSON", id="binary-ascii"),
        pytest.param(b'["text"]', "an array", id="json-array"),
        pytest.param(b"42", "a number", id="json-number"),
        pytest.param(b'"text"', "a string", id="json-string"),
        pytest.param(b"null", "null", id="json-null"),
        pytest.param(b"true", "a boolean", id="json-bool"),
    ],
)
def test_values_that_are_not_json_objects_fail_at_deserialize(
    value: bytes | None, reason: str
) -> None:
    with pytest.raises(DeserializeError) as caught:
        decode_input(value, SETTINGS)
    assert caught.value.stage == "deserialize"
    assert reason in str(caught.value)
    assert isinstance(caught.value, EventError)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("obj", "field", "reason"),
    [
        pytest.param({"id": "1"}, "text", "Field required", id="missing-text"),
        pytest.param({"text": None}, "text", "valid string", id="null-text"),
        pytest.param({"text": 7}, "text", "valid string", id="number-text"),
        pytest.param({"text": ""}, "text", "must not be blank", id="empty-text"),
        pytest.param({"text": " \n\t "}, "text", "must not be blank", id="blank-text"),
        pytest.param({"text": "x" * 51}, "text", "max_text_chars=50", id="text-over-limit"),
        pytest.param({"text": "a", "labels": "a,b"}, "labels", "valid list", id="labels-string"),
        pytest.param({"text": "a", "labels": ["a", 1]}, "labels[1]", "valid string", id="int"),
        pytest.param({"text": "a", "labels": [["a"]]}, "labels[0]", "valid string", id="nested"),
        pytest.param({"text": "a", "labels": []}, "labels", "must not be empty", id="no-labels"),
        pytest.param({"text": "a", "labels": ["a", "a"]}, "labels", "unique", id="duplicates"),
        pytest.param({"text": "a", "labels": ["a", " "]}, "labels", "blank", id="blank-label"),
        pytest.param(
            {"text": "a", "labels": ["a", "b", "c", "d"]},
            "labels",
            "at most 3 labels",
            id="too-many-labels",
        ),
        pytest.param(
            {"text": "a", "hypothesis_template": "About sports."},
            "hypothesis_template",
            "exactly once",
            id="template-without-placeholder",
        ),
        pytest.param(
            {"text": "a", "hypothesis_template": "{} or {}"},
            "hypothesis_template",
            "exactly once",
            id="template-with-two-placeholders",
        ),
        pytest.param(
            {"text": "a", "multi_label": "true"}, "multi_label", "valid boolean", id="bool-str"
        ),
        pytest.param({"text": "a", "multi_label": 1}, "multi_label", "valid boolean", id="bool-1"),
        pytest.param({"text": "a", "id": 12}, "id", "valid string", id="numeric-id"),
        pytest.param({"text": "a", "metadata": [1]}, "metadata", "valid dictionary", id="meta"),
        pytest.param(
            {"text": "a", "labels": ["a", "b" * 201]}, "labels", "max_label_chars=200", id="label"
        ),
        pytest.param(
            {"text": "a", "metadata": {"k": "v" * 70_000}},
            "metadata",
            "max_metadata_bytes=65536",
            id="metadata-blob",
        ),
        pytest.param(
            {"text": "a", "metadata": _nested(17)},
            "metadata",
            "max_metadata_depth=16",
            id="metadata-depth",
        ),
    ],
)
def test_objects_breaking_the_contract_fail_at_validate(
    obj: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(ValidateError) as caught:
        decode_input(_json(obj), SETTINGS)
    assert caught.value.stage == "validate"
    assert isinstance(caught.value, EventError)
    message = str(caught.value)
    assert message.startswith(f"{field}: "), message
    assert reason in message
    assert caught.value.fields == (field.partition("[")[0],)


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("{:>1000000000}{{}}", id="format-spec-padding"),
        pytest.param("{.__class__.__mro__}{{}}", id="attribute-access"),
        pytest.param("{0}", id="positional-index"),
        pytest.param("{name}", id="named-field"),
        pytest.param("{!r}", id="conversion"),
        pytest.param("{}{{}}{:x}", id="second-field-with-spec"),
        pytest.param("about { sports", id="lone-brace"),
        pytest.param("{}" + "x" * MAX_TEMPLATE_CHARS, id="too-long"),
    ],
)
def test_hostile_templates_are_refused_at_validate_before_any_formatting(template: str) -> None:
    with pytest.raises(ValidateError) as caught:
        decode_input(_json({"text": "a", "hypothesis_template": template}), SETTINGS)
    assert caught.value.fields == ("hypothesis_template",)
    assert len(str(caught.value)) < 1000  # the message does not echo the template


@pytest.mark.parametrize(
    "template", ["This example is {}.", "{{braces}} and {}", "{} first", "{}", "x {} {{y}}"]
)
def test_an_accepted_template_renders_as_str_format_would(template: str) -> None:
    assert render_hypothesis(template, "sports") == template.format("sports")


def test_validate_error_names_every_broken_field_without_echoing_input() -> None:
    secret = "do-not-echo-this-value"
    obj = {"text": "", "labels": [secret, secret], "multi_label": secret}
    with pytest.raises(ValidateError) as caught:
        decode_input(_json(obj), SETTINGS)
    assert caught.value.fields == ("text", "labels", "multi_label")
    assert secret not in str(caught.value)


def test_validate_error_message_is_bounded() -> None:
    obj = {"text": "a", "labels": list(range(40))}
    with pytest.raises(ValidateError) as caught:
        decode_input(_json(obj), TaggingSettings(max_labels=100))
    message = str(caught.value)
    assert message.count("valid string") == 5
    assert message.endswith("and 35 more errors")


def test_minimal_event_decodes_with_unset_optionals() -> None:
    event = decode_input(b'{"text": "hello"}', SETTINGS)
    assert event == DecodedEvent(text="hello")
    assert event.labels is None
    assert event.multi_label is None
    assert event.hypothesis_template is None


def test_full_event_decodes_and_unknown_fields_are_ignored() -> None:
    obj = {
        "text": "The striker scored twice.",
        "id": "evt-1",
        "labels": ["sports", "finance"],
        "multi_label": False,
        "hypothesis_template": "This text is about {}.",
        "metadata": {"lang": "en", "nested": {"n": [1, 2.5, None]}},
        "unknown": {"anything": True},
        "priority": 3,
    }
    event = decode_input(_json(obj), SETTINGS)
    assert event.id == "evt-1"
    assert event.labels == ["sports", "finance"]
    assert event.multi_label is False
    assert event.hypothesis_template == "This text is about {}."
    assert event.metadata == {"lang": "en", "nested": {"n": [1, 2.5, None]}}
    assert "unknown" not in event._fields


def test_decode_accepts_memoryview_and_bytearray() -> None:
    raw = b'{"text": "hello"}'
    assert decode_input(memoryview(raw), SETTINGS).text == "hello"
    assert decode_input(bytearray(raw), SETTINGS).text == "hello"


def test_limits_come_from_settings() -> None:
    long_text = "x" * 200
    with pytest.raises(ValidateError):
        decode_input(_json({"text": long_text}), SETTINGS)
    relaxed = TaggingSettings(max_text_chars=200)
    assert decode_input(_json({"text": long_text}), relaxed).text == long_text


def test_defaults_apply_without_validation_context() -> None:
    InputEvent.model_validate({"text": "x" * DEFAULT_MAX_TEXT_CHARS})
    with pytest.raises(ValidationError):
        InputEvent.model_validate({"text": "x" * (DEFAULT_MAX_TEXT_CHARS + 1)})
    labels = [f"l{i}" for i in range(DEFAULT_MAX_LABELS + 1)]
    with pytest.raises(ValidationError):
        InputEvent.model_validate({"text": "a", "labels": labels})


def test_input_event_is_frozen() -> None:
    event = InputEvent(text="a")
    with pytest.raises(ValidationError):
        event.text = "b"  # type: ignore[misc]


def _scored(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "1",
        "source": Source(topic="t", partition=0, offset=1),
        "labels": ["a", "b"],
        "scores": [0.9, 0.1],
        "tags": ["a"],
        "multi_label": True,
        "hypothesis_template": "This example is {}.",
        "truncated": False,
        "model": ModelRef(name="m", revision="r"),
        "scored_at": datetime(2024, 1, 1, tzinfo=UTC),
    }
    base.update(overrides)
    return base


def test_scored_event_accepts_probabilities() -> None:
    event = ScoredEvent(**_scored(scores=[1.0, 0.0]))
    assert event.scores == [1.0, 0.0]
    assert event.nli is None
    assert event.metadata is None


@pytest.mark.parametrize("bad", [1.5, -0.01])
def test_scored_event_rejects_scores_outside_zero_one(bad: float) -> None:
    with pytest.raises(ValidationError, match="scores"):
        ScoredEvent(**_scored(scores=[bad, 0.1]))


def test_metadata_at_the_limits_is_accepted() -> None:
    event = decode_input(_json({"text": "a", "metadata": _nested(16)}), SETTINGS)
    assert event.metadata == _nested(16)
    roomy = TaggingSettings(max_metadata_depth=40, max_metadata_bytes=200_000)
    assert decode_input(_json({"text": "a", "metadata": _nested(30)}), roomy).metadata
