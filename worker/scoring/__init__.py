"""Scorers: turn (text, labels, template) requests into per-label scores."""

from worker.contract.scorer import (
    LabelScores,
    ModelInfo,
    NliProbabilities,
    ScoreError,
    ScoreOutcome,
    Scorer,
    ScoreRequest,
)

__all__ = [
    "LabelScores",
    "ModelInfo",
    "NliProbabilities",
    "ScoreError",
    "ScoreOutcome",
    "ScoreRequest",
    "Scorer",
]
