"""The tiny model fixtures load offline, keep their vocabularies and give distinct scores."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BartTokenizer

from tests.support.models import (
    BART_LARGE_D_MODEL,
    BART_NLI_LABELS,
    DEBERTA_NLI_LABELS,
    LABEL_WORDS,
    MIN_LOADED_VOCAB,
    TINY_MAX_LENGTH,
    TWO_CLASS_LABELS,
    bart_large_config,
    build_tiny_bart,
    build_tiny_deberta,
    build_tiny_two_class,
    check_tokenizer_loaded,
    generated_sentences,
)

FIXTURES = {
    "tiny_bart_dir": ("BartForSequenceClassification", "RobertaTokenizer", BART_NLI_LABELS),
    "tiny_deberta_dir": (
        "DebertaV2ForSequenceClassification",
        "DebertaV2Tokenizer",
        DEBERTA_NLI_LABELS,
    ),
    "tiny_two_class_dir": ("BertForSequenceClassification", "BertTokenizer", TWO_CLASS_LABELS),
}


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_fixture_loads_offline_from_safetensors(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    directory: Path = request.getfixturevalue(fixture)
    model_class, tokenizer_class, id2label = FIXTURES[fixture]
    model = AutoModelForSequenceClassification.from_pretrained(directory, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)

    assert (directory / "model.safetensors").is_file()
    assert not list(directory.glob("*.bin"))
    assert type(model).__name__ == model_class
    assert type(tokenizer).__name__ == tokenizer_class
    assert model.config.id2label == id2label
    assert tokenizer.model_max_length == TINY_MAX_LENGTH
    assert model.config.max_position_embeddings == TINY_MAX_LENGTH
    assert len(tokenizer) >= MIN_LOADED_VOCAB
    assert check_tokenizer_loaded(directory) == len(tokenizer)


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_pairs_encode_with_the_model_type_special_tokens(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    encoding = tokenizer("The team won the match.", "This example is sports.")
    tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    assert tokenizer.unk_token not in tokens
    if fixture == "tiny_bart_dir":
        assert tokens[0] == "<s>" and tokens[-1] == "</s>" and tokens.count("</s>") == 3
    else:
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and tokens.count("[SEP]") == 2
        types = encoding["token_type_ids"]
        second = tokens.index("[SEP]") + 1
        assert set(types[:second]) == {0} and set(types[second:]) == {1}


def test_deberta_and_bart_order_their_labels_differently() -> None:
    assert BART_NLI_LABELS[2] == DEBERTA_NLI_LABELS[0] == "entailment"
    assert BART_NLI_LABELS != DEBERTA_NLI_LABELS


def test_empty_tokenizer_is_caught(tmp_path: Path) -> None:
    # What transformers 5 builds from 4.x-style arguments: specials only, no vocabulary.
    BartTokenizer(model_max_length=TINY_MAX_LENGTH).save_pretrained(tmp_path)
    with pytest.raises(AssertionError, match="tokens"):
        check_tokenizer_loaded(tmp_path)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "tiny_bart_dir": build_tiny_bart,
    "tiny_deberta_dir": build_tiny_deberta,
    "tiny_two_class_dir": build_tiny_two_class,
}


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_builds_are_deterministic(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    built: Path = request.getfixturevalue(fixture)
    again = BUILDERS[fixture](tmp_path / "again")
    first = load_file(built / "model.safetensors")
    second = load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert (built / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_logits_differ_clearly_across_labels_and_texts(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    directory: Path = request.getfixturevalue(fixture)
    model = AutoModelForSequenceClassification.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    entailment = model.config.label2id["entailment"]
    texts = list(generated_sentences(4, seed=99))
    hypotheses = [f"This example is {label}." for label in LABEL_WORDS[:8]]
    with torch.no_grad():
        rows = [
            model(
                **tokenizer([text] * len(hypotheses), hypotheses, padding=True, return_tensors="pt")
            ).logits[:, entailment]
            for text in texts
        ]
    logits = torch.stack(rows)  # texts x labels
    label_spread = (logits.max(dim=1).values - logits.min(dim=1).values).min().item()
    text_spread = (logits.mean(dim=1).max() - logits.mean(dim=1).min()).item()
    assert label_spread > 0.3, logits
    assert text_spread > 0.1, logits


def test_bart_large_config_has_bart_large_shapes() -> None:
    config = bart_large_config(vocab_size=1000)
    assert config.d_model == BART_LARGE_D_MODEL == 1024
    assert (config.encoder_layers, config.decoder_layers) == (12, 12)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (16, 16)
    assert (config.encoder_ffn_dim, config.decoder_ffn_dim) == (4096, 4096)
    assert config.max_position_embeddings == 1024
    assert config.id2label == BART_NLI_LABELS
