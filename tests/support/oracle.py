"""The pydantic path from scores to a scored event: the test oracle of the wire codec.

Production writes scored events with :func:`worker.contract.codec.encode_output` alone;
these build a :class:`~worker.contract.events.ScoredEvent` the slow, validated way and
encode it, so tests can check that both give the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

import orjson

from worker.contract.codec import TaggingOptions, as_utc, select_tags
from worker.contract.events import (
    InputEvent,
    ModelRef,
    NliProbs,
    ProfileRef,
    ScoredEvent,
    Source,
)
from worker.contract.profiles import Profile
from worker.contract.scorer import LabelScores, ModelInfo, NliProbabilities, ScoreRequest

# 'Z' instead of '+00:00' for UTC, and a naive datetime is taken to be UTC (as the codec).
_ORJSON_OPTIONS: Final = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC


def _nli_probs(labels: tuple[str, ...], nli: Mapping[str, NliProbabilities]) -> dict[str, NliProbs]:
    return {
        label: NliProbs(
            entailment=probs.entailment,
            contradiction=probs.contradiction,
            neutral=probs.neutral,
        )
        for label in labels
        if (probs := nli.get(label)) is not None
    }


_model_refs: dict[tuple[str, str], ModelRef] = {}


def _model_ref(model: ModelInfo) -> ModelRef:
    """One ModelRef per model, shared by its scored events (a worker has one model)."""
    key = (model.name, model.revision)
    ref = _model_refs.get(key)
    if ref is None:
        ref = _model_refs[key] = ModelRef(name=model.name, revision=model.revision)
    return ref


def event_id(event: InputEvent, source: Source) -> str:
    """The caller's id, else the record's coordinates ``topic:partition:offset``."""
    if event.id is not None:
        return event.id
    return f"{source.topic}:{source.partition}:{source.offset}"


def build_scored_event(  # noqa: PLR0917
    event: InputEvent,
    request: ScoreRequest,
    scores: LabelScores,
    source: Source,
    tagging: TaggingOptions,
    model: ModelInfo,
    scored_at: datetime,
    profile: Profile | None = None,
) -> ScoredEvent:
    """The output record of one scored event; pydantic checks the scorer's output (a
    ValidationError for scores outside 0..1, say). ``source`` and the model reference are
    model instances, which pydantic takes as they are."""
    nli = scores.nli if tagging.include_nli_probs else None
    return ScoredEvent(
        id=event_id(event, source),
        source=source,
        labels=list(scores.labels),
        scores=list(scores.scores),
        tags=select_tags(scores, request.multi_label, tagging if profile is None else profile),
        multi_label=request.multi_label,
        hypothesis_template=request.hypothesis_template,
        truncated=scores.truncated,
        model=_model_ref(model),
        metadata=event.metadata,
        scored_at=as_utc(scored_at),
        nli=None if nli is None else _nli_probs(scores.labels, nli),
        profile=None if profile is None else ProfileRef(name=profile.name, version=profile.version),
        chunks_read=scores.chunks,
    )


def encode_scored_event(event: ScoredEvent) -> bytes:
    """Compact JSON bytes of a scored event; ``nli``, ``profile`` and ``chunks_read`` are left
    out when absent.

    The same bytes as ``orjson.dumps(event.model_dump(exclude_none_nli_and_chunks))``, written from
    the attributes directly: ``model_dump`` costs several times the encoding itself.
    """
    source, model = event.source, event.model
    document: dict[str, Any] = {
        "id": event.id,
        "source": {
            "topic": source.topic,
            "partition": source.partition,
            "offset": source.offset,
            "timestamp": source.timestamp,
        },
        "labels": event.labels,
        "scores": event.scores,
        "tags": event.tags,
        "multi_label": event.multi_label,
        "hypothesis_template": event.hypothesis_template,
        "truncated": event.truncated,
        "model": {"name": model.name, "revision": model.revision},
        "metadata": event.metadata,
        "scored_at": event.scored_at,
    }
    if event.nli is not None:
        document["nli"] = {
            label: {
                "entailment": probs.entailment,
                "contradiction": probs.contradiction,
                "neutral": probs.neutral,
            }
            for label, probs in event.nli.items()
        }
    if event.profile is not None:
        document["profile"] = {"name": event.profile.name, "version": event.profile.version}
    if event.chunks_read is not None:
        document["chunks_read"] = event.chunks_read
    return orjson.dumps(document, option=_ORJSON_OPTIONS)
