"""Tiny, deterministic NLI models built on the spot, for tests and benchmarks (no network).

Every builder takes a target directory, writes a model loadable with
``AutoModelForSequenceClassification.from_pretrained(target)`` and
``AutoTokenizer.from_pretrained(target)`` (weights as safetensors), checks that the saved
tokenizer really loaded its vocabulary, and returns the directory.

The tokenizers are trained on a generated English-like corpus, so the texts the tests use
(:func:`generated_sentences`, the labels in :data:`LABEL_WORDS`) are mostly whole-word tokens.
The classifier heads are initialised much wider than the config's ``initializer_range`` so
that logits differ by several units across labels and texts: a parity test on near-equal
scores would prove little.

Written for transformers 5, whose tokenizer classes take ``vocab=`` / ``merges=`` directly.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForSequenceClassification,
    BartTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DebertaV2Tokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from worker.contract.scorer import ScoreRequest

SEED = 1234
# Short enough that a test text can exceed it cheaply; long enough for 8-label templates.
TINY_MAX_LENGTH = 128
# Covers every corpus word as one byte-level token while staying tiny (a few hundred merges).
TINY_VOCAB_SIZE = 1200
# The corpus only has to teach the tokenizer the word list; a few thousand lines suffice.
CORPUS_SENTENCES = 4000
# Hidden size of the tiny models: a few thousand parameters per layer, fast on 2 CPU cores.
TINY_HIDDEN = 32
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_FFN = 64
# Std of the re-initialised classifier output layer, times 1/sqrt(hidden): logits of a few units.
CLASSIFIER_GAIN = 4.0
# Weight init std of the tiny encoders: at the usual 0.02-0.1 every hypothesis gets nearly the
# same entailment logit (spread < 0.2); at 0.5 logits spread by 1-4 units across labels.
TINY_INIT_STD = 0.5
# Unigram log-probabilities rounded to this many decimals: run-to-run noise is ~1e-15.
UNIGRAM_SCORE_DECIMALS = 6
# The Unigram trainer appends missing characters with scores 1e-4 apart below the lowest.
APPENDED_CHARS_SCORE_BAND = 0.01
# Generated pairs over which the tiny classifiers are centred (mean logit 0 per class).
CALIBRATION_PAIRS = 64
# A loaded tokenizer with fewer tokens than this lost its vocabulary (empty-tokenizer trap).
MIN_LOADED_VOCAB = 300

BART_NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}
# The MoritzLaurer DeBERTa-v3 NLI models use this order.
DEBERTA_NLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}
TWO_CLASS_LABELS = {0: "entailment", 1: "not_entailment"}

LABEL_WORDS = (
    "sports",
    "finance",
    "politics",
    "technology",
    "health",
    "weather",
    "travel",
    "music",
    "food",
    "science",
    "urgent",
    "business",
    "education",
    "entertainment",
    "crime",
    "environment",
)
_WORDS = (  # noqa: SIM905 - a paragraph reads better than 260 quoted words
    "the a an this that these those some many every no one two three four five "
    "team game match player coach season league goal score win lose fans stadium "
    "market stock price bank money loan rate budget tax profit company shares trade "
    "government election vote minister law court policy senate party president war "
    "computer phone software data network cloud robot chip internet app code device "
    "doctor hospital patient vaccine virus disease medicine nurse health care study "
    "rain snow storm wind sun cloud cold hot forecast temperature flood drought "
    "flight hotel beach city trip tour airport train ticket holiday passport museum "
    "song band album concert guitar singer piano festival radio dance film movie "
    "bread pizza coffee tea dinner lunch breakfast restaurant chef recipe kitchen "
    "research scientist lab experiment space planet energy climate ocean forest "
    "school student teacher class exam university book library lesson homework "
    "police thief arrest crime judge prison fire accident emergency alarm "
    "is was are were be been has have had will would can could should must may "
    "said says told asks wants needs makes takes gives finds shows plays runs "
    "new old big small good bad great best worst high low fast slow early late "
    "today yesterday tomorrow week month year morning night after before during "
    "very really quite just still also only even again never always often soon "
    "and or but because while when where which who what how why if then so "
    "in on at by for with from to of about over under into through between "
    "people man woman child family friend group city country world life time day"
).split()
_ENDINGS = (".", ".", ".", "!", "?")


def generated_sentences(count: int, seed: int = SEED) -> Iterator[str]:
    """Deterministic English-like sentences of 5-18 words over a fixed word list."""
    rng = random.Random(seed)
    vocabulary = [*_WORDS, *LABEL_WORDS]
    for _ in range(count):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(5, 18))]
        if len(words) > 6 and rng.random() < 0.3:
            words[rng.randint(2, len(words) - 3)] += ","
        yield " ".join(words).capitalize() + rng.choice(_ENDINGS)


def _corpus() -> list[str]:
    hypotheses = [f"This example is {label}." for label in LABEL_WORDS]
    hypotheses += [f"This text is about {label}." for label in LABEL_WORDS]
    return [*generated_sentences(CORPUS_SENTENCES), *hypotheses]


def _train_json(tokenizer: Tokenizer, trainer: trainers.Trainer) -> dict[str, object]:
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    parsed: dict[str, object] = json.loads(tokenizer.to_str())
    return parsed


def _bpe_vocab_and_merges(
    vocab_size: int,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE with BART's special tokens at BART's ids (<s>=0, <pad>=1, </s>=2, <unk>=3)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model = _train_json(tokenizer, trainer)["model"]
    assert isinstance(model, dict)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), [(a, b) for a, b in merges]


def _unigram_vocab(vocab_size: int) -> list[tuple[str, float]]:
    """SentencePiece-style Unigram with DeBERTa-v3's ids ([PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3)."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"],
        unk_token="[UNK]",
        show_progress=False,
    )
    model = _train_json(tokenizer, trainer)["model"]
    assert isinstance(model, dict)
    vocab = [(str(piece), float(score)) for piece, score in model["vocab"]]
    return _deterministic_unigram(vocab)


