"""Build the configured scorer: ``nli`` (default), ``embedding``, or a user factory.

A user factory is named ``package.module:attribute``; the attribute is called with the
:class:`~worker.config.settings.ModelSettings` and must return an object that satisfies
:class:`~worker.contract.scorer.Scorer`. This is how custom models (and test doubles in
worker subprocesses) plug in without touching the worker.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import cast

from worker.config.settings import ModelSettings
from worker.contract.scorer import Scorer
from worker.errors import ScorerConfigError


def _import_factory(path: str) -> Callable[[ModelSettings], object]:
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attribute)
    except (ImportError, AttributeError) as exc:
        raise ScorerConfigError(f"scorer: cannot import {path!r}: {exc}") from exc
    if not callable(factory):
        raise ScorerConfigError(f"scorer: {path!r} is not callable")
    return cast(Callable[[ModelSettings], object], factory)


def build_scorer(settings: ModelSettings, *, include_nli_probs: bool = False) -> Scorer:
    """Load the model and return a ready scorer (this is where start-up time goes).

    ``include_nli_probs`` (``TaggingSettings.include_nli_probs``) asks the NLI scorer for the
    per-label entailment / neutral / contradiction probabilities; other scorers ignore it.
    """
    if settings.scorer == "nli":
        from worker.scoring.nli import NliScorer

        return NliScorer.from_settings(settings, include_nli_probs=include_nli_probs)
    if settings.scorer == "embedding":
        from worker.scoring.embedding import EmbeddingScorer

        return EmbeddingScorer.from_settings(settings)
    scorer = _import_factory(settings.scorer)(settings)
    if not isinstance(scorer, Scorer):
        raise ScorerConfigError(
            f"scorer: {settings.scorer!r} returned {type(scorer).__name__}, not a Scorer"
        )
    return scorer
