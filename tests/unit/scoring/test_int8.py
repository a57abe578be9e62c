"""TAGSTREAM_DTYPE=int8: dynamic int8 quantization of the linear layers, on the CPU only."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tests.support.models import LABEL_WORDS, generated_sentences
from worker.config.settings import ModelSettings
from worker.contract.scorer import LabelScores, ScoreRequest
from worker.errors import ScorerConfigError
from worker.scoring.embedding import load_embedding_scorer
from worker.scoring.factory import build_scorer
from worker.scoring.nli import NliScorer
from worker.scoring.runtime import (
    QUANTIZED_LINEAR,
    is_quantized,
    model_dtype_name,
    quantize_linear,
    resolve_dtype,
)

TEMPLATE = "This example is {}."


def _requests() -> list[ScoreRequest]:
    return [
        ScoreRequest(text, LABEL_WORDS[:6], True, TEMPLATE)
        for text in generated_sentences(6, seed=31)
    ]


def _scores(scorer: NliScorer) -> list[LabelScores]:
    outcomes = scorer.score(_requests())
    assert all(isinstance(o, LabelScores) for o in outcomes), outcomes
    return [o for o in outcomes if isinstance(o, LabelScores)]


def test_int8_is_refused_on_cuda_naming_the_setting() -> None:
    for device in ("cuda", "cuda:0", "mps"):
        with pytest.raises(ValidationError, match="TAGSTREAM_DTYPE=int8 runs on the CPU only"):
            ModelSettings(dtype="int8", device=device)


def test_int8_is_refused_when_auto_picks_a_gpu() -> None:
    """``TAGSTREAM_DEVICE=auto`` resolves to CUDA on a GPU node: a start-up error (exit 2)."""
    with pytest.raises(ScorerConfigError, match="TAGSTREAM_DTYPE=int8 runs on the CPU only"):
        resolve_dtype("int8", torch.device("cuda"))
    assert resolve_dtype("int8", torch.device("cpu")) == torch.float32


def test_build_scorer_stops_before_loading_when_auto_picks_cuda(
    tiny_bart_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    settings = ModelSettings(model=str(tiny_bart_dir), device="auto", dtype="int8")
    for scorer in ("nli", "embedding"):
        with pytest.raises(ScorerConfigError, match="TAGSTREAM_DEVICE=cpu"):
            build_scorer(settings.model_copy(update={"scorer": scorer}))


def test_quantize_linear_replaces_every_linear_layer() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert model_dtype_name(model) == "float32"
    quantize_linear(model)
    assert is_quantized(model)
    assert model_dtype_name(model) == "int8"
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert sum(isinstance(m, QUANTIZED_LINEAR) for m in model.modules()) == 2


def _load(directory: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForSequenceClassification.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def _flat(outcomes: list[LabelScores]) -> list[float]:
    """Scores in request and label order (not ranked), for comparing two scorers."""
    return [
        dict(zip(o.labels, o.scores, strict=True))[label]
        for o, r in zip(outcomes, _requests(), strict=True)
        for label in r.labels
    ]


def test_the_nli_scorer_loads_int8_as_quantize_dynamic_makes_it(tiny_bart_dir: Path) -> None:
    """from_settings(dtype=int8) scores exactly as the float32 model quantized by hand, and
    not as the float32 model: the weights really are int8. (The tiny model's wide random
    weights quantize badly; the bart-large-shaped figures are in bench/scorer.py.)"""
    quantized = NliScorer.from_settings(
        ModelSettings(model=str(tiny_bart_dir), device="cpu", dtype="int8")
    )
    model, tokenizer = _load(tiny_bart_dir)
    full = NliScorer(model, tokenizer)
    by_hand = NliScorer(quantize_linear(copy.deepcopy(model)), tokenizer)

    assert (quantized.info.dtype, by_hand.info.dtype, full.info.dtype) == (
        "int8",
        "int8",
        "float32",
    )
    got = _flat(_scores(quantized))
    assert got == pytest.approx(_flat(_scores(by_hand)), abs=1e-6)
    assert max(abs(a - b) for a, b in zip(got, _flat(_scores(full)), strict=True)) > 1e-3
    assert all(0.0 <= score <= 1.0 for score in got)


def test_build_scorer_reports_int8_for_the_embedding_scorer() -> None:
    scorer = load_embedding_scorer(ModelSettings(scorer="embedding", device="cpu", dtype="int8"))
    assert scorer.info.dtype == "int8"
    assert build_scorer(ModelSettings(scorer="embedding", device="cpu")).info.dtype == "float32"