def _deterministic_unigram(vocab: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Remove the Unigram trainer's run-to-run noise from its vocabulary.

    Scores are summed in parallel (they differ in the last bits): round them. The characters
    the trainer appends with the lowest scores (min, min - 1e-4, ...) come in hash order:
    give that cluster's scores, highest first, to its characters in sorted order.
    """
    rounded = [(piece, round(score, UNIGRAM_SCORE_DECIMALS)) for piece, score in vocab]
    lowest = min(score for _, score in rounded)
    cluster = [
        i
        for i, (piece, score) in enumerate(rounded)
        if len(piece) == 1 and score <= lowest + APPENDED_CHARS_SCORE_BAND
    ]
    pieces = sorted(rounded[i][0] for i in cluster)
    scores = sorted((rounded[i][1] for i in cluster), reverse=True)
    for i, piece, score in zip(cluster, pieces, scores, strict=True):
        rounded[i] = (piece, score)
    return rounded


def _wordpiece_vocab() -> dict[str, int]:
    """BERT-style uncased WordPiece ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4).

    Built from the corpus rather than trained: the WordPiece trainer's alphabet order (and so
    its vocabulary) changes from run to run. Every corpus character, alone and as a ``##``
    continuation, then every corpus word, in sorted order.
    """
    text = " ".join(_corpus()).lower()
    words = sorted({w for w in re.findall(r"[a-z]+", text)})
    chars = sorted({c for c in text if not c.isspace()})
    tokens = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *chars,
        *(f"##{c}" for c in chars),
        *(w for w in words if len(w) > 1),
    ]
    return {token: index for index, token in enumerate(tokens)}


def check_tokenizer_loaded(target: Path) -> int:
    """Reload the saved tokenizer and prove it has its vocabulary; returns the vocab size.

    transformers 5 silently builds an EMPTY tokenizer when handed 4.x-style ``vocab_file=``
    arguments, and an empty tokenizer still "works" (everything becomes unk or bytes).
    """
    tokenizer = AutoTokenizer.from_pretrained(target)
    size = len(tokenizer)
    if size < MIN_LOADED_VOCAB:
        raise AssertionError(f"tokenizer in {target} has only {size} tokens")
    sentence = next(generated_sentences(1, seed=SEED + 1))
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    if all(token == tokenizer.unk_token_id for token in ids):
        raise AssertionError(f"tokenizer in {target} encodes {sentence!r} to unk only")
    # Words are whole tokens once the vocabulary (and merges) loaded; bytes/chars otherwise.
    if len(ids) > len(sentence.split()) * 2:
        raise AssertionError(f"tokenizer in {target} splits {sentence!r} into {len(ids)} pieces")
    return size


def _widen_linear(layer: nn.Linear, gain: float, generator: torch.Generator) -> None:
    """Re-initialise ``layer`` with std ``gain / sqrt(fan_in)`` and a small random bias."""
    with torch.no_grad():
        std = gain / layer.in_features**0.5
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.5)


def _center_logits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, head: nn.Linear
) -> None:
    """Shift ``head``'s bias so every class averages a zero logit over generated NLI pairs.

    Without it one class dominates everywhere and multi-label scores bunch near 0 or 1, where
    a probability hides large logit errors; centred, scores spread over the whole range.
    """
    premises = list(generated_sentences(CALIBRATION_PAIRS, seed=SEED + 2))
    hypotheses = [
        f"This example is {LABEL_WORDS[i % len(LABEL_WORDS)]}." for i in range(len(premises))
    ]
    batch = tokenizer(premises, hypotheses, padding=True, return_tensors="pt")
    model.train(False)
    with torch.no_grad():
        mean = model(**batch).logits.mean(dim=0)
        assert head.bias is not None
        head.bias.sub_(mean)


def _save(model: PreTrainedModel, target: Path) -> Path:
    model.train(False)
    model.save_pretrained(target, safe_serialization=True)
    if not (target / "model.safetensors").is_file():
        raise AssertionError(f"no model.safetensors written to {target}")
    return target


def _label_maps(id2label: dict[int, str]) -> dict[str, Any]:
    return {"id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}


def _bart_tokenizer(target: Path, vocab_size: int, max_length: int) -> BartTokenizer:
    vocab, merges = _bpe_vocab_and_merges(vocab_size)
    # transformers types `merges` as strings, but the BPE backend takes (left, right) tuples.
    tokenizer = BartTokenizer(vocab=vocab, merges=cast(Any, merges), model_max_length=max_length)
    tokenizer.save_pretrained(target)
    return tokenizer


def build_tiny_bart(target: Path) -> Path:
    """A 2+2-layer BART NLI model (contradiction / neutral / entailment), max length 128."""
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _bart_tokenizer(target, TINY_VOCAB_SIZE, TINY_MAX_LENGTH)
    torch.manual_seed(SEED)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=TINY_HIDDEN,
        encoder_layers=TINY_LAYERS,
        decoder_layers=TINY_LAYERS,
        encoder_attention_heads=TINY_HEADS,
        decoder_attention_heads=TINY_HEADS,
        encoder_ffn_dim=TINY_FFN,
        decoder_ffn_dim=TINY_FFN,
        max_position_embeddings=TINY_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        init_std=TINY_INIT_STD,
        **_label_maps(BART_NLI_LABELS),
    )
    model = BartForSequenceClassification(config)
    generator = torch.Generator().manual_seed(SEED)
    _widen_linear(model.classification_head.dense, 1.0, generator)
    _widen_linear(model.classification_head.out_proj, CLASSIFIER_GAIN, generator)
    _center_logits(model, tokenizer, model.classification_head.out_proj)
    _save(model, target)
    check_tokenizer_loaded(target)
    return target


# DeBERTa-v3 settings the config class accepts only as extra keyword arguments.
_DEBERTA_V3_EXTRAS: dict[str, Any] = {
    "position_buckets": 64,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pooler_hidden_size": TINY_HIDDEN,
}


def build_tiny_deberta(target: Path) -> Path:
    """A 2-layer DeBERTa-v3-style NLI model (entailment / neutral / contradiction)."""
    target.mkdir(parents=True, exist_ok=True)
    vocab = _unigram_vocab(TINY_VOCAB_SIZE)
    unk_id = next(i for i, (piece, _) in enumerate(vocab) if piece == "[UNK]")
    tokenizer = DebertaV2Tokenizer(vocab=vocab, unk_id=unk_id, model_max_length=TINY_MAX_LENGTH)
    tokenizer.save_pretrained(target)
    torch.manual_seed(SEED)
    config = DebertaV2Config(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        intermediate_size=TINY_FFN,
        max_position_embeddings=TINY_MAX_LENGTH,
        # DeBERTa-v3: relative attention only, no absolute positions, no token types.
        relative_attention=True,
        max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=TINY_INIT_STD,
        **_DEBERTA_V3_EXTRAS,
        **_label_maps(DEBERTA_NLI_LABELS),
    )
    model = DebertaV2ForSequenceClassification(config)
    generator = torch.Generator().manual_seed(SEED)
    _widen_linear(model.pooler.dense, 1.0, generator)
    _widen_linear(model.classifier, CLASSIFIER_GAIN, generator)
    _center_logits(model, tokenizer, model.classifier)
    _save(model, target)
    check_tokenizer_loaded(target)
    return target


def build_tiny_two_class(target: Path) -> Path:
    """A 2-layer BERT with entailment / not_entailment labels and token-type embeddings."""
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab=_wordpiece_vocab(), model_max_length=TINY_MAX_LENGTH)
    tokenizer.save_pretrained(target)
    torch.manual_seed(SEED)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        intermediate_size=TINY_FFN,
        max_position_embeddings=TINY_MAX_LENGTH,
        type_vocab_size=2,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=TINY_INIT_STD,
        **_label_maps(TWO_CLASS_LABELS),
    )
    model = BertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(SEED)
    assert model.bert.pooler is not None
    _widen_linear(model.bert.pooler.dense, 1.0, generator)
    _widen_linear(model.classifier, CLASSIFIER_GAIN, generator)
    _center_logits(model, tokenizer, model.classifier)
    _save(model, target)
    check_tokenizer_loaded(target)
    return target


# bart-large (facebook/bart-large-mnli) shape. The vocabulary is NOT bart-large's 50,265:
# the embedding matrix takes the trained tokenizer's size instead. That changes neither the
# per-token compute (the classification model never projects onto the vocabulary) nor the
# layer shapes; it saves ~200 MB of random embeddings.
BART_LARGE_D_MODEL = 1024
BART_LARGE_LAYERS = 12
BART_LARGE_HEADS = 16
BART_LARGE_FFN = 4096
BART_LARGE_MAX_LENGTH = 1024


def bart_large_config(vocab_size: int) -> BartConfig:
    """facebook/bart-large-mnli's layer shapes and label order, with ``vocab_size`` tokens."""
    return BartConfig(
        vocab_size=vocab_size,
        d_model=BART_LARGE_D_MODEL,
        encoder_layers=BART_LARGE_LAYERS,
        decoder_layers=BART_LARGE_LAYERS,
        encoder_attention_heads=BART_LARGE_HEADS,
        decoder_attention_heads=BART_LARGE_HEADS,
        encoder_ffn_dim=BART_LARGE_FFN,
        decoder_ffn_dim=BART_LARGE_FFN,
        max_position_embeddings=BART_LARGE_MAX_LENGTH,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        scale_embedding=False,
        **_label_maps(BART_NLI_LABELS),
    )


