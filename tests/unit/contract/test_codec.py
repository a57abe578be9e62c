"""Requests from events, tags from scores, and the scored-event wire format."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from tests.support.oracle import build_scored_event, encode_scored_event
from worker.config.settings import TaggingSettings
from worker.contract.codec import encode_output, to_request
from worker.contract.events import DEFAULT_HYPOTHESIS_TEMPLATE, InputEvent, ScoredEvent, Source
from worker.contract.profiles import Profile
from worker.contract.scorer import LabelScores, ModelInfo, NliProbabilities, ScoreRequest
from worker.errors import NoLabelsError, ScoresError, ValidateError

SOURCE = Source(topic="events", partition=3, offset=41, timestamp=1_700_000_000_000)
MODEL = ModelInfo(name="org/model", revision="abc123", scorer="nli", device="cpu", dtype="float32")
SCORED_AT = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
SCORES = LabelScores(
    labels=("sports", "politics", "finance"),
    scores=(0.91, 0.5, 0.2),
    truncated=False,
)


def _build(
    event: InputEvent,
    tagging: TaggingSettings,
    scores: LabelScores = SCORES,
    scored_at: datetime = SCORED_AT,
) -> ScoredEvent:
    request = to_request(event, tagging)
    return build_scored_event(event, request, scores, SOURCE, tagging, MODEL, scored_at)


def test_request_takes_defaults_from_settings() -> None:
    tagging = TaggingSettings(labels=["a", "b"], multi_label=False, hypothesis_template="X {}")
    request = to_request(InputEvent(text="hello"), tagging)
    assert request == ScoreRequest(
        text="hello", labels=("a", "b"), multi_label=False, hypothesis_template="X {}"
    )


def test_event_values_override_settings() -> None:
    tagging = TaggingSettings(labels=["a", "b"], multi_label=True)
    event = InputEvent(text="t", labels=["c"], multi_label=False, hypothesis_template="About {}.")
    request = to_request(event, tagging)
    assert request.labels == ("c",)
    assert request.multi_label is False
    assert request.hypothesis_template == "About {}."


def test_default_template_and_multi_label() -> None:
    request = to_request(InputEvent(text="t", labels=["x"]), TaggingSettings())
    assert request.hypothesis_template == DEFAULT_HYPOTHESIS_TEMPLATE
    assert request.multi_label is True


def test_no_labels_anywhere_is_a_validate_error() -> None:
    with pytest.raises(NoLabelsError, match="no default labels") as caught:
        to_request(InputEvent(text="t"), TaggingSettings())
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, ValidateError)
    assert caught.value.stage == "validate"
    assert caught.value.fields == ("labels",)


def test_id_falls_back_to_record_coordinates() -> None:
    tagging = TaggingSettings(labels=["sports"])
    assert _build(InputEvent(text="t"), tagging).id == "events:3:41"
    assert _build(InputEvent(text="t", id="evt-9"), tagging).id == "evt-9"


def test_multi_label_tags_use_global_threshold_inclusively_in_score_order() -> None:
    tagging = TaggingSettings(labels=["finance", "politics", "sports"], threshold=0.5)
    scored = _build(InputEvent(text="t"), tagging)
    assert scored.tags == ["sports", "politics"]
    assert scored.labels == ["sports", "politics", "finance"]
    assert scored.scores == [0.91, 0.5, 0.2]
    assert scored.multi_label is True


def test_per_label_thresholds_override_the_global_one() -> None:
    tagging = TaggingSettings(
        labels=["sports"],
        threshold=0.5,
        label_thresholds={"sports": 0.95, "finance": 0.1},
    )
    assert _build(InputEvent(text="t"), tagging).tags == ["politics", "finance"]


def test_multi_label_can_yield_no_tags() -> None:
    tagging = TaggingSettings(labels=["sports"], threshold=0.99)
    assert _build(InputEvent(text="t"), tagging).tags == []


def test_single_label_tags_the_top_label_whatever_the_threshold() -> None:
    tagging = TaggingSettings(labels=["sports"], multi_label=False, threshold=0.99)
    scored = _build(InputEvent(text="t"), tagging)
    assert scored.tags == ["sports"]
    assert scored.multi_label is False


def test_event_multi_label_flag_decides_the_tagging_mode() -> None:
    tagging = TaggingSettings(labels=["sports"], multi_label=True)
    assert _build(InputEvent(text="t", multi_label=False), tagging).tags == ["sports"]


def test_scored_event_carries_request_model_and_metadata() -> None:
    tagging = TaggingSettings(labels=["sports"])
    metadata = {"lang": "en", "n": [1, 2]}
    scored = _build(InputEvent(text="t", metadata=metadata, hypothesis_template="On {}."), tagging)
    assert scored.hypothesis_template == "On {}."
    assert scored.model.name == "org/model"
    assert scored.model.revision == "abc123"
    assert scored.metadata == metadata
    assert scored.source == SOURCE
    assert scored.truncated is False


NLI = {
    "sports": NliProbabilities(entailment=0.9, contradiction=0.05, neutral=0.05),
    "politics": NliProbabilities(entailment=0.5, contradiction=0.5, neutral=None),
    "finance": NliProbabilities(entailment=0.2, contradiction=0.7, neutral=0.1),
}
SCORES_WITH_NLI = LabelScores(labels=SCORES.labels, scores=SCORES.scores, truncated=True, nli=NLI)


def test_nli_probabilities_only_when_enabled() -> None:
    off = _build(InputEvent(text="t"), TaggingSettings(labels=["a"]), SCORES_WITH_NLI)
    assert off.nli is None
    on_settings = TaggingSettings(labels=["a"], include_nli_probs=True)
    on = _build(InputEvent(text="t"), on_settings, SCORES_WITH_NLI)
    assert on.nli is not None
    assert list(on.nli) == ["sports", "politics", "finance"]
    assert on.nli["sports"].entailment == 0.9
    assert on.nli["politics"].neutral is None
    assert on.truncated is True


def test_nli_enabled_but_scorer_without_probabilities_gives_none() -> None:
    tagging = TaggingSettings(labels=["a"], include_nli_probs=True)
    assert _build(InputEvent(text="t"), tagging).nli is None


def test_encoding_is_compact_utc_z_and_omits_absent_nli() -> None:
    scored = _build(InputEvent(text="t", id="x"), TaggingSettings(labels=["a"]))
    raw = encode_scored_event(scored)
    assert b": " not in raw
    assert b", " not in raw
    obj = orjson.loads(raw)
    assert obj["scored_at"] == "2024-05-06T07:08:09.123456Z"
    assert "nli" not in obj
    assert obj["metadata"] is None
    assert obj["source"] == {
        "topic": "events",
        "partition": 3,
        "offset": 41,
        "timestamp": 1_700_000_000_000,
    }
    assert ScoredEvent.model_validate(obj) == scored


def test_encoding_keeps_nli_when_present() -> None:
    tagging = TaggingSettings(labels=["a"], include_nli_probs=True)
    scored = _build(InputEvent(text="t"), tagging, SCORES_WITH_NLI)
    obj = orjson.loads(encode_scored_event(scored))
    assert obj["nli"]["sports"] == {"entailment": 0.9, "contradiction": 0.05, "neutral": 0.05}
    assert obj["nli"]["politics"]["neutral"] is None
    assert ScoredEvent.model_validate(obj) == scored


def test_scored_at_is_converted_to_utc() -> None:
    plus_two = datetime(2024, 5, 6, 9, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    naive = datetime(2024, 5, 6, 7, 0, 0)
    tagging = TaggingSettings(labels=["a"])
    for moment in (plus_two, naive):
        obj = orjson.loads(
            encode_scored_event(_build(InputEvent(text="t"), tagging, SCORES, moment))
        )
        assert obj["scored_at"] == "2024-05-06T07:00:00Z"


def test_encoding_writes_the_same_bytes_as_the_pydantic_dump() -> None:
    """encode_scored_event writes the fields itself; it must match model_dump exactly."""
    options = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC
    with_nli = TaggingSettings(labels=["a"], include_nli_probs=True)
    events = [
        _build(InputEvent(text="t"), TaggingSettings(labels=["a"])),
        _build(InputEvent(text="t", id="x", metadata={"k": [1, {"n": None}]}), with_nli),
        _build(InputEvent(text="t", multi_label=False), with_nli, SCORES_WITH_NLI),
    ]
    profile = Profile("news", 7, ("a",), True, "It is {}.", 0.5)
    request = to_request(InputEvent(text="t"), with_nli, profile)
    events.append(
        build_scored_event(
            InputEvent(text="t"), request, SCORES, SOURCE, with_nli, MODEL, SCORED_AT, profile
        )
    )
    chunked = SCORES._replace(chunks=3)
    events.append(_build(InputEvent(text="t"), with_nli, chunked))
    for scored in events:
        optional = ("nli", "profile", "chunks_read")
        exclude = {name for name in optional if getattr(scored, name) is None}
        expected = orjson.dumps(scored.model_dump(exclude=exclude), option=options)
        assert encode_scored_event(scored) == expected


def test_scores_outside_zero_to_one_break_the_output_contract() -> None:
    bad = LabelScores(labels=("sports", "politics"), scores=(1.5, float("nan")), truncated=False)
    with pytest.raises(ValueError, match="scores"):
        _build(InputEvent(text="t"), TaggingSettings(labels=["a"]), bad)


class _Record:
    """The coordinates encode_output reads (InputRecord has them too)."""

    topic = SOURCE.topic
    partition = SOURCE.partition
    offset = SOURCE.offset
    timestamp_ms = SOURCE.timestamp


def test_encode_output_writes_the_bytes_of_the_built_scored_event() -> None:
    with_nli = TaggingSettings(labels=["a"], include_nli_probs=True)
    thresholds = TaggingSettings(labels=["a"], label_thresholds={"politics": 0.4})
    cases = [
        (InputEvent(text="t"), TaggingSettings(labels=["a"]), SCORES, SCORED_AT),
        (InputEvent(text="t", id="x", metadata={"k": [1, None]}), with_nli, SCORES, SCORED_AT),
        (InputEvent(text="t", multi_label=False), with_nli, SCORES_WITH_NLI, SCORED_AT),
        (InputEvent(text="t"), thresholds, SCORES_WITH_NLI, datetime(2024, 5, 6, 7, 0, 0)),
        (InputEvent(text="t"), with_nli, SCORES_WITH_NLI._replace(chunks=2), SCORED_AT),
    ]
    for event, tagging, scores, moment in cases:
        request = to_request(event, tagging)
        built = build_scored_event(event, request, scores, SOURCE, tagging, MODEL, moment)
        direct = encode_output(event, request, scores, _Record(), tagging, MODEL, moment)
        assert direct == encode_scored_event(built)


def test_encode_output_writes_every_field_of_the_contract_in_its_order() -> None:
    """A field added to ScoredEvent must reach the wire: the encoder writes the keys itself."""
    tagging = TaggingSettings(labels=["a"], include_nli_probs=True)
    event = InputEvent(text="t")
    profile = Profile("news", 7, ("sports", "politics"), True, "It is {}.", 0.5)
    request = to_request(event, tagging, profile)
    scores = SCORES_WITH_NLI._replace(chunks=4)
    raw = encode_output(event, request, scores, _Record(), tagging, MODEL, SCORED_AT, profile)
    assert list(orjson.loads(raw)) == list(ScoredEvent.model_fields)
    assert orjson.loads(raw)["chunks_read"] == 4


def test_chunks_read_is_left_out_in_truncate_mode() -> None:
    tagging = TaggingSettings(labels=["a"])
    event = InputEvent(text="t")
    raw = encode_output(
        event, to_request(event, tagging), SCORES, _Record(), tagging, MODEL, SCORED_AT
    )
    assert "chunks_read" not in orjson.loads(raw)


@pytest.mark.parametrize(
    "scores",
    [
        LabelScores(labels=("a", "b"), scores=(0.5, 1.5), truncated=False),
        LabelScores(labels=("a", "b"), scores=(0.5, float("nan")), truncated=False),
        LabelScores(labels=("a", "b"), scores=(0.5,), truncated=False),
        LabelScores(labels=("a", 7), scores=(0.5, 0.2), truncated=False),  # type: ignore[arg-type]
        LabelScores(labels=("a",), scores=("high",), truncated=False),  # type: ignore[arg-type]
    ],
)
def test_encode_output_refuses_scores_that_break_the_contract(scores: LabelScores) -> None:
    tagging = TaggingSettings(labels=["a"])
    event = InputEvent(text="t")
    with pytest.raises(ScoresError):
        encode_output(
            event, to_request(event, tagging), scores, _Record(), tagging, MODEL, SCORED_AT
        )


# -- label profiles ----------------------------------------------------------------------

NEWS = Profile(
    name="news",
    version=12,
    labels=("sports", "politics", "finance"),
    multi_label=False,
    hypothesis_template="This story is about {}.",
    threshold=0.9,
    label_thresholds={"politics": 0.4},
)


def test_a_profile_replaces_the_configured_defaults() -> None:
    tagging = TaggingSettings(labels=["weather"], multi_label=True, hypothesis_template="X {}")
    request = to_request(InputEvent(text="hello"), tagging, NEWS)
    assert request == ScoreRequest(
        text="hello",
        labels=("sports", "politics", "finance"),
        multi_label=False,
        hypothesis_template="This story is about {}.",
    )


def test_the_event_s_own_fields_win_over_its_profile() -> None:
    event = InputEvent(text="t", labels=["x"], multi_label=True, hypothesis_template="Y {}")
    request = to_request(event, TaggingSettings(), NEWS)
    assert request == ScoreRequest(
        text="t", labels=("x",), multi_label=True, hypothesis_template="Y {}"
    )


def test_a_profile_s_thresholds_make_the_tags_and_the_output_names_it() -> None:
    tagging = TaggingSettings(labels=["a"], threshold=0.1)
    event = InputEvent(text="t", multi_label=True)
    request = to_request(event, tagging, NEWS)
    raw = encode_output(event, request, SCORES, _Record(), tagging, MODEL, SCORED_AT, NEWS)
    scored = orjson.loads(raw)
    # sports 0.91 passes the profile's 0.9, politics 0.5 its own 0.4, finance 0.2 neither
    # (the settings' 0.1 would have tagged all three).
    assert scored["tags"] == ["sports", "politics"]
    assert scored["profile"] == {"name": "news", "version": 12}
    built = build_scored_event(event, request, SCORES, SOURCE, tagging, MODEL, SCORED_AT, NEWS)
    assert raw == encode_scored_event(built)


def test_without_a_profile_the_output_has_no_profile_field() -> None:
    tagging = TaggingSettings(labels=["a"])
    event = InputEvent(text="t")
    raw = encode_output(
        event, to_request(event, tagging), SCORES, _Record(), tagging, MODEL, SCORED_AT
    )
    assert "profile" not in orjson.loads(raw)
