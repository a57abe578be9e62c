"""NliScorer: exact parity with transformers' zero-shot pipeline, batching, failure isolation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from structlog.testing import capture_logs
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    pipeline,
)

from tests.support.models import (
    CUSTOM_TEMPLATE,
    LABEL_WORDS,
    PARITY_LABELS,
    TEMPLATE,
    generated_sentences,
    long_text,
    parity_requests,
)
from worker.config.settings import ModelSettings
from worker.contract.scorer import LabelScores, ScoreError, ScoreOutcome, Scorer, ScoreRequest
from worker.errors import DeviceError
from worker.scoring.batching import PAD_MULTIPLE, RECOVER_AFTER_CLEAN_CALLS, plan_batches
from worker.scoring.cache import MAX_CACHED_HYPOTHESIS_CHARS
from worker.scoring.factory import build_scorer
from worker.scoring.nli import MIN_ROW_FILL, NliLabelIndices, NliScorer

FIXTURES = ("tiny_bart_dir", "tiny_deberta_dir", "tiny_two_class_dir")
TOLERANCE = 1e-5
LABELS = PARITY_LABELS


def _load(directory: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def _pipeline_outcome(zero_shot: Any, request: ScoreRequest) -> tuple[list[str], list[float]]:
    result = zero_shot(
        request.text,
        candidate_labels=list(request.labels),
        multi_label=request.multi_label,
        hypothesis_template=request.hypothesis_template,
    )
    return list(result["labels"]), [float(s) for s in result["scores"]]


def _scores(outcomes: Sequence[ScoreOutcome]) -> list[LabelScores]:
    scored = [o for o in outcomes if isinstance(o, LabelScores)]
    assert len(scored) == len(outcomes), outcomes
    return scored


class RecordingModel(torch.nn.Module):
    """Wraps a real model: records every batch, and can fail like a broken or full device."""

    def __init__(
        self,
        inner: PreTrainedModel,
        fail_token: int | None = None,
        oom_above_tokens: int | None = None,
        oom_once: bool = True,
        nan_token: int | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.config: PretrainedConfig = inner.config
        self.fail_token = fail_token
        self.oom_above_tokens = oom_above_tokens
        self.oom_once = oom_once
        self.nan_token = nan_token
        self.batches: list[dict[str, torch.Tensor]] = []
        self.ooms = 0

    def forward(self, **inputs: torch.Tensor) -> Any:
        ids = inputs["input_ids"]
        self.batches.append({key: value.clone() for key, value in inputs.items()})
        if self.fail_token is not None and bool((ids == self.fail_token).any()):
            raise RuntimeError(f"marker token {self.fail_token} in batch")
        if self.oom_above_tokens is not None and ids.numel() > self.oom_above_tokens:
            if self.oom_once:
                self.oom_above_tokens = None  # only the first big forward runs out of memory
            self.ooms += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        output = self.inner(**inputs)
        if self.nan_token is not None:
            output.logits[(ids == self.nan_token).any(dim=1)] = float("nan")
        return output

    @property
    def rows_seen(self) -> int:
        return sum(batch["input_ids"].shape[0] for batch in self.batches)


# -- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("max_batch_tokens", [256, 16_384])
def test_scores_match_the_pipeline(
    fixture: str, max_batch_tokens: int, request: pytest.FixtureRequest
) -> None:
    model, tokenizer = _load(request.getfixturevalue(fixture))
    zero_shot = pipeline("zero-shot-classification", model=model, tokenizer=cast(Any, tokenizer))
    scorer = NliScorer(model, tokenizer, max_batch_tokens=max_batch_tokens)
    requests = parity_requests()

    outcomes = _scores(scorer.score(requests))

    all_scores: list[float] = []
    for req, outcome in zip(requests, outcomes, strict=True):
        labels, scores = _pipeline_outcome(zero_shot, req)
        assert list(outcome.labels) == labels, req
        assert max(abs(a - b) for a, b in zip(outcome.scores, scores, strict=True)) <= TOLERANCE
        assert list(outcome.scores) == sorted(outcome.scores, reverse=True)
        assert outcome.nli is None
        all_scores.extend(outcome.scores)
    # The comparison means something only if the scores really differ.
    assert max(all_scores) - min(all_scores) > 0.4
    multi = [s for r, o in zip(requests, outcomes, strict=True) if r.multi_label for s in o.scores]
    assert max(multi) - min(multi) > 0.2
    assert [o.truncated for o in outcomes] == [False] * 8 + [True, True]


@pytest.mark.parametrize("fixture", FIXTURES)
def test_pairs_are_encoded_exactly_as_the_tokenizer_encodes_them(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    model, tokenizer = _load(request.getfixturevalue(fixture))
    recorder = RecordingModel(model)
    scorer = NliScorer(recorder, tokenizer)
    assert scorer.pair_template is not None
    texts = [
        "Short one.",
        "  Leading spaces, UPPER case and punctuation?! Café naïve — done.  ",
        long_text(),
    ]
    hypotheses = {CUSTOM_TEMPLATE.format(label) for label in ("sports", "health care")}
    scorer.score([ScoreRequest(t, ("sports", "health care"), True, CUSTOM_TEMPLATE) for t in texts])

    seen: set[tuple[tuple[int, ...], tuple[int, ...] | None]] = set()
    for batch in recorder.batches:
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][row].sum())
            ids = tuple(batch["input_ids"][row, :length].tolist())
            types = batch.get("token_type_ids")
            seen.add((ids, None if types is None else tuple(types[row, :length].tolist())))
    expected = set()
    for text in texts:
        for hypothesis in hypotheses:
            encoding = tokenizer(text, hypothesis, truncation="only_first")
            types = encoding.get("token_type_ids")
            expected.add((tuple(encoding["input_ids"]), None if types is None else tuple(types)))
    assert seen == expected
    uses_types = "token_type_ids" in tokenizer.model_input_names
    assert all((types is not None) == uses_types for _, types in seen)


def test_tokenizer_fallback_scores_the_same(tiny_deberta_dir: Path) -> None:
    model, tokenizer = _load(tiny_deberta_dir)
    requests = parity_requests()
    expected = _scores(NliScorer(model, tokenizer).score(requests))
    fallback = NliScorer(model, tokenizer)
    fallback._template = None  # as for a tokenizer whose pair layout cannot be reproduced
    for got, want in zip(_scores(fallback.score(requests)), expected, strict=True):
        assert got.labels == want.labels and got.truncated == want.truncated
        assert max(abs(a - b) for a, b in zip(got.scores, want.scores, strict=True)) <= TOLERANCE


@pytest.mark.parametrize("fixture", ["tiny_bart_dir", "tiny_two_class_dir"])
def test_nli_probabilities_are_the_softmax_over_all_classes(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    model, tokenizer = _load(request.getfixturevalue(fixture))
    scorer = NliScorer(model, tokenizer, include_nli_probs=True)
    text = next(generated_sentences(1, seed=3))
    (outcome,) = _scores(scorer.score([ScoreRequest(text, ("sports", "music"), False, TEMPLATE)]))
    assert outcome.nli is not None and set(outcome.nli) == {"sports", "music"}
    label2id = {str(name): int(index) for name, index in (model.config.label2id or {}).items()}
    for label, probs in outcome.nli.items():
        with torch.no_grad():
            logits = model(**tokenizer(text, TEMPLATE.format(label), return_tensors="pt")).logits
        expected = torch.softmax(logits[0].double(), dim=-1)
        assert probs.entailment == pytest.approx(float(expected[label2id["entailment"]]), abs=1e-6)
        if "neutral" in label2id:
            assert probs.neutral is not None
            assert probs.contradiction == pytest.approx(
                float(expected[label2id["contradiction"]]), abs=1e-6
            )
            assert probs.entailment + probs.contradiction + probs.neutral == pytest.approx(1.0)
        else:
            assert probs.neutral is None
            assert probs.contradiction == pytest.approx(
                float(expected[label2id["not_entailment"]]), abs=1e-6
            )


# -- label indices ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("id2label", "entailment", "contradiction", "named", "neutral"),
    [
        ({0: "contradiction", 1: "neutral", 2: "entailment"}, 2, 0, 0, 1),
        ({0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"}, 0, 2, 2, 1),
        ({0: "entailment", 1: "not_entailment"}, 0, 1, 1, None),
        ({0: "not_entailment", 1: "entailment"}, 1, 0, 0, None),
        # The pipeline's positional rule picks "neutral" here; parity keeps it.
        ({0: "neutral", 1: "entailment", 2: "contradiction"}, 1, 0, 2, 0),
    ],
)
def test_label_indices_follow_the_pipeline(
    id2label: dict[int, str],
    entailment: int,
    contradiction: int,
    named: int,
    neutral: int | None,
) -> None:
    config = PretrainedConfig(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    with capture_logs() as logs:
        indices = NliLabelIndices.from_config(config, "acme/nli")
    assert (indices.entailment, indices.contradiction) == (entailment, contradiction)
    assert (indices.named_contradiction, indices.neutral) == (named, neutral)
    warned = [
        entry
        for entry in logs
        if entry["event"]
        == "the pipeline's contradiction index is not the label named contradiction"
    ]
    assert bool(warned) == (named != contradiction)


def test_model_without_entailment_label_is_refused(tiny_bart_dir: Path) -> None:
    generic = {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bart_dir, id2label=generic, label2id={v: k for k, v in generic.items()}
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_bart_dir)
    with pytest.raises(ValueError, match=r"acme/no-entail.*LABEL_0.*entail"):
        NliScorer(model, tokenizer, name="acme/no-entail")


# -- batching --------------------------------------------------------------------------------


def test_identical_pairs_are_scored_once(tiny_bart_dir: Path) -> None:
    model, tokenizer = _load(tiny_bart_dir)
    recorder = RecordingModel(model)
    scorer = NliScorer(recorder, tokenizer)
    text, other = generated_sentences(2, seed=21)
    requests = [
        ScoreRequest(text, LABELS, True, TEMPLATE),
        ScoreRequest(text, LABELS, False, TEMPLATE),  # same pairs, other normalisation
        ScoreRequest(text, LABELS[:2], True, TEMPLATE),  # a subset of them
        ScoreRequest(other, LABELS[:3], True, TEMPLATE),
        ScoreRequest(other, LABELS[:3], True, TEMPLATE),
    ]
    outcomes = _scores(scorer.score(requests))

    assert recorder.rows_seen == len(LABELS) + 3  # 18 pairs asked for, 9 distinct
    assert outcomes[3] == outcomes[4]
    first = dict(zip(outcomes[0].labels, outcomes[0].scores, strict=True))
    subset = dict(zip(outcomes[2].labels, outcomes[2].scores, strict=True))
    assert subset == {label: first[label] for label in LABELS[:2]}


def test_sub_batches_respect_the_budget_and_pad_to_multiples_of_eight(tiny_bart_dir: Path) -> None:
    model, tokenizer = _load(tiny_bart_dir)
    recorder = RecordingModel(model)
    budget = 300
    scorer = NliScorer(recorder, tokenizer, max_batch_tokens=budget)
    texts = [" ".join(generated_sentences(n, seed=n)) for n in (1, 2, 3, 5, 8, 1, 2)]
    scorer.score([ScoreRequest(t, LABELS, True, TEMPLATE) for t in texts])

    assert len(recorder.batches) > 3
    for batch in recorder.batches:
        rows, width = batch["input_ids"].shape
        longest = int(batch["attention_mask"].sum(dim=1).max())
        shortest = int(batch["attention_mask"].sum(dim=1).min())
        assert width % PAD_MULTIPLE == 0
        assert width - longest < PAD_MULTIPLE
        assert rows == 1 or rows * width <= budget
        assert _width(shortest) >= MIN_ROW_FILL * width
    padded = [b["input_ids"].shape[1] for b in recorder.batches]
    assert padded == sorted(padded, reverse=True)  # longest first


def _width(length: int) -> int:
    return -(-length // PAD_MULTIPLE) * PAD_MULTIPLE


def test_plan_groups_longest_first_under_the_budget() -> None:
    lengths = [5, 17, 9, 30, 3, 100, 16]
    plan = plan_batches(lengths, budget=64, max_length=128, min_fill=MIN_ROW_FILL)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    assert plan[0] == [5]  # 100 tokens, alone: over the budget on its own
    for batch in plan:
        width = _width(max(lengths[i] for i in batch))
        assert len(batch) == 1 or width * len(batch) <= 64
    assert plan_batches([126], budget=64, max_length=126, min_fill=MIN_ROW_FILL) == [[0]]


def test_plan_keeps_short_rows_out_of_long_rows_padding() -> None:
    lengths = [30, 250, 41, 33, 256, 40, 29, 248, 200]
    plan = plan_batches(lengths, budget=16_384, max_length=1024, min_fill=MIN_ROW_FILL)
    assert plan == [[4, 1, 7], [8], [2, 5, 3], [0, 6]]
    for batch in plan:
        width = _width(max(lengths[i] for i in batch))
        assert all(_width(lengths[i]) >= MIN_ROW_FILL * width for i in batch)
    padded = sum(_width(max(lengths[i] for i in b)) * len(b) for b in plan)
    assert padded <= 1.15 * sum(lengths)  # one budget-sized batch would be 2.5x


# -- failure isolation ---------------------------------------------------------------------


def _marker_token(tokenizer: PreTrainedTokenizerBase, bad: str, others: Sequence[str]) -> int:
    def ids(text: str) -> set[int]:
        return set(tokenizer(text, add_special_tokens=False)["input_ids"])

    unique = ids(bad) - set().union(*(ids(t) for t in others)) - set(tokenizer.all_special_ids)
    return min(unique)


@pytest.mark.parametrize("fixture", ["tiny_bart_dir", "tiny_two_class_dir"])
def test_a_failing_event_does_not_take_the_batch_down(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    model, tokenizer = _load(request.getfixturevalue(fixture))
    texts = list(generated_sentences(6, seed=31))
    bad = "The passport museum zebra quokka exhibition."
    requests = [ScoreRequest(t, LABELS, i % 2 == 0, TEMPLATE) for i, t in enumerate(texts)]
    requests.insert(3, ScoreRequest(bad, LABELS, True, TEMPLATE))
    hypotheses = [TEMPLATE.format(label) for label in LABELS]
    marker = _marker_token(tokenizer, bad, [*texts, *hypotheses])
    expected = NliScorer(model, tokenizer).score(requests)

    recorder = RecordingModel(model, fail_token=marker)
    outcomes = NliScorer(recorder, tokenizer).score(requests)

    error = outcomes[3]
    assert isinstance(error, ScoreError)
    assert error.error_class == "RuntimeError" and str(marker) in error.message
    for index in (0, 1, 2, 4, 5, 6):
        got, want = outcomes[index], expected[index]
        assert isinstance(got, LabelScores) and isinstance(want, LabelScores)
        assert got.labels == want.labels
        assert max(abs(a - b) for a, b in zip(got.scores, want.scores, strict=True)) <= TOLERANCE
    assert any(b["input_ids"].shape[0] == 1 for b in recorder.batches)  # halved down to one


def test_encoding_errors_fail_only_their_event(tiny_bart_dir: Path) -> None:
    model, tokenizer = _load(tiny_bart_dir)
    scorer = NliScorer(model, tokenizer)
    text = next(generated_sentences(1, seed=41))
    huge_label = " ".join(["sports"] * 200)  # no room left for the text
    outcomes = scorer.score(
        [
            ScoreRequest(text, ("sports",), True, "About {} and {other}."),
            ScoreRequest(text, ("sports", huge_label), True, TEMPLATE),
            ScoreRequest(text, ("sports", "music"), True, TEMPLATE),
            ScoreRequest(text, (), True, TEMPLATE),
            ScoreRequest(text, ("sports", "music"), False, "No placeholder."),
        ]
    )
    assert isinstance(outcomes[0], ScoreError) and outcomes[0].error_class == "ValueError"
    assert isinstance(outcomes[1], ScoreError)
    assert outcomes[1].error_class == "HypothesisTooLongError"
    assert "128" in outcomes[1].message
    assert isinstance(outcomes[2], LabelScores)
    assert isinstance(outcomes[3], ScoreError) and "label" in outcomes[3].message
    assert isinstance(outcomes[4], ScoreError) and "{}" in outcomes[4].message


def test_non_finite_scores_become_an_error(tiny_bart_dir: Path) -> None:
    model, tokenizer = _load(tiny_bart_dir)
    texts = list(generated_sentences(3, seed=61))
    bad = "The passport museum zebra quokka exhibition."
    marker = _marker_token(tokenizer, bad, [*texts, *(TEMPLATE.format(x) for x in LABELS)])
    scorer = NliScorer(RecordingModel(model, nan_token=marker), tokenizer)
    outcomes = scorer.score([ScoreRequest(t, LABELS, False, TEMPLATE) for t in [bad, *texts]])
    assert isinstance(outcomes[0], ScoreError) and outcomes[0].error_class == "NonFiniteScore"
    assert all(isinstance(o, LabelScores) for o in outcomes[1:])


def test_prefetching_collation_scores_the_same(tiny_two_class_dir: Path) -> None:
    model, tokenizer = _load(tiny_two_class_dir)
    requests = parity_requests()
    inline = NliScorer(model, tokenizer, max_batch_tokens=256, prefetch=False)
    threaded = NliScorer(model, tokenizer, max_batch_tokens=256, prefetch=True)
    assert threaded.score(requests) == inline.score(requests)


def test_cuda_oom_halves_the_budget_for_the_rest_of_the_run(tiny_deberta_dir: Path) -> None:
    model, tokenizer = _load(tiny_deberta_dir)
    requests = [ScoreRequest(t, LABELS, True, TEMPLATE) for t in generated_sentences(24, seed=51)]
    budget = 1024
    unconstrained = RecordingModel(model)
    expected = _scores(NliScorer(unconstrained, tokenizer, max_batch_tokens=budget).score(requests))
    too_big = [b for b in unconstrained.batches if b["input_ids"].numel() > budget // 2]
    assert len(too_big) > 2  # several sub-batches would run out of memory as first planned
    # A device that fits only half the budget: every bigger forward runs out of memory.
    recorder = RecordingModel(model, oom_above_tokens=budget // 2, oom_once=False)
    scorer = NliScorer(recorder, tokenizer, max_batch_tokens=budget)

    with capture_logs() as logs:
        outcomes = _scores(scorer.score(requests))

    assert recorder.ooms == 1  # the sub-batches not yet run were re-planned, not retried
    assert scorer.max_batch_tokens == budget // 2
    assert [e["event"] for e in logs].count("CUDA out of memory, token budget halved") == 1
    after = recorder.batches[1:]
    assert len(after) > 2 and all(b["input_ids"].numel() <= budget // 2 for b in after)
    for got, want in zip(outcomes, expected, strict=True):
        assert got.labels == want.labels
        assert max(abs(a - b) for a, b in zip(got.scores, want.scores, strict=True)) <= TOLERANCE


# -- protocol, estimate and construction ----------------------------------------------------


def test_estimate_tokens_is_per_label_and_capped(tiny_bart_dir: Path) -> None:
    model, tokenizer = _load(tiny_bart_dir)
    scorer = NliScorer(model, tokenizer)
    short = ScoreRequest("a" * 40, ("sports",), True, TEMPLATE)
    eight = ScoreRequest("a" * 40, LABEL_WORDS[:8], True, TEMPLATE)
    huge = ScoreRequest("a" * 100_000, ("sports", "music"), True, TEMPLATE)
    assert isinstance(scorer, Scorer)
    assert 10 < scorer.estimate_tokens(short) < 40
    assert scorer.estimate_tokens(eight) > 7 * scorer.estimate_tokens(short)
    assert scorer.estimate_tokens(huge) == 2 * scorer.max_length == 256
    assert scorer.score([]) == []


def test_from_settings_loads_the_configured_model(tiny_two_class_dir: Path) -> None:
    settings = ModelSettings(
        model=str(tiny_two_class_dir), device="cpu", dtype="float32", max_batch_tokens=4096
    )
    scorer = NliScorer.from_settings(settings, include_nli_probs=True)
    info = scorer.info
    assert (info.name, info.revision, info.scorer) == (str(tiny_two_class_dir), "local", "nli")
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert scorer.max_batch_tokens == 4096
    text = next(generated_sentences(1))
    (outcome,) = _scores(scorer.score([ScoreRequest(text, ("sports",), True, TEMPLATE)]))
    assert outcome.nli is not None and outcome.nli["sports"].neutral is None

    built = build_scorer(settings)
    assert isinstance(built, NliScorer) and built.info == info


# -- the BART head without host synchronisations -------------------------------------------


def test_bart_runs_its_base_and_head_apart_and_still_matches_the_pipeline(
    tiny_bart_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = _load(tiny_bart_dir)
    zero_shot = pipeline("zero-shot-classification", model=model, tokenizer=cast(Any, tokenizer))
    requests = parity_requests()
    expected = [_pipeline_outcome(zero_shot, request) for request in requests]

    def data_dependent_forward(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the classification forward (eos mask, boolean indexing) ran")

    # The scorer must not go through BartForSequenceClassification.forward at all, and it
    # hands the base model ready 4D masks (no content check of a 2D mask in transformers).
    monkeypatch.setattr(type(model), "forward", data_dependent_forward)
    mask_ranks: set[int] = set()

    def record_masks(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        mask_ranks.update(
            kwargs[name].ndim for name in ("attention_mask", "decoder_attention_mask")
        )

    model.model.register_forward_pre_hook(record_masks, with_kwargs=True)
    outcomes = _scores(NliScorer(model, tokenizer, max_batch_tokens=256).score(requests))
    assert mask_ranks == {4}
    for got, (labels, scores) in zip(outcomes, expected, strict=True):
        assert list(got.labels) == labels
        assert max(abs(a - b) for a, b in zip(got.scores, scores, strict=True)) <= TOLERANCE


def test_a_text_containing_the_eos_token_scores_as_the_pipeline_scores_it(
    tiny_bart_dir: Path,
) -> None:
    model, tokenizer = _load(tiny_bart_dir)
    eos = str(tokenizer.eos_token)
    first, second = generated_sentences(2, seed=71)
    text, other = f"{first} {eos} {second}", f"{first} and {second}"  # about as long
    zero_shot = pipeline("zero-shot-classification", model=model, tokenizer=cast(Any, tokenizer))
    labels, scores = _pipeline_outcome(zero_shot, ScoreRequest(text, LABELS, True, TEMPLATE))
    # In one batch with a text without </s>, the per-row eos counts differ: the transformers
    # head refuses such a batch ("same number of <eos> tokens"); the gather does not care.
    requests = [
        ScoreRequest(text, LABELS, True, TEMPLATE),
        ScoreRequest(other, LABELS, True, TEMPLATE),
    ]
    scorer = NliScorer(model, tokenizer)
    pairs = scorer._encode(requests).pairs
    planned = scorer._plan(list(range(len(pairs))), pairs)
    assert any({row // len(LABELS) for row in rows} == {0, 1} for rows in planned)  # mixed
    passes: list[int] = []
    model.model.register_forward_hook(lambda *_: passes.append(1))
    got = _scores(scorer.score(requests))[0]
    assert len(passes) == len(planned)  # no failed pass, no bisection
    assert list(got.labels) == labels
    assert max(abs(a - b) for a, b in zip(got.scores, scores, strict=True)) <= TOLERANCE


# -- device failures -------------------------------------------------------------------------


class StickyFailure(RecordingModel):
    """A device whose context a kernel poisoned: every forward fails the same way."""

    def forward(self, **inputs: torch.Tensor) -> Any:
        self.batches.append(inputs)
        raise RuntimeError("CUDA error: device-side assert triggered")


def test_a_sticky_cuda_error_stops_scoring_instead_of_failing_event_by_event(
    tiny_deberta_dir: Path,
) -> None:
    model, tokenizer = _load(tiny_deberta_dir)
    failing = StickyFailure(model)
    scorer = NliScorer(failing, tokenizer)
    requests = [ScoreRequest(t, LABELS, True, TEMPLATE) for t in generated_sentences(4, seed=81)]
    with pytest.raises(DeviceError, match="device-side assert"):
        scorer.score(requests)
    assert len(failing.batches) == 1  # no bisection: one failure says the device is gone


def test_a_stored_out_of_memory_error_does_not_pin_the_failed_pass(tiny_deberta_dir: Path) -> None:
    model, tokenizer = _load(tiny_deberta_dir)
    # Even one pair runs out of memory: the event fails, with the error kept for its outcome.
    recorder = RecordingModel(model, oom_above_tokens=1, oom_once=False)
    scorer = NliScorer(recorder, tokenizer, max_batch_tokens=64)
    results = scorer._run(
        scorer._encode([ScoreRequest("a short text", ("sports",), True, TEMPLATE)]).pairs
    )
    (stored,) = results.failures.values()
    assert isinstance(stored, torch.cuda.OutOfMemoryError)
    assert stored.__traceback__ is None and stored.__context__ is None


def test_the_halved_budget_recovers_after_a_stretch_without_oom(tiny_deberta_dir: Path) -> None:
    model, tokenizer = _load(tiny_deberta_dir)
    recorder = RecordingModel(model, oom_above_tokens=256)  # one OOM, then a healthy device
    scorer = NliScorer(recorder, tokenizer, max_batch_tokens=1024)
    requests = [ScoreRequest(t, LABELS, True, TEMPLATE) for t in generated_sentences(12, seed=91)]
    scorer.score(requests)
    assert scorer.max_batch_tokens == 512
    for _ in range(RECOVER_AFTER_CLEAN_CALLS):
        scorer.score(requests[:1])
    assert scorer.max_batch_tokens == 1024


def test_only_short_hypotheses_are_kept_tokenized(tiny_bart_dir: Path) -> None:
    model, tokenizer = _load(tiny_bart_dir)
    scorer = NliScorer(model, tokenizer)
    long_label = "word " * (MAX_CACHED_HYPOTHESIS_CHARS // 5 + 1)
    text = next(iter(generated_sentences(1, seed=5)))
    outcomes = _scores(scorer.score([ScoreRequest(text, (LABELS[0], long_label), True, TEMPLATE)]))
    assert len(outcomes[0].labels) == 2
    assert list(scorer._hypotheses._items) == [TEMPLATE.format(LABELS[0])]
