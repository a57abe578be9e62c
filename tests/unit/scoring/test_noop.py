"""The no-model scorer: loadable by import path, deterministic, well-formed outcomes."""

from __future__ import annotations

import math
import zlib

import pytest

from worker.config.settings import ModelSettings
from worker.contract.scorer import LabelScores, Scorer, ScoreRequest
from worker.scoring.factory import build_scorer
from worker.scoring.noop import NoopScorer

LABELS = ("sports", "finance", "politics", "weather", "music")
TEMPLATE = "This example is {}."


def _request(
    text: str, *, multi_label: bool = True, labels: tuple[str, ...] = LABELS
) -> ScoreRequest:
    return ScoreRequest(
        text=text, labels=labels, multi_label=multi_label, hypothesis_template=TEMPLATE
    )


def _scores(outcome: object) -> LabelScores:
    assert isinstance(outcome, LabelScores)
    return outcome


def test_the_worker_builds_it_from_its_import_path() -> None:
    settings = ModelSettings(scorer="worker.scoring.noop:NoopScorer", max_batch_tokens=4096)
    scorer = build_scorer(settings)
    assert isinstance(scorer, NoopScorer)
    assert isinstance(scorer, Scorer)
    assert scorer.max_batch_tokens == 4096
    assert scorer.info.name == "noop"


def test_one_outcome_per_request_in_order_with_every_label_ranked() -> None:
    texts = [f"Event {i}: the match ended in a draw." for i in range(20)]
    outcomes = NoopScorer().score([_request(text) for text in texts])
    assert len(outcomes) == len(texts)
    for outcome in outcomes:
        scores = _scores(outcome)
        assert sorted(scores.labels) == sorted(LABELS)
        assert list(scores.scores) == sorted(scores.scores, reverse=True)
        assert all(0.0 <= score <= 1.0 for score in scores.scores)
        assert scores.truncated is False
    # Scores depend on the text: twenty texts do not all rank the labels alike.
    assert len({_scores(outcome).labels for outcome in outcomes}) > 1


def test_scores_are_the_same_in_every_instance_and_every_call() -> None:
    request = _request("Shares of the chipmaker jumped after record profits.")
    first = NoopScorer().score([request])[0]
    again = NoopScorer(ModelSettings(scorer="worker.scoring.noop:NoopScorer")).score([request])[0]
    assert first == again
    # Fixed by the hash, not by the process: a CRC-32 of the text then the label.
    expected = {label: _crc_score(request.text, label) for label in LABELS}
    scores = _scores(first)
    assert dict(zip(scores.labels, scores.scores, strict=True)) == pytest.approx(expected)


def _crc_score(text: str, label: str) -> float:
    return (zlib.crc32(label.encode(), zlib.crc32(text.encode())) & 0xFFFF) / 0xFFFF


def test_single_label_scores_sum_to_one() -> None:
    scores = _scores(
        NoopScorer().score([_request("A storm hits the coast.", multi_label=False)])[0]
    )
    assert math.isclose(sum(scores.scores), 1.0)
    multi = _scores(NoopScorer().score([_request("A storm hits the coast.")])[0])
    assert not math.isclose(sum(multi.scores), 1.0)


def test_token_estimate_grows_with_text_and_labels() -> None:
    scorer = NoopScorer()
    short = scorer.estimate_tokens(_request("a" * 40))
    long = scorer.estimate_tokens(_request("a" * 400))
    fewer = scorer.estimate_tokens(_request("a" * 40, labels=LABELS[:2]))
    # 5 labels x (10 text tokens + 4 special + ceil((17 + len(label)) / 4) hypothesis tokens)
    assert short == sum(14 + -(-(17 + len(label)) // 4) for label in LABELS)
    assert long == short + 5 * 90
    assert fewer < short


def test_a_text_that_is_not_valid_utf8_still_gets_scores() -> None:
    scores = _scores(NoopScorer().score([_request("lone surrogate \ud800 here")])[0])
    assert len(scores.scores) == len(LABELS)