def bart_large_shaped(target: Path) -> Path:
    """Random-weight BART with bart-large's layer shapes, for the benchmark only (slow).

    Reuses an existing build in ``target`` (the build takes tens of seconds and ~1.4 GB).
    """
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _bart_tokenizer(target, TINY_VOCAB_SIZE, BART_LARGE_MAX_LENGTH)
    # The tokenizer's special ids are BART's, which bart_large_config assumes.
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    torch.manual_seed(SEED)
    model = BartForSequenceClassification(bart_large_config(len(tokenizer)))
    _save(model, target)
    check_tokenizer_loaded(target)
    return target


# -- the parity requests of the scorer tests -------------------------------------------------

TEMPLATE = "This example is {}."
CUSTOM_TEMPLATE = "The topic of this text is {}!"
PARITY_LABELS = LABEL_WORDS[:6]


def long_text() -> str:
    """Forty generated sentences: longer than the tiny models read."""
    return " ".join(generated_sentences(40, seed=5))


def parity_requests() -> list[ScoreRequest]:
    """Requests that cover the scorer's paths (multi- and single-label, one label, custom
    templates, a repeated text, texts past the model's length) for the parity tests."""
    texts = list(generated_sentences(5, seed=11))
    return [
        ScoreRequest(texts[0], PARITY_LABELS, True, TEMPLATE),
        ScoreRequest(texts[1], PARITY_LABELS, False, TEMPLATE),
        ScoreRequest(texts[2], ("weather",), False, TEMPLATE),
        ScoreRequest(texts[2], ("weather",), True, TEMPLATE),
        ScoreRequest(texts[3], LABEL_WORDS[4:12], True, CUSTOM_TEMPLATE),
        ScoreRequest(texts[3], LABEL_WORDS[4:12], False, CUSTOM_TEMPLATE),
        ScoreRequest(texts[4], ("music", "food", "sports"), False, TEMPLATE),
        ScoreRequest(texts[0], ("crime", "sports"), False, TEMPLATE),  # repeated text
        ScoreRequest(long_text(), PARITY_LABELS, True, TEMPLATE),
        ScoreRequest(long_text(), PARITY_LABELS[:4], False, CUSTOM_TEMPLATE),
    ]
