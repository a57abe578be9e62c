"""Zero-shot classification with an NLI model, scored exactly as transformers' pipeline scores.

Each (text, label) pair becomes the NLI pair (premise = text, hypothesis =
``template.format(label)``). Scores follow ``ZeroShotClassificationPipeline``:

* multi-label, or a single label: per pair, softmax over the [contradiction, entailment]
  logits, entailment's share;
* single-label: softmax of the entailment logits across the event's labels.

The entailment index is the first ``config.label2id`` entry whose name starts with
"entail" (case-insensitive). The contradiction index is the pipeline's: index 0, or the last
index when entailment is 0. (The pipeline does *not* look for a "contra..." label; when a label
named so sits elsewhere we keep the pipeline's choice for parity and log a warning.) For a
2-class model this makes "not_entailment" the contradiction column.

Throughput comes from doing less work than the pipeline, never different work: each distinct
text and hypothesis is tokenized once per batch (hypotheses are cached across batches), each
distinct (text, hypothesis) pair is scored once, pairs are sorted by length and cut into
sub-batches of similar lengths under a token budget (padded length x rows, lengths padded to a
multiple of 8; see :func:`worker.scoring.batching.plan_batches`), and
on a GPU every sub-batch is prepared on the CPU while the device runs the previous ones, with a
single synchronisation when the logits are read back.

``include_nli_probs`` (constructor and :meth:`NliScorer.from_settings` keyword; the worker
takes it from ``TaggingSettings.include_nli_probs``) also returns each label's full NLI
class probabilities (softmax over all classes; ``neutral`` is None without a neutral class).

Long texts (``TAGSTREAM_LONG_TEXT``): ``truncate`` (the default) cuts the premise as the
pipeline does. ``chunk`` (:class:`ChunkOptions`) cuts it into overlapping token windows
(:func:`worker.scoring.nli_pairs.premise_windows`) of the room the event's longest hypothesis
leaves (or ``chunk_tokens``), at most ``max_chunks`` of them; every (window, hypothesis) pair
is one more row of the same planned sub-batches. A label's score aggregates its windows:

* ``max``: multi-label, the largest per-window probability; single-label, the largest
  entailment logit per label, then the softmax across labels. The NLI probabilities are the
  window's that gave the label its score;
* ``mean``: the same with the mean; the NLI probabilities are the windows' mean.

A text that fits one window gives exactly the truncate mode's (the pipeline's) scores.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog
import torch
import transformers
from transformers import PreTrainedTokenizerBase

from worker.config.settings import (
    DEFAULT_CHUNK_OVERLAP_TOKENS,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_CHUNKS,
    ChunkAggregation,
    ModelSettings,
)
from worker.contract.events import render_hypothesis
from worker.contract.scorer import (
    LabelScores,
    ModelInfo,
    NliProbabilities,
    ScoreError,
    ScoreOutcome,
    ScoreRequest,
)
from worker.errors import DeviceError, HypothesisTooLongError, ScorerConfigError
from worker.scoring.batching import (
    PLACEHOLDER_CHARS,
    TokenBudget,
    estimated_tokens,
    padded_length,
    plan_batches,
)
from worker.scoring.cache import LruCache, cacheable_hypothesis
from worker.scoring.nli_pairs import (
    TOKEN_TYPE_IDS,
    ChunkPlan,
    EncodedPair,
    PairTemplate,
    derive_pair_template,
    fit_premise,
    premise_windows,
)
from worker.scoring.runtime import (
    FALLBACK_MAX_LENGTH,
    LOCAL_REVISION,
    UNSET_MODEL_MAX_LENGTH,
    detached,
    dtype_name,
    is_sticky_cuda_error,
    load_sequence_classifier,
    model_dtype_name,
    release_cached_memory,
    resolve_device,
    resolve_dtype,
)

log = structlog.get_logger(__name__)

# A row shorter than this share of its sub-batch's padded length starts a new sub-batch:
# padding stays under a quarter of the row's own length, at the cost of a few more passes.
MIN_ROW_FILL = 0.8
# Distinct hypotheses kept tokenized across batches: labels x templates in use, with headroom.
HYPOTHESIS_CACHE_SIZE = 8192
# Entailment needs something to be told apart from: at least a second class.
MIN_NLI_CLASSES = 2


class SequenceClassifier(Protocol):
    """What the scorer needs of a model: a transformers ``*ForSequenceClassification``."""

    config: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self, recurse: bool = ...) -> Iterator[torch.nn.Parameter]: ...

    def eval(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class NliLabelIndices:
    """Logit columns: ``contradiction`` is the pipeline's, ``named_contradiction`` the label's."""

    entailment: int
    contradiction: int
    named_contradiction: int
    neutral: int | None
    num_labels: int

    @classmethod
    def from_config(cls, config: Any, model_name: str) -> NliLabelIndices:
        label2id = {str(name): int(index) for name, index in config.label2id.items()}
        num_labels = int(config.num_labels)
        entailment = next(
            (i for name, i in label2id.items() if name.lower().startswith("entail")), None
        )
        if entailment is None or num_labels < MIN_NLI_CLASSES:
            raise ValueError(
                f"model {model_name!r} has no entailment label (labels: {sorted(label2id)});"
                " zero-shot NLI scoring needs a label starting with 'entail'"
            )
        # transformers' ZeroShotClassificationPipeline: `-1 if entailment_id == 0 else 0`.
        contradiction = num_labels - 1 if entailment == 0 else 0
        named = next((i for n, i in label2id.items() if n.lower().startswith("contra")), None)
        if named is not None and named != contradiction:
            log.warning(
                "the pipeline's contradiction index is not the label named contradiction",
                model=model_name,
                labels=label2id,
                pipeline_index=contradiction,
                label_index=named,
            )
        neutral = next((i for n, i in label2id.items() if n.lower().startswith("neutral")), None)
        return cls(
            entailment=entailment,
            contradiction=contradiction,
            named_contradiction=contradiction if named is None else named,
            neutral=neutral,
            num_labels=num_labels,
        )


@dataclass(frozen=True, slots=True)
class ChunkOptions:
    """Chunk mode (``TAGSTREAM_LONG_TEXT=chunk``): how a long text is read in windows.

    ``window_tokens`` 0: the room the model's maximum leaves beside the event's longest
    hypothesis; a larger value is cut to that room too.
    """

    window_tokens: int = 0
    overlap_tokens: int = DEFAULT_CHUNK_OVERLAP_TOKENS
    max_chunks: int = DEFAULT_MAX_CHUNKS
    aggregation: ChunkAggregation = "max"

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> ChunkOptions | None:
        """The settings' chunk options, or None for ``truncate``."""
        if settings.long_text != "chunk":
            return None
        return cls(
            window_tokens=settings.chunk_tokens,
            overlap_tokens=settings.chunk_overlap_tokens,
            max_chunks=settings.max_chunks,
            aggregation=settings.chunk_aggregation,
        )


