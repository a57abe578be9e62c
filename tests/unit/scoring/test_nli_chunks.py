"""Long texts in chunk mode (TAGSTREAM_LONG_TEXT=chunk): windows, aggregation, the cap, parity."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from pydantic import ValidationError
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    pipeline,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from tests.support.models import BART_NLI_LABELS, parity_requests
from worker.config.settings import ModelSettings
from worker.contract.scorer import LabelScores, ScoreError, ScoreOutcome, ScoreRequest
from worker.errors import ScorerConfigError
from worker.scoring.embedding import load_embedding_scorer
from worker.scoring.nli import ChunkOptions, NliScorer
from worker.scoring.nli_pairs import ChunkPlan, premise_windows

FIXTURES = ("tiny_bart_dir", "tiny_deberta_dir", "tiny_two_class_dir")
TEMPLATE = "This example is {}."
TOLERANCE = 1e-5
# The tiny models read 128 tokens: pair = <s> premise </s></s> hypothesis </s>.
TINY_MAX_LENGTH = 128
BART_SPECIAL_TOKENS = 4
# Logit the keyword model gives entailment when both markers are in a pair, minus it when not.
KEYWORD_LOGIT = 6.0
# Filler without the markers: ~11 tokens a sentence, 40 sentences put the evidence ~440 in.
FILLER = "the team won the game and the fans sang at the stadium ."
FILLER_SENTENCES = 40
EVIDENCE = " a storm hit the city."
# test_nli's parity texts: the generated sentences (well under 100 tokens) fit a window,
# its long texts (40 sentences) do not.
FITS_CHARS = 400


class KeywordNli(torch.nn.Module):
    """An NLI "model" whose behaviour the test controls: a pair entails when its tokens hold
    both ``evidence`` (a premise word) and ``topic`` (the label's word in the hypothesis)."""

    def __init__(self, evidence: int, topic: int) -> None:
        super().__init__()
        self.config = PretrainedConfig(
            id2label=BART_NLI_LABELS,
            label2id={name: i for i, name in BART_NLI_LABELS.items()},
        )
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the scorer reads its device
        self.evidence = evidence
        self.topic = topic
        self.batches: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        self.batches.append(input_ids.clone())
        found = (input_ids == self.evidence).any(dim=1) & (input_ids == self.topic).any(dim=1)
        entail = torch.where(found, KEYWORD_LOGIT, -KEYWORD_LOGIT)
        logits = torch.stack([-entail, torch.zeros_like(entail), entail], dim=1)
        return SequenceClassifierOutput(logits=logits + self.anchor)


def _tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(directory)


def _one_token(tokenizer: PreTrainedTokenizerBase, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (word, ids)
    return int(ids[0])


def _keyword_scorer(
    tokenizer: PreTrainedTokenizerBase, chunking: ChunkOptions | None
) -> tuple[NliScorer, KeywordNli]:
    model = KeywordNli(_one_token(tokenizer, " storm"), _one_token(tokenizer, " weather"))
    return NliScorer(cast(Any, model), tokenizer, chunking=chunking), model


def _long_text(evidence: bool = True) -> str:
    return " ".join([FILLER] * FILLER_SENTENCES) + (EVIDENCE if evidence else "")


def _scored(outcomes: list[ScoreOutcome]) -> list[LabelScores]:
    assert all(isinstance(o, LabelScores) for o in outcomes), outcomes
    return cast(list[LabelScores], outcomes)


def _score_of(outcome: LabelScores, label: str) -> float:
    return outcome.scores[outcome.labels.index(label)]


def _premise_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _expected_chunks(tokens: int, window: int, stride: int) -> int:
    return 1 + math.ceil(max(tokens - window, 0) / stride)


# -- windows -----------------------------------------------------------------------------


def test_a_premise_that_fits_is_one_window_itself() -> None:
    premise = list(range(7))
    windows, capped = premise_windows(premise, ChunkPlan.of(7, 2, 4))
    assert windows == [premise]
    assert capped is False


def test_windows_overlap_and_the_last_ends_with_the_premise() -> None:
    windows, capped = premise_windows(list(range(10)), ChunkPlan.of(4, 1, 8))
    assert [list(w) for w in windows] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert capped is False
    windows, _ = premise_windows(list(range(11)), ChunkPlan.of(4, 1, 8))
    assert [list(w) for w in windows][-1] == [9, 10]


def test_the_cap_keeps_the_first_windows_and_says_text_was_left() -> None:
    windows, capped = premise_windows(list(range(10)), ChunkPlan.of(4, 1, 2))
    assert [list(w) for w in windows] == [[0, 1, 2, 3], [3, 4, 5, 6]]
    assert capped is True
    # Exactly covered by the cap: nothing left.
    windows, capped = premise_windows(list(range(7)), ChunkPlan.of(4, 1, 2))
    assert (len(windows), capped) == (2, False)


def test_the_overlap_is_kept_to_half_a_window() -> None:
    assert ChunkPlan.of(10, 9, 3).stride == 5
    assert ChunkPlan.of(10, 0, 3).stride == 10
    assert ChunkPlan.of(10, 3, 3).most_tokens == 10 + 2 * 7
    with pytest.raises(ValueError, match="at least 1"):
        ChunkPlan.of(0, 0, 1)


# -- the evidence at the end -----------------------------------------------------------


def test_evidence_only_at_the_end_is_found_with_chunk_and_missed_with_truncate(
    tiny_bart_dir: Path,
) -> None:
    tokenizer = _tokenizer(tiny_bart_dir)
    request = ScoreRequest(_long_text(), ("weather", "sports"), True, TEMPLATE)
    truncating, _ = _keyword_scorer(tokenizer, None)
    chunking, _ = _keyword_scorer(tokenizer, ChunkOptions(max_chunks=16))

    [cut] = _scored(truncating.score([request]))
    [read] = _scored(chunking.score([request]))

    assert _score_of(cut, "weather") < 0.01
    assert cut.truncated is True
    assert cut.chunks is None
    assert _score_of(read, "weather") > 0.99
    assert read.labels[0] == "weather"
    assert _score_of(read, "sports") < 0.01
    assert read.truncated is False
    assert read.chunks is not None and read.chunks > 1


def test_the_same_text_without_the_evidence_stays_low_in_chunk_mode(tiny_bart_dir: Path) -> None:
    scorer, _ = _keyword_scorer(_tokenizer(tiny_bart_dir), ChunkOptions(max_chunks=16))
    request = ScoreRequest(_long_text(evidence=False), ("weather",), True, TEMPLATE)
    [outcome] = _scored(scorer.score([request]))
    assert outcome.scores[0] < 0.01


def test_past_the_cap_an_event_is_scored_on_its_first_chunks_and_says_so(
    tiny_bart_dir: Path,
) -> None:
    scorer, _ = _keyword_scorer(_tokenizer(tiny_bart_dir), ChunkOptions(max_chunks=2))
    request = ScoreRequest(_long_text(), ("weather",), True, TEMPLATE)
    [outcome] = _scored(scorer.score([request]))
    assert outcome.chunks == 2
    assert outcome.truncated is True
    assert outcome.scores[0] < 0.01  # the evidence lies past the second window


def test_mean_aggregation_averages_the_windows(tiny_bart_dir: Path) -> None:
    tokenizer = _tokenizer(tiny_bart_dir)
    scorer, _ = _keyword_scorer(tokenizer, ChunkOptions(max_chunks=16, aggregation="mean"))
    [outcome] = _scored(scorer.score([ScoreRequest(_long_text(), ("weather",), True, TEMPLATE)]))
    assert outcome.chunks is not None
    high = 1 / (1 + math.exp(-2 * KEYWORD_LOGIT))  # softmax over [contradiction, entailment]
    low = 1 - high
    # Only the last window holds the evidence (the overlap is far shorter than a window).
    expected = (high + (outcome.chunks - 1) * low) / outcome.chunks
    assert outcome.scores[0] == pytest.approx(expected, abs=1e-9)


def test_single_label_softmaxes_the_aggregated_entailment_logits(tiny_bart_dir: Path) -> None:
    scorer, _ = _keyword_scorer(_tokenizer(tiny_bart_dir), ChunkOptions(max_chunks=16))
    request = ScoreRequest(_long_text(), ("weather", "sports"), False, TEMPLATE)
    [outcome] = _scored(scorer.score([request]))
    assert outcome.labels == ("weather", "sports")
    expected = 1 / (1 + math.exp(-2 * KEYWORD_LOGIT))  # softmax of [+6, -6]
    assert outcome.scores[0] == pytest.approx(expected, abs=1e-9)
    assert sum(outcome.scores) == pytest.approx(1.0)


def test_nli_probabilities_come_from_the_window_that_gave_the_score(tiny_bart_dir: Path) -> None:
    tokenizer = _tokenizer(tiny_bart_dir)
    model = KeywordNli(_one_token(tokenizer, " storm"), _one_token(tokenizer, " weather"))
    scorer = NliScorer(
        cast(Any, model), tokenizer, include_nli_probs=True, chunking=ChunkOptions(max_chunks=16)
    )
    [outcome] = _scored(scorer.score([ScoreRequest(_long_text(), ("weather",), True, TEMPLATE)]))
    assert outcome.nli is not None
    assert outcome.nli["weather"].entailment > 0.99


def test_a_hypothesis_that_leaves_no_room_fails_only_its_event(tiny_bart_dir: Path) -> None:
    scorer, _ = _keyword_scorer(_tokenizer(tiny_bart_dir), ChunkOptions())
    wordy = "This text, " + "which is long, " * 30 + "is about {}."
    outcomes = scorer.score(
        [
            ScoreRequest(_long_text(), ("weather",), True, wordy),
            ScoreRequest(_long_text(), ("weather",), True, TEMPLATE),
        ]
    )
    failed, scored = outcomes
    assert isinstance(failed, ScoreError)
    assert failed.error_class == "HypothesisTooLongError"
    assert "no room for the text" in failed.message
    assert isinstance(scored, LabelScores)


# -- windows on the real tokenizer, in the same batches ---------------------------------


def _premises_seen(model: KeywordNli, eos: int) -> list[tuple[list[int], list[int]]]:
    """(premise, hypothesis) of every row the model saw: <s> premise </s></s> hyp </s>."""
    seen = []
    for batch in model.batches:
        for row in batch.tolist():
            end = row.index(eos)
            rest = row[end + 2 :]
            seen.append((row[1:end], rest[: rest.index(eos)]))
    return seen


def test_windows_follow_the_tokenizer_with_the_configured_overlap(tiny_bart_dir: Path) -> None:
    tokenizer = _tokenizer(tiny_bart_dir)
    overlap = 16
    scorer, model = _keyword_scorer(tokenizer, ChunkOptions(overlap_tokens=overlap, max_chunks=32))
    text = _long_text()
    scorer.score([ScoreRequest(text, ("weather",), True, TEMPLATE)])

    tokens = _premise_tokens(tokenizer, text)
    hypothesis = _premise_tokens(tokenizer, TEMPLATE.format("weather"))
    window = TINY_MAX_LENGTH - BART_SPECIAL_TOKENS - len(hypothesis)
    seen = _premises_seen(model, int(tokenizer.eos_token_id))
    assert all(h == hypothesis for _, h in seen)
    stride = window - overlap
    starts = range(0, len(tokens) - overlap, stride)
    expected = [tokens[start : start + window] for start in starts]
    assert len(expected) == _expected_chunks(len(tokens), window, stride) > 1
    assert sorted(p for p, _ in seen) == sorted(expected)
    # Consecutive windows share `overlap` tokens and the last one ends with the text.
    assert all(a[-overlap:] == b[:overlap] for a, b in itertools.pairwise(expected))
    assert expected[-1][-1:] == tokens[-1:]
    assert all(len(p) == window for p in expected[:-1])


def test_a_shorter_window_setting_is_obeyed(tiny_bart_dir: Path) -> None:
    tokenizer = _tokenizer(tiny_bart_dir)
    scorer, model = _keyword_scorer(
        tokenizer, ChunkOptions(window_tokens=40, overlap_tokens=8, max_chunks=64)
    )
    text = _long_text()
    [outcome] = _scored(scorer.score([ScoreRequest(text, ("weather",), True, TEMPLATE)]))
    tokens = _premise_tokens(tokenizer, text)
    assert outcome.chunks == _expected_chunks(len(tokens), 40, 32)
    premises = [p for p, _ in _premises_seen(model, int(tokenizer.eos_token_id))]
    assert max(len(p) for p in premises) == 40


def test_the_window_leaves_room_for_the_longest_hypothesis_of_the_event(
    tiny_bart_dir: Path,
) -> None:
    tokenizer = _tokenizer(tiny_bart_dir)
    scorer, model = _keyword_scorer(tokenizer, ChunkOptions(max_chunks=32))
    labels = ("weather", "science and research and education")
    scorer.score([ScoreRequest(_long_text(), labels, True, TEMPLATE)])
    longest = max(len(_premise_tokens(tokenizer, TEMPLATE.format(label))) for label in labels)
    window = TINY_MAX_LENGTH - BART_SPECIAL_TOKENS - longest
    for batch in model.batches:
        assert batch.shape[1] <= TINY_MAX_LENGTH
    premises = [p for p, _ in _premises_seen(model, int(tokenizer.eos_token_id))]
    assert max(len(p) for p in premises) == window


def test_chunk_pairs_of_several_events_share_the_planned_batches(tiny_bart_dir: Path) -> None:
    tokenizer = _tokenizer(tiny_bart_dir)
    scorer, model = _keyword_scorer(tokenizer, ChunkOptions(max_chunks=16))
    topics = {_one_token(tokenizer, " weather"), _one_token(tokenizer, " sports")}
    requests = [
        ScoreRequest(_long_text(), ("weather",), True, TEMPLATE),
        ScoreRequest(_long_text(), ("sports",), True, TEMPLATE),
    ]
    outcomes = _scored(scorer.score(requests))
    chunks = [outcome.chunks or 0 for outcome in outcomes]
    assert chunks[0] == chunks[1] > 2
    assert sum(batch.shape[0] for batch in model.batches) == sum(chunks)
    # However the plan cuts the rows, each forward pass holds windows of both events.
    for batch in model.batches:
        assert {topic for topic in topics if bool((batch == topic).any())} == topics
    assert [o.scores[0] > 0.99 for o in outcomes] == [True, False]


def test_estimate_counts_the_windows(tiny_bart_dir: Path) -> None:
    tokenizer = _tokenizer(tiny_bart_dir)
    truncating, _ = _keyword_scorer(tokenizer, None)
    chunking, _ = _keyword_scorer(tokenizer, ChunkOptions(max_chunks=4))
    long = ScoreRequest(_long_text(), ("weather", "sports"), True, TEMPLATE)
    short = ScoreRequest("the team won.", ("weather", "sports"), True, TEMPLATE)
    assert chunking.estimate_tokens(short) == truncating.estimate_tokens(short)
    assert chunking.estimate_tokens(long) == 4 * truncating.estimate_tokens(long)


# -- parity when the text fits one window -----------------------------------------------


def _load(directory: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def _short_requests() -> list[ScoreRequest]:
    """The parity requests whose texts fit one window."""
    return [r for r in parity_requests() if len(r.text) < FITS_CHARS]


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("aggregation", ["max", "mean"])
def test_a_text_that_fits_one_window_scores_as_the_pipeline(
    fixture: str, aggregation: str, request: pytest.FixtureRequest
) -> None:
    model, tokenizer = _load(request.getfixturevalue(fixture))
    zero_shot = pipeline("zero-shot-classification", model=model, tokenizer=cast(Any, tokenizer))
    options = ChunkOptions(aggregation=cast(Any, aggregation))
    chunking = NliScorer(model, tokenizer, chunking=options, include_nli_probs=True)
    truncating = NliScorer(model, tokenizer, include_nli_probs=True)
    requests = _short_requests()
    assert len(requests) == 8

    chunked = _scored(chunking.score(requests))
    plain = _scored(truncating.score(requests))

    for req, got, same in zip(requests, chunked, plain, strict=True):
        assert (got.labels, got.scores, got.nli) == (same.labels, same.scores, same.nli)
        assert got.chunks == 1
        assert got.truncated is False
        result = zero_shot(
            req.text,
            candidate_labels=list(req.labels),
            multi_label=req.multi_label,
            hypothesis_template=req.hypothesis_template,
        )
        assert list(got.labels) == list(result["labels"])
        assert max(abs(a - b) for a, b in zip(got.scores, result["scores"], strict=True)) <= (
            TOLERANCE
        )


# -- settings and start-up ----------------------------------------------------------------


def test_from_settings_reads_the_chunk_settings(tiny_bart_dir: Path) -> None:
    settings = ModelSettings(
        model=str(tiny_bart_dir), device="cpu", long_text="chunk", max_chunks=3
    )
    scorer = NliScorer.from_settings(settings)
    [outcome] = _scored(scorer.score([ScoreRequest(_long_text(), ("weather",), True, TEMPLATE)]))
    assert outcome.chunks == 3
    assert outcome.truncated is True
    assert ChunkOptions.from_settings(ModelSettings()) is None


def test_chunk_mode_needs_a_reproducible_pair_layout(
    tiny_bart_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = _load(tiny_bart_dir)
    monkeypatch.setattr("worker.scoring.nli.derive_pair_template", lambda *_: None)
    with pytest.raises(ScorerConfigError, match="TAGSTREAM_LONG_TEXT"):
        NliScorer(model, tokenizer, chunking=ChunkOptions())
    NliScorer(model, tokenizer)  # truncate mode falls back to the tokenizer


def test_the_embedding_scorer_refuses_chunk_mode_naming_the_setting() -> None:
    with pytest.raises(ScorerConfigError, match="TAGSTREAM_LONG_TEXT=chunk"):
        load_embedding_scorer(ModelSettings(scorer="embedding", long_text="chunk"))


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"long_text": "split"}, "long_text"),
        ({"chunk_aggregation": "median"}, "chunk_aggregation"),
        ({"max_chunks": 0}, "max_chunks"),
        ({"chunk_tokens": -1}, "chunk_tokens"),
        ({"chunk_tokens": 100, "chunk_overlap_tokens": 51}, "TAGSTREAM_CHUNK_OVERLAP_TOKENS"),
    ],
)
def test_bad_chunk_settings_are_refused_naming_the_setting(
    values: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError, match=named):
        ModelSettings(**values)


def test_chunk_settings_defaults() -> None:
    settings = ModelSettings()
    assert (settings.long_text, settings.chunk_tokens, settings.chunk_overlap_tokens) == (
        "truncate",
        0,
        64,
    )
    assert (settings.max_chunks, settings.chunk_aggregation) == (4, "max")
