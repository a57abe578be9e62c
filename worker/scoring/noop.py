"""A scorer that does no model work: the pipeline's ceiling, and a template for your own.

``TAGSTREAM_SCORER=worker.scoring.noop:NoopScorer`` runs the whole worker (consume, decode,
validate, micro-batch, encode, produce, commit) with scores that cost next to nothing:
each (text, label) score is a CRC-32 of the two, so the same event always gets the same
scores, in any process. What the worker reaches with it is the most it can do on that
machine and broker with any model; ``bench/pipeline.py`` measures it against a plain
consume-produce loop.

Plugging in a custom model works the same way. ``TAGSTREAM_SCORER=package.module:attr``
names a class or function that the worker calls once, at start-up, with the
:class:`~worker.config.settings.ModelSettings` (``model``, ``device``, ``dtype``,
``max_batch_tokens``, ...) and that returns an object with the four members of
:class:`~worker.contract.scorer.Scorer`, which this class implements in the simplest way:

* ``info``: the model's name and revision, written into every scored event;
* ``max_batch_tokens``: the budget at which the batcher closes a micro-batch;
* ``estimate_tokens(request)``: what one event adds to that budget; it runs on the
  consuming thread for every event, so it must be cheap (no tokenizer call);
* ``score(requests)``: one outcome per request, in order, labels sorted by score
  (highest first); an event that cannot be scored gets a
  :class:`~worker.contract.scorer.ScoreError` instead of raising, so that only it is
  dead-lettered.

``score`` runs on the inference thread, one micro-batch at a time; load the model in the
constructor, where start-up time belongs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, Final

from worker.config.settings import DEFAULT_MAX_BATCH_TOKENS, ModelSettings
from worker.contract.scorer import LabelScores, ModelInfo, ScoreOutcome, ScoreRequest
from worker.scoring.batching import PLACEHOLDER_CHARS, estimated_tokens

NAME: Final = "noop"
REVISION: Final = "v1"
# A pair's special tokens (<s> premise </s></s> hypothesis </s> for BART-style models).
SPECIAL_TOKENS_PER_PAIR: Final = 4
# Tokens a pair is cut to, as an NLI model's tokenizer truncates (bart-large-mnli and the
# DeBERTa NLI models: 512), so a long text costs the batch budget what it would cost a model.
MAX_PAIR_TOKENS: Final = 512
# Scores are the low 16 bits of a CRC-32 over this: 65,536 distinct values in 0..1.
SCORE_BITS: Final = 0xFFFF
# Label sets (and templates) remembered at once; a stream uses a handful, the cap only
# bounds memory when every event brings its own.
CACHE_LIMIT: Final = 1024


class NoopScorer:
    """Deterministic scores from a cheap hash of (text, label); no model, no tokenizer.

    Multi-label (and a single label, as in the transformers pipeline): each label's score on
    its own, in 0..1. Single-label: the same values normalised to sum to 1 across the
    event's labels, as a softmax would.
    """

    def __init__(self, settings: ModelSettings | None = None) -> None:
        budget = DEFAULT_MAX_BATCH_TOKENS if settings is None else settings.max_batch_tokens
        self._budget = budget
        self._info = ModelInfo(
            name=NAME, revision=REVISION, scorer=NAME, device="cpu", dtype="none"
        )
        # Per (template, labels): the hypotheses' tokens; per labels: the labels as bytes.
        self._hypothesis_tokens: dict[tuple[str, tuple[str, ...]], int] = {}
        self._label_bytes: dict[tuple[str, ...], tuple[bytes, ...]] = {}

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def max_batch_tokens(self) -> int:
        return self._budget

    def estimate_tokens(self, request: ScoreRequest) -> int:
        """Per label: the text's tokens + the hypothesis' tokens + the pair's special ones,
        each pair cut to :data:`MAX_PAIR_TOKENS` as a model's tokenizer would."""
        labels = request.labels
        key = (request.hypothesis_template, labels)
        hypotheses = self._hypothesis_tokens.get(key)
        if hypotheses is None:
            template = len(request.hypothesis_template) - PLACEHOLDER_CHARS
            hypotheses = sum(estimated_tokens(template + len(label)) for label in labels)
            _remember(self._hypothesis_tokens, key, hypotheses)
        text = estimated_tokens(len(request.text)) + SPECIAL_TOKENS_PER_PAIR
        return min(text * len(labels) + hypotheses, MAX_PAIR_TOKENS * len(labels))

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        return [self._score_one(request) for request in requests]

    def _score_one(self, request: ScoreRequest) -> LabelScores:
        labels = request.labels
        encoded = self._label_bytes.get(labels)
        if encoded is None:
            encoded = tuple(label.encode("utf-8", errors="surrogatepass") for label in labels)
            _remember(self._label_bytes, labels, encoded)
        crc32 = zlib.crc32
        seed = crc32(request.text.encode("utf-8", errors="surrogatepass"))
        raw = [(crc32(label, seed) & SCORE_BITS) / SCORE_BITS for label in encoded]
        if not request.multi_label and len(raw) > 1:
            total = sum(raw)
            raw = [value / total for value in raw] if total else [1 / len(raw)] * len(raw)
        order = sorted(range(len(raw)), key=raw.__getitem__, reverse=True)
        return LabelScores(
            labels=tuple([labels[i] for i in order]),
            scores=tuple([raw[i] for i in order]),
            truncated=False,
        )


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= CACHE_LIMIT:
        cache.clear()
    cache[key] = value
