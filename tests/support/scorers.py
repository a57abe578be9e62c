"""Test scorers that plug into worker subprocesses through ``TAGSTREAM_SCORER=module:attr``.

* ``tests.support.scorers:fake`` — fast and deterministic: a label that occurs in the
  text scores 0.95, any other label a hash-derived value below 0.4, so the tags of a
  text are exactly the labels it mentions. A text containing :data:`ERROR_MARKER` gets a
  per-event :class:`ScoreError`.
* ``tests.support.scorers:raising`` — like ``fake``, but a batch that contains
  :data:`RAISE_MARKER` makes the whole ``score`` call raise (the worker must then isolate
  the event).
* ``tests.support.scorers:gated`` — like ``fake``, but loading the "model" (constructing
  the scorer) waits until the file named by ``TAGSTREAM_TEST_SCORER_LOAD_GATE`` exists: a
  model load that lasts exactly as long as the test wants.

All of them honour these environment variables:

* ``TAGSTREAM_TEST_SCORER_SLEEP_MS``: sleep this long in every ``score`` call (a slow
  model);
* ``TAGSTREAM_TEST_SCORER_LOG``: append one JSON line per ``score`` call to this file:
  ``{"pid", "size", "started", "ended", "warm_up"}`` (wall-clock seconds; ``warm_up`` marks
  the worker's start-up call, see :func:`worker.pipeline.inference.warm_up`);
* ``TAGSTREAM_TEST_SCORER_GATE``: a ``score`` call whose batch contains
  :data:`BLOCK_MARKER` blocks until this file exists (a stuck model, for as long as the
  test wants).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from worker.config.settings import ModelSettings
from worker.contract.scorer import LabelScores, ModelInfo, ScoreError, ScoreOutcome, ScoreRequest
from worker.pipeline.inference import WARM_UP_TEXT

ERROR_MARKER: Final = "<<score-error>>"
RAISE_MARKER: Final = "<<scorer-raises>>"
BLOCK_MARKER: Final = "<<scorer-blocks>>"
SLEEP_ENV: Final = "TAGSTREAM_TEST_SCORER_SLEEP_MS"
LOG_ENV: Final = "TAGSTREAM_TEST_SCORER_LOG"
GATE_ENV: Final = "TAGSTREAM_TEST_SCORER_GATE"
LOAD_GATE_ENV: Final = "TAGSTREAM_TEST_SCORER_LOAD_GATE"
# How often a closed gate is looked at again: short next to any test's patience.
GATE_POLL_S: Final = 0.05
MENTIONED_SCORE: Final = 0.95
# Labels a text does not mention stay below the default 0.5 threshold.
UNMENTIONED_MAX: Final = 0.4
# A rough "tokens per character" for the budget estimate (BPE averages ~4 chars a token).
CHARS_PER_TOKEN: Final = 4
HYPOTHESIS_TOKENS: Final = 8


def wait_for_gate(path: str | None) -> None:
    """Block until the file ``path`` exists (at once when ``path`` is None or empty)."""
    if not path:
        return
    gate = Path(path)
    while not gate.exists():
        time.sleep(GATE_POLL_S)


def _hash_score(text: str, label: str) -> float:
    digest = hashlib.blake2b(f"{label}\x00{text}".encode(), digest_size=4).digest()
    return round(int.from_bytes(digest, "big") / 2**32 * UNMENTIONED_MAX, 6)


class FakeScorer:
    """Deterministic scores without a model."""

    def __init__(self, settings: ModelSettings, *, raise_marker: str | None = None) -> None:
        self._settings = settings
        self._raise_marker = raise_marker
        self._sleep_s = int(os.environ.get(SLEEP_ENV, "0")) / 1000
        self._log_path = os.environ.get(LOG_ENV)
        self._gate = os.environ.get(GATE_ENV)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name="fake", revision="v1", scorer="fake", device="cpu", dtype="none")

    @property
    def max_batch_tokens(self) -> int:
        return self._settings.max_batch_tokens

    def estimate_tokens(self, request: ScoreRequest) -> int:
        rows = len(request.labels)
        return rows * (len(request.text) // CHARS_PER_TOKEN + HYPOTHESIS_TOKENS)

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        started = time.time()
        if self._sleep_s:
            time.sleep(self._sleep_s)
        if any(BLOCK_MARKER in request.text for request in requests):
            wait_for_gate(self._gate)
        if self._raise_marker and any(self._raise_marker in r.text for r in requests):
            raise RuntimeError("the fake scorer raises on a marked batch")
        outcomes = [self._score_one(request) for request in requests]
        self._log(requests, started)
        return outcomes

    def _score_one(self, request: ScoreRequest) -> ScoreOutcome:
        if ERROR_MARKER in request.text:
            return ScoreError(error_class="FakeScoreError", message="marked text cannot be scored")
        lowered = request.text.lower()
        pairs = [
            (
                label,
                MENTIONED_SCORE if label.lower() in lowered else _hash_score(request.text, label),
            )
            for label in request.labels
        ]
        pairs.sort(key=lambda pair: pair[1], reverse=True)
        return LabelScores(
            labels=tuple(label for label, _ in pairs),
            scores=tuple(score for _, score in pairs),
            truncated=False,
        )

    def _log(self, requests: Sequence[ScoreRequest], started: float) -> None:
        if not self._log_path:
            return
        line = {
            "pid": os.getpid(),
            "size": len(requests),
            "started": started,
            "ended": time.time(),
            "warm_up": all(request.text == WARM_UP_TEXT for request in requests),
        }
        with open(self._log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")


def fake(settings: ModelSettings) -> FakeScorer:
    return FakeScorer(settings)


def raising(settings: ModelSettings) -> FakeScorer:
    return FakeScorer(settings, raise_marker=RAISE_MARKER)


def gated(settings: ModelSettings) -> FakeScorer:
    wait_for_gate(os.environ.get(LOAD_GATE_ENV))
    return FakeScorer(settings)


def read_scorer_log(
    path: str | os.PathLike[str], *, include_warm_up: bool = False
) -> list[dict[str, float]]:
    """The lines written through ``TAGSTREAM_TEST_SCORER_LOG``: the batches of events, and
    with ``include_warm_up`` the start-up warm-up calls too."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [json.loads(line) for line in handle if line.strip()]
    except FileNotFoundError:
        return []
    return [line for line in lines if include_warm_up or not line.get("warm_up")]
