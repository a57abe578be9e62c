"""HTTP requests into the worker's micro-batches, and each result back to its request.

The worker's own machinery, driven from the event loop instead of the poll loop: a
:class:`~worker.pipeline.batching.MicroBatcher` closes batches at ``max_batch_size`` or the
scorer's token budget; a :class:`~worker.pipeline.batching.BatchHandoff` bounded at
``max_in_flight_batches`` feeds one inference thread, which scores each batch with
:func:`~worker.pipeline.inference.score_isolated` (a raising call is retried text by text).
Texts of concurrent requests therefore share batches as events of one poll do.

When the open batch goes to the model besides (``TAGSTREAM_SERVE_BATCHING``):

- ``continuous`` (the default): the moment the inference thread is idle, nothing submitted
  and unfinished (reason ``idle``). A lone request is scored at once; while the model is
  busy the texts that arrive fill the open batch, which goes as soon as the model is done
  (or earlier, full, to queue behind it). ``max_wait_ms`` plays no part: a batch is scored
  after those in flight however early it closes, so a timer could only make it smaller.
- ``windowed``: the worker's rule, ``max_wait_ms`` after its first text (reason ``time``),
  even when the model has nothing to do: fewer, fuller batches at the cost of that wait.

Threads: the batcher, the timer that closes a batch on time and every future belong to the
event loop's thread. The inference thread touches only the handoff and hands each batch's
outcomes back with ``loop.call_soon_threadsafe``; that callback runs after the handoff
counted the batch finished, so the idle check that follows it cannot miss an idle model.

Bound: at most ``max_pending`` texts are accepted and not yet answered; :meth:`classify`
refuses a request that would pass it (:class:`QueueFullError`, answered 429).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

import structlog

from worker.config.settings import BatchSettings
from worker.contract.scorer import ScoreError, ScoreOutcome, Scorer, ScoreRequest
from worker.pipeline.batching import BatchHandoff, CloseReason, MicroBatch, MicroBatcher
from worker.pipeline.inference import score_isolated
from worker.pipeline.observer import Observer

log = structlog.get_logger(__name__)

THREAD_NAME: Final = "tagstream-serve-inference"
# What one waiting text costs beyond its characters (the request tuple, its future, the
# batch slot); the same order as the worker's PENDING_EVENT_OVERHEAD_BYTES.
PENDING_TEXT_OVERHEAD_BYTES: Final = 1_024
# A str of ASCII text costs a byte per character; UTF-8 beyond ASCII up to four.
BYTES_PER_CHAR: Final = 2
# The error a text gets when the inference thread is gone (a sticky device error) or the
# server stops before its batch was scored.
UNAVAILABLE_CLASS: Final = "ScorerUnavailable"
# How often the drain looks whether the handoff has room for the batches still waiting.
DRAIN_POLL_S: Final = 0.01


class QueueFullError(Exception):
    """Accepting the request would pass ``max_pending`` texts waiting for the model."""

    def __init__(self, pending: int, wanted: int, limit: int) -> None:
        super().__init__(
            f"{pending} texts are waiting for the model; {wanted} more would pass "
            f"TAGSTREAM_SERVE_MAX_PENDING_TEXTS={limit}"
        )


class ServeItem(NamedTuple):
    """One text waiting for the model, and the future its request awaits."""

    request: ScoreRequest
    tokens: int
    future: asyncio.Future[ScoreOutcome]

    @property
    def size(self) -> int:
        return PENDING_TEXT_OVERHEAD_BYTES + BYTES_PER_CHAR * len(self.request.text)


ServeBatch = MicroBatch[ServeItem]


class RequestBatcher:
    """Micro-batches the texts of concurrent requests onto one inference thread.

    Build it inside the running event loop; call :meth:`start` once and :meth:`drain`
    at shutdown.
    """

    def __init__(
        self,
        scorer: Scorer,
        batch: BatchSettings,
        observer: Observer,
        max_pending: int,
        on_crash: Callable[[BaseException], None] | None = None,
        *,
        continuous: bool = True,
    ) -> None:
        self._scorer = scorer
        self._observer = observer
        self._loop = asyncio.get_running_loop()
        self._batcher = MicroBatcher[ServeItem](
            max_size=batch.max_batch_size,
            max_wait_s=batch.max_wait_ms / 1000,
            max_tokens=scorer.max_batch_tokens,
            on_close=self._on_close,
        )
        self._handoff = BatchHandoff[ServeBatch](batch.max_in_flight_batches)
        self._timer: asyncio.TimerHandle | None = None
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self.max_pending = max_pending
        self.pending = 0
        self.crashed: BaseException | None = None
        self._on_crash = on_crash
        # Continuous batching (TAGSTREAM_SERVE_BATCHING=continuous): an idle model takes the
        # open batch at once, and no timer runs; else the worker's max_wait_ms applies.
        self.continuous = continuous

    @property
    def in_flight(self) -> int:
        """Batches handed to the inference thread and not finished."""
        return self._handoff.in_flight

    def start(self) -> None:
        self._thread.start()

    def estimate_tokens(self, request: ScoreRequest) -> int:
        return self._scorer.estimate_tokens(request)

    async def classify(
        self, requests: Sequence[ScoreRequest], tokens: Sequence[int]
    ) -> list[ScoreOutcome]:
        """The outcomes of one request's texts, in order, once their batches are scored.

        Raises :class:`QueueFullError` when they do not fit under ``max_pending``.
        """
        if self.pending + len(requests) > self.max_pending:
            raise QueueFullError(self.pending, len(requests), self.max_pending)
        futures: list[asyncio.Future[ScoreOutcome]] = []
        for request, cost in zip(requests, tokens, strict=True):
            future: asyncio.Future[ScoreOutcome] = self._loop.create_future()
            futures.append(future)
            self._batcher.add(ServeItem(request, cost, future))
        self.pending += len(requests)
        self._pump()
        return list(await asyncio.gather(*futures))

    def _pump(self) -> None:
        """Close a batch that is due, hand ready batches over, and time the open one
        (windowed), or hand the open batch to an idle model (continuous)."""
        if self.continuous:
            self._submit_ready()
            if self._handoff.in_flight == 0 and self._batcher.open_size:
                self._batcher.flush(CloseReason.IDLE)
                self._submit_ready()
            return
        self._batcher.close_if_due()
        self._submit_ready()
        self._arm_timer()

    def _submit_ready(self) -> None:
        while self._batcher.ready:
            if self.crashed is not None:
                self._resolve(self._batcher.pop_ready().items, None)
                continue
            if not self._handoff.try_submit(self._batcher.ready[0]):
                break
            batch = self._batcher.pop_ready()
            self._observer.batch_submitted(len(batch), self._handoff.in_flight)

    def _arm_timer(self) -> None:
        left = self._batcher.time_left()
        if left is None or self._timer is not None:
            return
        self._timer = self._loop.call_later(left, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _on_close(self, batch: ServeBatch) -> None:
        reason = batch.reason.value if batch.reason is not None else "unknown"
        age_s = max(0.0, time.monotonic() - batch.opened_at)
        self._observer.batch_closed(len(batch), batch.tokens, reason, age_s)

    def _run(self) -> None:
        """The inference thread: score each batch, hand its outcomes to the event loop."""
        try:
            while True:
                with self._observer.waiting_for_batch():
                    batch = self._handoff.take()
                if batch is None:
                    return
                try:
                    self._score(batch)
                except BaseException:
                    self._call_soon(self._resolve, batch.items, None)
                    raise
                finally:
                    self._handoff.finished()
                    self._call_soon(self._pump)
        except BaseException as exc:  # a DeviceError: no later batch can be scored either
            log.exception("serve inference thread crashed")
            self.crashed = exc
            self._call_soon(self._fail_waiting)

    def _score(self, batch: ServeBatch) -> None:
        started = time.monotonic()
        outcomes = score_isolated(self._scorer, [item.request for item in batch.items])
        failed = sum(isinstance(outcome, ScoreError) for outcome in outcomes)
        self._observer.batch_scored(len(batch), failed, time.monotonic() - started)
        self._call_soon(self._resolve, batch.items, outcomes)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        # A closed loop raises RuntimeError: nobody waits for the answer any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    def _resolve(self, items: Sequence[ServeItem], outcomes: Sequence[ScoreOutcome] | None) -> None:
        """Event loop: give each item's request its outcome (None: the scorer is gone)."""
        for index, item in enumerate(items):
            outcome = outcomes[index] if outcomes is not None else _unavailable()
            if not item.future.done():  # a request whose client went away is cancelled
                item.future.set_result(outcome)
        self.pending -= len(items)

    def _fail_waiting(self) -> None:
        """Event loop: the inference thread is gone; answer every text that waits, and
        report it (the command stops the server: no later batch could be scored)."""
        self._batcher.flush()
        self._pump()
        if self._on_crash is not None and self.crashed is not None:
            self._on_crash(self.crashed)

    async def drain(self, timeout_s: float) -> bool:
        """Score what waits, then stop the inference thread; False if it did not finish in
        ``timeout_s`` (texts still waiting get a :class:`ScoreError`)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = time.monotonic() + timeout_s
        self._batcher.flush()
        self._pump()
        while self._batcher.ready and time.monotonic() < deadline and self.crashed is None:
            await asyncio.sleep(DRAIN_POLL_S)
            self._pump()
        self._handoff.close()
        left = max(0.0, deadline - time.monotonic())
        await asyncio.to_thread(self._thread.join, left)
        finished = not self._thread.is_alive()
        while self._batcher.ready:
            self._resolve(self._batcher.pop_ready().items, None)
        return finished


def _unavailable() -> ScoreError:
    return ScoreError(
        error_class=UNAVAILABLE_CLASS,
        message="the scorer stopped before this text was scored",
        transient=True,
    )