# Per request: per label, the rows of its pairs (one per window), or the request's error.
_Refs = list[list[int]] | BaseException
# What a (text, hypothesis, window) key builds: its pairs, one per window, or an error.
_Built = list[EncodedPair] | Exception


@dataclass(slots=True)
class _Encoded:
    """A batch turned into distinct pairs; each request holds its pair indices or its error."""

    pairs: list[EncodedPair]
    refs: list[_Refs]


# A distinct pair: (text, hypothesis, the event's window in chunk mode, else None).
_PairKey = tuple[str, str, int | None]


@dataclass(slots=True)
class _Slots:
    """Built pairs in one list; per key, the rows of its pairs or its error."""

    pairs: list[EncodedPair]
    rows: list[list[int] | Exception]


_Batch = dict[str, torch.Tensor]
# The collated batch's extra entry: each row's last real position (where BART pools).
LAST_POSITION = "last_position"
# Classification models that pool the decoder state at the last <eos> token; with right
# padding and every pair ending in </s>, that is each row's last real position.
EOS_POOLED_MODEL_TYPES: Final = frozenset({"bart", "mbart", "plbart", "mvp"})


_TRANSFORMERS_MAJOR: Final = int(transformers.__version__.split(".", 1)[0])
# transformers 5 passes a 4D attention mask through unchanged; 4.x rebuilds masks from 2D.
READY_MASKS_SINCE: Final = 5


