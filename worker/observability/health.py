"""Liveness and readiness state: what ``/healthz`` and ``/readyz`` answer.

* ``/healthz`` (Kubernetes liveness): 200 while the poll loop and the inference thread have
  each heartbeaten within ``stale_after_s`` (an inference thread blocked on an empty queue
  inside :meth:`HealthState.inference_idle` counts as healthy); 503 with a JSON body naming
  the stale component otherwise. A component that has not beaten yet is "starting" and does
  not fail the check (model loading can take minutes; a startup probe on ``/readyz`` bounds
  that phase). Once shutdown has begun the check passes: restarting a pod that is already
  draining helps no one.
* ``/readyz`` (readiness): 200 only after :meth:`HealthState.mark_model_ready` (model loaded
  and warmed by one scored batch) and :meth:`HealthState.mark_joined` (consumer joined its
  group), and, once :meth:`HealthState.mark_profiles_loading` was called (a control topic
  is configured), after :meth:`HealthState.mark_profiles_loaded`; 503 again after
  :meth:`HealthState.mark_left` or :meth:`HealthState.mark_shutting_down`.

The HTTP server that serves these is :mod:`worker.observability.server`.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from worker.config.observability import DEFAULT_HEALTH_STALE_AFTER_S


class Component(enum.StrEnum):
    """The threads whose progress /healthz watches."""

    POLL = "poll"
    INFERENCE = "inference"


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one probe: pass or fail, and the JSON body explaining it."""

    ok: bool
    body: dict[str, Any]


class HealthState:
    """Heartbeats and lifecycle marks, shared by the worker threads and the HTTP server.

    Every method is thread-safe. Ages use ``clock`` (monotonic by default), so wall-clock
    jumps never make a component look stale or fresh.
    """

    def __init__(
        self,
        stale_after_s: float = DEFAULT_HEALTH_STALE_AFTER_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        needs_group: bool = True,
    ) -> None:
        if stale_after_s <= 0:
            raise ValueError("stale_after_s must be positive")
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_beat: dict[Component, float] = {}
        self._waiting: set[Component] = set()
        self._model_ready = False
        # ``tagstream serve`` joins no consumer group: readiness is the model alone.
        self._joined = not needs_group
        # True until a control topic starts loading: without one there is nothing to wait for.
        self._profiles_loaded = True
        self._scorer_failing = False
        self._shutting_down = False

    # -- heartbeats --------------------------------------------------------------------------

    def beat_poll(self) -> None:
        """The poll loop made progress (call once per loop iteration, records or not)."""
        self._beat(Component.POLL)

    def beat_inference(self) -> None:
        """The inference thread made progress: it took a batch, scored one, or a queue wait
        timed out. An idle thread must not look stuck: either wait on the queue with a
        timeout well below ``stale_after_s`` and beat on every wake-up, or call
        :meth:`inference_idle` around a blocking wait."""
        self._beat(Component.INFERENCE)

    @contextlib.contextmanager
    def inference_idle(self) -> Iterator[None]:
        """Wrap the inference thread's blocking wait on its queue::

            with health.inference_idle():
                batch = handoff.take()

        While inside, the thread counts as healthy however long the queue stays empty; on
        leaving (a batch arrived) it beats and the bound applies again while it scores.
        """
        now = self._clock()
        with self._lock:
            self._last_beat[Component.INFERENCE] = now
            self._waiting.add(Component.INFERENCE)
        try:
            yield
        finally:
            self._beat(Component.INFERENCE)

    def _beat(self, component: Component) -> None:
        now = self._clock()
        with self._lock:
            self._last_beat[component] = now
            self._waiting.discard(component)

    # -- lifecycle ---------------------------------------------------------------------------

    def mark_model_ready(self) -> None:
        """The model is loaded and one warm-up batch has been scored."""
        with self._lock:
            self._model_ready = True

    def mark_joined(self) -> None:
        """The consumer joined its group (first assignment, possibly empty)."""
        with self._lock:
            self._joined = True

    def mark_profiles_loading(self) -> None:
        """The control topic is being read at start-up: not ready until it is read."""
        with self._lock:
            self._profiles_loaded = False

    def mark_profiles_loaded(self) -> None:
        """The control topic was read to the end offsets it had at start-up."""
        with self._lock:
            self._profiles_loaded = True

    def mark_left(self) -> None:
        """The consumer lost its group membership (``on_lost``) or left it."""
        with self._lock:
            self._joined = False

    def mark_scorer_failing(self, failing: bool) -> None:
        """The inference circuit opened (most events fail) or closed again."""
        with self._lock:
            self._scorer_failing = failing

    def mark_shutting_down(self) -> None:
        """Shutdown began: /readyz fails from now on; /healthz no longer checks heartbeats."""
        with self._lock:
            self._shutting_down = True

    # -- probes ------------------------------------------------------------------------------

    def liveness(self) -> Check:
        now = self._clock()
        with self._lock:
            beats = dict(self._last_beat)
            waiting = set(self._waiting)
            shutting_down = self._shutting_down
        components: dict[str, Any] = {}
        stale: list[str] = []
        for component in Component:
            if component not in beats:
                components[component.value] = {"state": "starting"}
                continue
            age = max(0.0, now - beats[component])
            if component in waiting:
                components[component.value] = {"state": "waiting", "age_s": round(age, 3)}
                continue
            components[component.value] = {"age_s": round(age, 3)}
            if age > self.stale_after_s:
                stale.append(component.value)
        status = "shutting_down" if shutting_down else ("stale" if stale else "ok")
        body = {
            "status": status,
            "stale": stale,
            "stale_after_s": self.stale_after_s,
            "components": components,
        }
        return Check(ok=shutting_down or not stale, body=body)

    def readiness(self) -> Check:
        with self._lock:
            model_ready, profiles, joined, scorer_ok, shutting_down = (
                self._model_ready,
                self._profiles_loaded,
                self._joined,
                not self._scorer_failing,
                self._shutting_down,
            )
        if shutting_down:
            return Check(ok=False, body={"status": "shutting_down"})
        waiting_for = [
            name
            for name, done in (
                ("model", model_ready),
                ("profiles", profiles),
                ("group", joined),
                ("scorer", scorer_ok),
            )
            if not done
        ]
        if waiting_for:
            return Check(ok=False, body={"status": "not_ready", "waiting_for": waiting_for})
        return Check(ok=True, body={"status": "ready"})
