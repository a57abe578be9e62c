"""Property-based tests of the decoder and validator: whatever a producer sends, the worker
gets an event or an EventError, never another exception, and what it accepts it can encode.

Bounded in examples and size so the suite stays fast; no deadline (a shared CI machine).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.config.settings import TaggingSettings
from worker.contract.codec import (
    decode_input,
    encode_output,
    fast_event,
    to_request,
    validate_event,
)
from worker.contract.events import DecodedEvent
from worker.contract.scorer import LabelScores, ModelInfo
from worker.errors import EventError

EXAMPLES: Final = 200
TAGGING: Final = TaggingSettings(labels=["sports", "finance"], max_text_chars=500, max_labels=8)
MODEL: Final = ModelInfo(name="m", revision="r", scorer="nli", device="cpu", dtype="float32")
FUZZ: Final = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class _Record:
    topic, partition, offset, timestamp_ms = "news", 0, 7, 1_700_000_000_000


def _decode(value: bytes) -> DecodedEvent | EventError:
    try:
        return decode_input(value, TAGGING)
    except EventError as exc:
        return exc


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson writes
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
# Objects that look like events: the contract's fields, with values of any JSON type.
event_like = st.fixed_dictionaries(
    {},
    optional={
        "text": st.text(max_size=600) | json_values,
        "id": st.text(max_size=20) | json_values,
        "labels": st.lists(st.text(max_size=12), max_size=10) | json_values,
        "multi_label": st.booleans() | json_values,
        "hypothesis_template": st.text(max_size=40) | st.sampled_from(["{}", "a {} b", "{:>9}"]),
        "metadata": st.dictionaries(st.text(max_size=8), json_values, max_size=4) | json_values,
        "profile": st.text(max_size=12)
        | st.sampled_from(["default", "news.v2", "a" * 101, "-x", "é"])
        | json_values,
    },
)


@FUZZ
@given(st.binary(max_size=2048))
def test_any_bytes_decode_to_an_event_or_an_event_error(value: bytes) -> None:
    assert isinstance(_decode(value), DecodedEvent | EventError)


@FUZZ
@given(event_like)
def test_any_event_like_object_decodes_to_an_event_or_an_event_error(obj: dict[str, Any]) -> None:
    assert isinstance(_decode(orjson.dumps(obj)), DecodedEvent | EventError)


@FUZZ
@given(event_like)
def test_an_accepted_event_is_encoded_into_a_valid_scored_event(obj: dict[str, Any]) -> None:
    event = _decode(orjson.dumps(obj))
    if not isinstance(event, DecodedEvent):
        return
    try:
        request = to_request(event, TAGGING)
    except EventError:
        return
    ranked = tuple(reversed(request.labels))
    scores = LabelScores(labels=ranked, scores=tuple(0.5 for _ in ranked), truncated=False)
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    raw = encode_output(event, request, scores, _Record(), TAGGING, MODEL, moment)
    scored = orjson.loads(raw)
    assert scored["labels"] == list(ranked)
    assert scored["metadata"] == event.metadata
    assert scored["hypothesis_template"] == request.hypothesis_template


# Plainly valid events, most of which the fast path takes on its own.
plain_events = st.fixed_dictionaries(
    {"text": st.text(min_size=1, max_size=600)},
    optional={
        "id": st.none() | st.text(max_size=20),
        "labels": st.none() | st.lists(st.text(min_size=1, max_size=12), max_size=10),
        "multi_label": st.none() | st.booleans(),
        "hypothesis_template": st.none() | st.sampled_from(["{}", "a {} b", "{:>9}", "{", ""]),
        "metadata": st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        "extra": json_values,
    },
)


def _judged_alike(obj: dict[str, Any]) -> None:
    """What the fast path accepts, the model accepts as the same event; what the model
    refuses, the fast path leaves to it."""
    fast = fast_event(obj, TAGGING)
    try:
        judged: DecodedEvent | EventError = validate_event(obj, TAGGING)
    except EventError as exc:
        judged = exc
    if fast is not None:
        assert fast == judged
    if isinstance(judged, EventError):
        assert fast is None


@FUZZ
@given(event_like)
def test_the_fast_path_never_accepts_what_the_model_refuses(obj: dict[str, Any]) -> None:
    _judged_alike(orjson.loads(orjson.dumps(obj)))


@FUZZ
@given(plain_events)
def test_the_fast_path_decodes_plain_events_as_the_model_does(obj: dict[str, Any]) -> None:
    _judged_alike(orjson.loads(orjson.dumps(obj)))


def test_the_fast_path_takes_the_common_event_shapes() -> None:
    event = {
        "id": "e-1",
        "text": "a headline",
        "labels": ["sports", "finance"],
        "multi_label": False,
        "hypothesis_template": "About {}.",
        "metadata": {"source": "wire", "n": [1, 2]},
    }
    assert fast_event(event, TAGGING) == validate_event(event, TAGGING)
    assert fast_event({"text": "only text"}, TAGGING) == DecodedEvent("only text")
    for broken in ({"text": " "}, {"text": "a", "multi_label": 1}, {"text": "a", "labels": []}):
        assert fast_event(broken, TAGGING) is None