def _sdpa_masks(attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The encoder's padding mask and the decoder's causal mask as 4D booleans (True: attend),
    built from shapes only. Decoder positions past a row's end see only what is before them
    (causal), so they need no padding mask: the pooled position is the last real one."""
    keep = attention_mask.bool()
    rows, width = keep.shape
    causal = torch.ones(width, width, dtype=torch.bool, device=keep.device).tril()
    return {
        "attention_mask": keep[:, None, None, :].expand(rows, 1, width, width),
        "decoder_attention_mask": causal[None, None].expand(rows, 1, width, width),
    }


@dataclass(frozen=True, slots=True)
class _EosPooledHead:
    """The base model and classification head of a BART-like classifier, run apart.

    ``BartForSequenceClassification.forward`` finds the pooling positions from the data
    (``input_ids.eq(eos)``, a count check with ``unique_consecutive``, boolean indexing):
    each a host synchronisation, and a text containing ``</s>`` makes its count check
    raise. The positions are known before the forward pass, so a gather does the same.
    """

    base: Callable[..., Any]
    head: Callable[[torch.Tensor], torch.Tensor]
    # SDPA attention given ready 4D boolean masks: transformers 5 then uses them as they
    # are instead of checking the 2D mask's content (``mask.all()``, a synchronisation).
    ready_masks: bool

    @classmethod
    def of(cls, model: Any) -> _EosPooledHead | None:
        config = getattr(model, "config", None)
        base = getattr(model, "model", None)
        head = getattr(model, "classification_head", None)
        if getattr(config, "model_type", None) not in EOS_POOLED_MODEL_TYPES:
            return None
        if base is None or head is None:
            return None
        sdpa = getattr(config, "_attn_implementation", None) == "sdpa"
        ready = sdpa and _TRANSFORMERS_MAJOR >= READY_MASKS_SINCE
        return cls(base=base, head=head, ready_masks=ready)

    def __call__(self, inputs: dict[str, Any], last: torch.Tensor) -> torch.Tensor:
        if self.ready_masks:
            inputs = {**inputs, **_sdpa_masks(inputs["attention_mask"])}
        hidden: torch.Tensor = self.base(**inputs).last_hidden_state
        index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return self.head(hidden.gather(1, index).squeeze(1))


@dataclass(slots=True)
class _Results:
    logits: torch.Tensor
    failures: dict[int, BaseException]


def _model_max_length(tokenizer: PreTrainedTokenizerBase, config: Any, name: str) -> int:
    declared = int(tokenizer.model_max_length or 0)
    if 0 < declared < UNSET_MODEL_MAX_LENGTH:
        return declared
    # Fall back to the common encoder limit, never past the model's positions.
    positions = int(getattr(config, "max_position_embeddings", 0) or 0)
    fallback = min(positions, FALLBACK_MAX_LENGTH) if positions > 0 else FALLBACK_MAX_LENGTH
    log.warning(
        "tokenizer declares no maximum length, using a fallback", model=name, using=fallback
    )
    return fallback


def _hypotheses(request: ScoreRequest) -> list[str]:
    """``template.format(label)`` per label, refusing what the pipeline refuses."""
    if not request.labels:
        raise ValueError("at least one label is needed")
    return [render_hypothesis(request.hypothesis_template, label) for label in request.labels]


def _softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _mean(values: Sequence[float]) -> float:
    """The mean; of one value, that value exactly (the truncate mode's parity)."""
    return math.fsum(values) / len(values)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties."""
    return max(range(len(values)), key=values.__getitem__)


class NliScorer:
    """The default scorer: zero-shot NLI classification on batches of events."""

    def __init__(
        self,
        model: SequenceClassifier,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str | None = None,
        revision: str = LOCAL_REVISION,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        include_nli_probs: bool = False,
        hypothesis_cache_size: int = HYPOTHESIS_CACHE_SIZE,
        prefetch: bool | None = None,
        chunking: ChunkOptions | None = None,
    ) -> None:
        """Wrap an already-loaded model (in eval mode, on its device and dtype).

        ``prefetch`` collates the next sub-batch in a helper thread while the device runs the
        current one; by default on CUDA only (on a CPU both compete for the same cores).
        ``chunking``: read long texts in windows (chunk mode); None truncates them.
        """
        config = model.config
        self._name = name or str(getattr(config, "_name_or_path", "") or type(model).__name__)
        self._labels = NliLabelIndices.from_config(config, self._name)
        model.eval()
        self._model = model
        self._tokenizer = tokenizer
        self._revision = revision
        parameter = next(model.parameters())
        self._device = parameter.device
        self._dtype_name = (
            model_dtype_name(model)
            if isinstance(model, torch.nn.Module)
            else dtype_name(parameter.dtype)
        )
        self._budget = TokenBudget(max_batch_tokens)
        self._include_nli_probs = include_nli_probs
        self._max_length = _model_max_length(tokenizer, config, self._name)
        self._truncate_left = tokenizer.truncation_side == "left"
        self._with_types = TOKEN_TYPE_IDS in tokenizer.model_input_names
        pad = tokenizer.pad_token_id
        pad = tokenizer.eos_token_id if pad is None else pad  # as the pipeline does
        if pad is None:
            raise ValueError(f"tokenizer of {self._name!r} has neither a pad nor an eos token")
        self._pad_id = int(pad)
        self._pad_type_id = int(getattr(tokenizer, "pad_token_type_id", 0))
        self._template = derive_pair_template(tokenizer, self._max_length, self._with_types)
        if self._template is None:
            log.warning(
                "pair layout not derived from the tokenizer, encoding pairs with it",
                model=self._name,
            )
        self._num_special = tokenizer.num_special_tokens_to_add(pair=True)
        if chunking is not None and self._template is None:
            raise ScorerConfigError(
                f"TAGSTREAM_LONG_TEXT=chunk needs a tokenizer whose pair layout the scorer can"
                f" reproduce, and that of {self._name!r} could not be: use"
                f" TAGSTREAM_LONG_TEXT=truncate"
            )
        self._chunking = chunking
        self._hypotheses: LruCache[str, tuple[int, ...]] = LruCache(hypothesis_cache_size)
        forward: Callable[..., Any] = getattr(model, "forward", model)
        self._pass_use_cache = "use_cache" in inspect.signature(forward).parameters
        self._eos_pooled = _EosPooledHead.of(model)
        self._pin = self._device.type == "cuda"
        use_thread = self._pin if prefetch is None else prefetch
        self._collator = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="nli-collate")
            if use_thread
            else None
        )

    @classmethod
    def from_settings(
        cls, settings: ModelSettings, *, include_nli_probs: bool = False
    ) -> NliScorer:
        """Load the configured model on the configured device and dtype."""
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        model, tokenizer, revision = load_sequence_classifier(settings, device, dtype)
        return cls(
            model,
            tokenizer,
            name=settings.model,
            revision=revision,
            max_batch_tokens=settings.max_batch_tokens,
            include_nli_probs=include_nli_probs,
            chunking=ChunkOptions.from_settings(settings),
        )

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self._name,
            revision=self._revision,
            scorer="nli",
            device=str(self._device),
            dtype=self._dtype_name,
        )

    @property
    def max_batch_tokens(self) -> int:
        """The current token budget; halved for good after a CUDA out-of-memory error."""
        return self._budget.tokens

    @property
    def max_length(self) -> int:
        """Longest (premise + hypothesis + special tokens) input the model takes."""
        return self._max_length

    @property
    def pair_template(self) -> PairTemplate | None:
        """The tokenizer's pair layout, or None when pairs are encoded by the tokenizer."""
        return self._template

    def estimate_tokens(self, request: ScoreRequest) -> int:
        """Unpadded tokens of the request's pairs, from ~4 characters per token.

        Per label: text tokens (capped at the model maximum) + hypothesis tokens + special
        tokens, capped at the model maximum; summed over the labels, and in chunk mode
        multiplied by the windows the text would take. No tokenizer call, so the batcher
        can size micro-batches in microseconds; dedup makes the truth lower.
        """
        text = estimated_tokens(len(request.text))
        template = len(request.hypothesis_template) - PLACEHOLDER_CHARS
        hypotheses = [estimated_tokens(template + len(label)) for label in request.labels]
        windows = 1
        if self._chunking is not None and hypotheses:
            plan = self._chunk_plan(max(hypotheses))
            if plan is not None:
                windows = min(
                    plan.max_chunks, 1 + _ceil_div(max(text - plan.window, 0), plan.stride)
                )
                text = min(text, plan.window)
        text = min(text, self._max_length)
        per_window = sum(
            min(text + hypothesis + self._num_special, self._max_length)
            for hypothesis in hypotheses
        )
        return windows * per_window

    def _chunk_plan(self, hypothesis_length: int) -> ChunkPlan | None:
        """Chunk mode's windows beside a hypothesis this long; None when there is no room."""
        assert self._chunking is not None
        room = self._max_length - self._num_special - hypothesis_length
        window = min(self._chunking.window_tokens or room, room)
        if window < 1:
            return None
        return ChunkPlan.of(window, self._chunking.overlap_tokens, self._chunking.max_chunks)

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        """One outcome per request; a failing event gets a ScoreError, the rest are scored."""
        if not requests:
            return []
        encoded = self._encode(requests)
        results = self._run(encoded.pairs)
        if self._budget.end_call():
            log.info("token budget recovered", model=self._name, tokens=self._budget.tokens)
        logits = results.logits.double()
        multi = torch.softmax(
            logits[:, [self._labels.contradiction, self._labels.entailment]], dim=-1
        )[:, 1].tolist()
        entail = logits[:, self._labels.entailment].tolist()
        probs = torch.softmax(logits, dim=-1).tolist() if self._include_nli_probs else None
        outcomes: list[ScoreOutcome] = []
        for request, refs in zip(requests, encoded.refs, strict=True):
            try:
                outcome = self._outcome(
                    request,
                    refs,
                    pairs=encoded.pairs,
                    failures=results.failures,
                    multi=multi,
                    entail=entail,
                    probs=probs,
                )
            except Exception as exc:
                outcome = ScoreError.from_exception(exc)
            outcomes.append(outcome)
        return outcomes

    # -- encoding -------------------------------------------------------------------------

    def _tokenize(self, texts: list[str], max_length: int | None) -> list[list[int] | Exception]:
        """Token ids of each text (no special tokens); a failing text gets its exception."""
        kwargs: dict[str, Any] = {"add_special_tokens": False}
        if max_length is not None:
            kwargs.update(truncation=True, max_length=max_length)
        try:
            batch = self._tokenizer(texts, **kwargs)["input_ids"]
            return [list(ids) for ids in batch]
        except Exception:
            pass
        results: list[list[int] | Exception] = []
        for text in texts:
            try:
                results.append(list(self._tokenizer(text, **kwargs)["input_ids"]))
            except Exception as exc:
                results.append(exc)
        return results

    def _hypothesis_ids(self, hypotheses: set[str]) -> dict[str, tuple[int, ...] | Exception]:
        found: dict[str, tuple[int, ...] | Exception] = {}
        missing: list[str] = []
        for hypothesis in hypotheses:
            cached = self._hypotheses.get(hypothesis)
            if cached is None:
                missing.append(hypothesis)
            else:
                found[hypothesis] = cached
        for hypothesis, ids in zip(missing, self._tokenize(missing, None), strict=True):
            if isinstance(ids, Exception):
                found[hypothesis] = ids
            else:
                found[hypothesis] = token_ids = tuple(ids)
                if cacheable_hypothesis(hypothesis):
                    self._hypotheses.put(hypothesis, token_ids)
        return found

    def _encode(self, requests: Sequence[ScoreRequest]) -> _Encoded:
        hypotheses: list[list[str] | Exception] = []
        for request in requests:
            try:
                hypotheses.append(_hypotheses(request))
            except Exception as exc:
                hypotheses.append(exc)
        texts = list(dict.fromkeys(request.text for request in requests))
        # Truncate mode: cutting at the model maximum loses nothing, a pair keeps fewer
        # premise tokens. Chunk mode reads on (texts are bounded by max_text_chars).
        limit = None if self._chunking is not None else self._max_length
        premises = dict(zip(texts, self._tokenize(texts, limit), strict=True))
        wanted = {h for hs in hypotheses if not isinstance(hs, Exception) for h in hs}
        hypothesis_ids = self._hypothesis_ids(wanted)
        windows = [self._window(hyps, hypothesis_ids) for hyps in hypotheses]
        keys: dict[_PairKey, int] = {}
        ordered: list[_PairKey] = []
        for request, hyps, window in zip(requests, hypotheses, windows, strict=True):
            for hypothesis in hyps if not isinstance(hyps, Exception) else ():
                key = (request.text, hypothesis, window)
                if key not in keys:
                    keys[key] = len(ordered)
                    ordered.append(key)
        slot = self._slots(self._build_pairs(ordered, premises, hypothesis_ids))
        refs: list[_Refs] = []
        for request, hyps, window in zip(requests, hypotheses, windows, strict=True):
            if isinstance(hyps, Exception):
                refs.append(hyps)
                continue
            positions = [slot.rows[keys[(request.text, h, window)]] for h in hyps]
            errors = [p for p in positions if isinstance(p, Exception)]
            refs.append(errors[0] if errors else [p for p in positions if isinstance(p, list)])
        return _Encoded(pairs=slot.pairs, refs=refs)

    def _window(
        self, hyps: list[str] | Exception, hypothesis_ids: dict[str, tuple[int, ...] | Exception]
    ) -> int | None:
        """Chunk mode: the event's window, the room beside its longest hypothesis (capped at
        ``window_tokens``); 0 when there is no room, None in truncate mode or on an error
        (which the pairs report)."""
        if self._chunking is None or isinstance(hyps, Exception):
            return None
        lengths = [len(ids) for h in hyps if not isinstance(ids := hypothesis_ids[h], Exception)]
        if len(lengths) < len(hyps):
            return None
        plan = self._chunk_plan(max(lengths))
        return 0 if plan is None else plan.window

    @staticmethod
    def _slots(built: list[_Built]) -> _Slots:
        """Number the built pairs: each key gets its rows in ``pairs``, or its error."""
        pairs: list[EncodedPair] = []
        rows: list[list[int] | Exception] = []
        for item in built:
            if isinstance(item, Exception):
                rows.append(item)
            else:
                rows.append(list(range(len(pairs), len(pairs) + len(item))))
                pairs.extend(item)
        return _Slots(pairs=pairs, rows=rows)

    def _build_pairs(
        self,
        keys: list[_PairKey],
        premises: dict[str, list[int] | Exception],
        hypotheses: dict[str, tuple[int, ...] | Exception],
    ) -> list[_Built]:
        built: list[_Built] = []
        for text, hypothesis, window in keys:
            premise, hyp = premises[text], hypotheses[hypothesis]
            if isinstance(premise, Exception):
                built.append(premise)
            elif isinstance(hyp, Exception):
                built.append(hyp)
            elif self._template is None:
                pair = self._tokenizer_pair(text, hypothesis, len(premise), len(hyp))
                built.append(pair if isinstance(pair, Exception) else [pair])
            else:
                try:
                    if window is None:
                        built.append([self._template_pair(premise, hyp)])
                    else:
                        built.append(self._chunk_pairs(premise, hyp, window))
                except Exception as exc:
                    built.append(exc)
        return built

    def _chunk_pairs(
        self, premise: list[int], hypothesis: tuple[int, ...], window: int
    ) -> list[EncodedPair]:
        """One pair per window of the premise; each says whether the cap left text unread."""
        assert self._template is not None
        assert self._chunking is not None
        if window < 1:
            raise HypothesisTooLongError(
                f"the event's longest hypothesis leaves no room for the text within the"
                f" model's maximum of {self._max_length} tokens"
            )
        plan = ChunkPlan.of(window, self._chunking.overlap_tokens, self._chunking.max_chunks)
        chunks, capped = premise_windows(premise, plan)
        pairs = []
        for chunk in chunks:
            ids, types = self._template.build(chunk, hypothesis, self._with_types)
            pairs.append(EncodedPair(ids, types, capped))
        return pairs

    def _template_pair(self, premise: list[int], hypothesis: tuple[int, ...]) -> EncodedPair:
        assert self._template is not None
        kept, truncated = fit_premise(
            premise, len(hypothesis), self._num_special, self._max_length, self._truncate_left
        )
        ids, types = self._template.build(kept, hypothesis, self._with_types)
        return EncodedPair(ids, types, truncated)

    def _tokenizer_pair(
        self, text: str, hypothesis: str, premise_length: int, hypothesis_length: int
    ) -> EncodedPair | Exception:
        """Fallback for tokenizers whose pair layout could not be reproduced."""
        try:
            encoding = self._tokenizer(
                text,
                hypothesis,
                truncation="only_first",
                max_length=self._max_length,
                return_token_type_ids=self._with_types,
            )
        except Exception as exc:
            return exc
        truncated = premise_length + hypothesis_length + self._num_special > self._max_length
        types = list(encoding[TOKEN_TYPE_IDS]) if self._with_types else None
        return EncodedPair(list(encoding["input_ids"]), types, truncated)

    # -- forward passes -------------------------------------------------------------------

    def _run(self, pairs: list[EncodedPair]) -> _Results:
        """Forward every pair; one synchronisation at the end reads all logits back.

        The next sub-batch is collated (in a helper thread on a GPU) while the device runs
        the current one. After a CUDA OOM the sub-batches not yet run are re-planned under
        the halved budget.
        """
        pending: list[tuple[list[int], torch.Tensor]] = []
        failures: dict[int, BaseException] = {}
        queue = deque(self._plan(list(range(len(pairs))), pairs))
        planned_with = self._budget.tokens
        ahead = self._prefetch(queue[0], pairs) if queue else None
        while queue and ahead is not None:
            rows, batch = queue.popleft(), ahead.result()
            ahead = self._prefetch(queue[0], pairs) if queue else None
            self._forward_rows(rows, pairs, pending, failures, batch)
            if queue and self._budget.tokens < planned_with:
                queue = deque(self._plan([row for rest in queue for row in rest], pairs))
                planned_with = self._budget.tokens
                ahead = self._prefetch(queue[0], pairs)
        logits = torch.zeros((len(pairs), self._labels.num_labels), dtype=torch.float32)
        if pending:
            index = torch.tensor([row for rows, _ in pending for row in rows])
            logits[index] = torch.cat([values for _, values in pending]).float().cpu()
        return _Results(logits=logits, failures=failures)

    def _plan(self, rows: list[int], pairs: list[EncodedPair]) -> list[list[int]]:
        lengths = [len(pairs[row].input_ids) for row in rows]
        return [
            [rows[i] for i in batch]
            for batch in plan_batches(
                lengths, self._budget.tokens, self._max_length, min_fill=MIN_ROW_FILL
            )
        ]

    def _prefetch(self, rows: list[int], pairs: list[EncodedPair]) -> Future[_Batch]:
        if self._collator is not None:
            return self._collator.submit(self._collate, rows, pairs)
        done: Future[_Batch] = Future()
        done.set_result(self._collate(rows, pairs))
        return done

    def _forward_rows(
        self,
        rows: list[int],
        pairs: list[EncodedPair],
        pending: list[tuple[list[int], torch.Tensor]],
        failures: dict[int, BaseException],
        batch: _Batch | None = None,
    ) -> None:
        """Forward ``rows``; on failure retry smaller pieces, down to single pairs.

        A pair that still fails alone is recorded in ``failures`` (its event gets a
        ScoreError). A CUDA OOM first halves the token budget for the rest of the run.
        """
        try:
            pending.append((rows, self._forward(batch or self._collate(rows, pairs))))
            return
        except torch.cuda.OutOfMemoryError as exc:
            self._halve_budget(rows, pairs)
            if len(rows) == 1:
                failures[rows[0]] = detached(exc)
                return
            pieces = self._replan(rows, pairs)
        except Exception as exc:
            if is_sticky_cuda_error(exc):
                raise DeviceError(f"model {self._name!r}: {exc}") from exc
            if len(rows) == 1:
                failures[rows[0]] = detached(exc)
                return
            pieces = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
        for piece in pieces:
            self._forward_rows(piece, pairs, pending, failures)

    def _halve_budget(self, rows: list[int], pairs: list[EncodedPair]) -> None:
        previous = self._budget.halve()
        log.warning(
            "CUDA out of memory, token budget halved",
            model=self._name,
            rows=len(rows),
            padded_length=padded_length(len(pairs[rows[0]].input_ids), self._max_length),
            max_batch_tokens=previous,
            new_max_batch_tokens=self._budget.tokens,
        )
        release_cached_memory(self._device)

    def _replan(self, rows: list[int], pairs: list[EncodedPair]) -> list[list[int]]:
        """Cut ``rows`` under the current budget, or in halves if that changes nothing."""
        plan = self._plan(rows, pairs)
        if len(plan) == 1:
            return [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
        return plan

    def _collate(self, rows: list[int], pairs: list[EncodedPair]) -> _Batch:
        """Right-padded CPU tensors (pinned on CUDA so the copy can overlap compute)."""
        longest = max(len(pairs[row].input_ids) for row in rows)
        width = padded_length(longest, self._max_length)
        ids = [
            pairs[row].input_ids + [self._pad_id] * (width - len(pairs[row].input_ids))
            for row in rows
        ]
        mask = [
            [1] * len(pairs[row].input_ids) + [0] * (width - len(pairs[row].input_ids))
            for row in rows
        ]
        batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if self._eos_pooled is not None:
            batch[LAST_POSITION] = torch.tensor([len(pairs[row].input_ids) - 1 for row in rows])
        if self._with_types:
            types = [
                (pairs[row].token_type_ids or [])
                + [self._pad_type_id] * (width - len(pairs[row].input_ids))
                for row in rows
            ]
            batch[TOKEN_TYPE_IDS] = torch.tensor(types)
        if self._pin:
            batch = {key: value.pin_memory() for key, value in batch.items()}
        return batch

    @torch.inference_mode()
    def _forward(self, batch: _Batch) -> torch.Tensor:
        inputs: dict[str, Any] = {
            key: value.to(self._device, non_blocking=self._pin) for key, value in batch.items()
        }
        last = inputs.pop(LAST_POSITION, None)
        if self._pass_use_cache:
            inputs["use_cache"] = False
        if self._eos_pooled is not None and last is not None:
            return self._eos_pooled(inputs, last)
        logits: torch.Tensor = self._model(**inputs).logits
        return logits

    # -- outcomes -------------------------------------------------------------------------

    def _outcome(
        self,
        request: ScoreRequest,
        refs: _Refs,
        *,
        pairs: list[EncodedPair],
        failures: dict[int, BaseException],
        multi: list[float],
        entail: list[float],
        probs: list[list[float]] | None,
    ) -> ScoreOutcome:
        if isinstance(refs, BaseException):
            return ScoreError.from_exception(refs)
        failed = next((failures[i] for rows in refs for i in rows if i in failures), None)
        if failed is not None:
            return ScoreError.from_exception(failed)
        # Per label, the per-window values its score comes from (one window: truncate mode).
        single = not request.multi_label and len(refs) > 1
        source = entail if single else multi
        per_window = [[source[i] for i in rows] for rows in refs]
        aggregated = [self._aggregate(values) for values in per_window]
        scores = _softmax(aggregated) if single else aggregated
        if not all(math.isfinite(score) for score in scores):
            # fp16 overflow or a broken model: a NaN must not reach the output topic.
            return ScoreError(
                error_class="NonFiniteScore",
                message=f"model {self._name!r} produced non-finite scores {scores}",
            )
        order = sorted(range(len(refs)), key=lambda k: -scores[k])
        nli = None
        if probs is not None:
            nli = self._nli(
                request,
                [rows[_argmax(v)] for rows, v in zip(refs, per_window, strict=True)],
                refs,
                order,
                probs,
            )
        return LabelScores(
            labels=tuple(request.labels[k] for k in order),
            scores=tuple(scores[k] for k in order),
            truncated=any(pairs[i].truncated for rows in refs for i in rows),
            nli=nli,
            chunks=None if self._chunking is None else len(refs[0]),
        )

    def _aggregate(self, values: list[float]) -> float:
        """A label's value over its windows: the chunk mode's max or mean (one: itself)."""
        if self._chunking is not None and self._chunking.aggregation == "mean":
            return _mean(values)
        return max(values)

    def _nli(
        self,
        request: ScoreRequest,
        best: list[int],
        refs: list[list[int]],
        order: list[int],
        probs: list[list[float]],
    ) -> dict[str, NliProbabilities]:
        """Per label, the probabilities of its best window (``max``) or their mean."""
        labels = self._labels
        mean = self._chunking is not None and self._chunking.aggregation == "mean"
        found: dict[str, NliProbabilities] = {}
        for k in order:
            rows = refs[k] if mean else [best[k]]
            row = [_mean([probs[i][column] for i in rows]) for column in range(labels.num_labels)]
            found[request.labels[k]] = NliProbabilities(
                entailment=row[labels.entailment],
                contradiction=row[labels.named_contradiction],
                neutral=None if labels.neutral is None else row[labels.neutral],
            )
        return found
