"""NLI throughput on an NVIDIA GPU: the transformers pipeline against tagstream's NliScorer.

One command, no network, within ``--time-budget-s`` (default 330 s, so that the whole device
call, wheels installed, stays near 6 minutes and a rerun fits the session's 15; whatever does
not fit is reported as skipped):

1. Model, through the worker's own loading path: a model directory written with
   ``save_pretrained`` (``--model DIR``: real local weights, e.g. a copy of
   facebook/bart-large-mnli; else a bart-large-shaped BART, 12+12 layers, d_model 1024, FFN
   4096, 16 heads, random weights, with the tests' offline BPE tokenizer) is loaded with
   ``NliScorer.from_settings(ModelSettings(model=DIR, device=..., dtype=...))``. The pipeline
   and the sweep use the model that ``load_sequence_classifier`` (what ``from_settings``
   calls) returns for the same settings.
2. Workload: distinct English-like premises cut to give ~64- and ~128-token pairs with the
   8 labels' hypotheses ("This example is {}."), multi-label. No repeated texts, so the
   scorer's de-duplication gains nothing: this compares compute paths only.
3. Rows, for bfloat16 and float16 at each pair length: the pipeline at batch sizes
   ``--pipeline-batch-sizes`` (best reported) and NliScorer at the default token budget, fed
   micro-batches closed on its token estimate as the worker's batcher closes them; then a
   token-budget sweep of NliScorer (bfloat16, ~128 tokens).
4. Every row: one untimed run of the whole workload (kernels, caches and allocator warmed;
   a forward pre-hook counts the tokens the model is fed), then timed repetitions until they
   have lasted ``--min-seconds`` (3 s) and number at least 3; pairs/s is their median, with
   min/max and quartiles. Tokens are reported as fed: padded rows x width summed over the
   forward passes, and the attention mask's ones ("useful"), next to the batcher's
   characters-per-token estimate, with the ratio.
5. Ceiling: an 8192x8192x8192 bf16 matmul timed in the same run (FLOP/s = 2*8192^3/t).
   Each row's model FLOP/s is estimated as 2 x (nn.Linear weights) x tokens per pair x pairs/s
   (attention's length-squared term left out) and given as a fraction of that ceiling, for
   the tokens fed and for the useful ones.
6. Host synchronisations of one scorer call (one micro-batch), counted with
   ``torch.cuda.set_sync_debug_mode("warn")``; "n/a" on a CPU.
7. GPU busy: the mean of NVML's utilization.gpu (percent of time a kernel was running)
   sampled every 50 ms during each row's timed repetitions (nvidia-ml-py, else nvidia-smi).

Writes ``gpu.json`` and ``gpu.md`` (the table) to ``--out``. ``--dry-run`` runs the same code
on the CPU with a tiny model and a few events (seconds), to check the script before a GPU run.

Needs torch and transformers, and the worker's own dependencies (pydantic, pydantic-settings,
structlog, orjson): the script checks them first and says what is missing. On the GPU
machine, ``bench/gpu-run.sh`` installs them from the wheels ``make gpu-bundle`` downloads.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:
    import torch

    from worker.contract.scorer import ScoreRequest
    from worker.scoring.nli import NliScorer

REPO: Final = Path(__file__).resolve().parents[1]

EXIT_MISSING: Final = 2
EXIT_NOTHING_RAN: Final = 3
EXIT_ROW_FAILED: Final = 4
REQUIRED_MODULES: Final = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "pydantic",
    "pydantic_settings",
    "structlog",
    "orjson",
)
# Versions reported with the results (read from package metadata).
LIBRARIES: Final = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "structlog",
    "orjson",
    "typing-extensions",
    "nvidia-ml-py",
)
LABEL_COUNT: Final = 8
TEMPLATE: Final = "This example is {}."
PAIR_LENGTHS: Final = (64, 128)
DTYPES: Final = ("bfloat16", "float16")
SWEEP_DTYPE: Final = "bfloat16"
# The whole script, model build included: ~6 min of a device call with the wheels' install,
# leaving a rerun room inside the session's 15 minutes of device time.
DEFAULT_TIME_BUDGET_S: Final = 330.0
# Timed repetitions of a row last at least this: long enough that clock ramp-up, a stray
# host hiccup or one slow repetition moves the median little.
DEFAULT_MIN_SECONDS: Final = 3.0
# The dry run only checks the code path: a fraction of a second per row.
DRY_MIN_SECONDS: Final = 0.1
# A median and a spread need at least three repetitions.
MIN_REPEATS: Final = 3
# Bounds a row whose repetitions take microseconds (dry run): the median is settled long before.
MAX_REPEATS: Final = 1000
# Pairs per repetition: 512 events x 8 labels is dozens of full-budget forward passes, ~1 s
# per repetition on an H200 for a bart-large-shaped model.
GPU_EVENTS: Final = 512
# The pipeline is slower; fewer events keep its repetitions about as short.
GPU_PIPELINE_EVENTS: Final = 256
DRY_EVENTS: Final = 4
GPU_PIPELINE_BATCH_SIZES: Final = (16, 64, 256)
DRY_PIPELINE_BATCH_SIZES: Final = (4,)
GPU_BUDGETS: Final = (4096, 8192, 16384, 32768, 65536)
DRY_BUDGETS: Final = (512, 2048)
SAMPLE_EVERY_S: Final = 0.05
# A row is skipped when less than this is left of the time budget (one untimed run and
# three timed repetitions of the slowest row take about this long).
MIN_LEFT_S: Final = 10.0
SPECIAL_TOKENS_PER_PAIR: Final = 4
# The ceiling: the 8192^3 bf16 matmul (~790 TFLOP/s has been seen on an H200).
CEILING_N: Final = 8192
# On the CPU of a dry run a 256^3 product takes milliseconds.
DRY_CEILING_N: Final = 256
# Untimed products before timing: cuBLAS heuristics chosen, clocks up.
CEILING_WARMUPS: Final = 3
# Products per timed group: 10 x ~1.4 ms at 790 TFLOP/s, far above the timer's resolution.
CEILING_GROUP: Final = 10
# Timed groups continue until they have lasted this long.
CEILING_MIN_S: Final = 1.0
# torch's sync debug warning says "called a synchronizing CUDA operation".
SYNC_WARNING_MARK: Final = "synchroniz"
# Distinct call sites of host synchronisations kept in the report.
SYNC_SITES_KEPT: Final = 10


def missing_modules() -> list[str]:
    missing = []
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


# -- GPU busy sampling ---------------------------------------------------------------------


class BusySampler:
    """Samples NVML's utilization.gpu in a thread; ``mean()`` gives the mean over a window."""

    def __init__(self, device_index: int | None) -> None:
        """``device_index`` None: no GPU, nothing sampled (the dry run)."""
        self.method: str | None = None
        self._read: Callable[[], float] | None = None
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device_index is None:
            return
        try:
            # nvidia-ml-py (the bench extra; in the GPU image), untyped.
            import pynvml  # type: ignore[import-not-found,import-untyped,unused-ignore]

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._read = lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            self.method = "pynvml utilization.gpu"
        except Exception:
            smi = shutil.which("nvidia-smi")
            if smi is not None:
                query = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
                query += ["-i", str(device_index)]
                self._read = lambda: float(
                    subprocess.run(query, capture_output=True, text=True, check=True).stdout
                )
                self.method = "nvidia-smi utilization.gpu"

    def start(self) -> None:
        if self._read is None:
            return
        self._thread = threading.Thread(target=self._loop, name="busy-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        assert self._read is not None
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # one failed read is one missing sample
                self._samples.append((time.perf_counter(), self._read()))
            self._stop.wait(SAMPLE_EVERY_S)

    def mean(self, start: float, end: float) -> float | None:
        values = [value for moment, value in list(self._samples) if start <= moment <= end]
        return round(sum(values) / len(values), 1) if values else None

    def stop(self) -> None:
        self._stop.set()


# -- workload ------------------------------------------------------------------------------


def premises(tokenizer: Any, target_pair_tokens: int, count: int, seed: int) -> list[str]:
    """``count`` distinct texts whose pairs with the hypotheses have ~target tokens."""
    from transformers.utils import logging as transformers_logging

    from tests.support.models import LABEL_WORDS, generated_sentences

    hypothesis = len(
        tokenizer(TEMPLATE.format(LABEL_WORDS[0]), add_special_tokens=False)["input_ids"]
    )
    length = max(4, target_pair_tokens - hypothesis - SPECIAL_TOKENS_PER_PAIR)
    text = " ".join(generated_sentences(count * length // 6 + 200, seed=seed))
    verbosity = transformers_logging.get_verbosity()
    # The whole text is over the model maximum: transformers would warn about it.
    transformers_logging.set_verbosity(logging.ERROR)
    try:
        stream: list[int] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    finally:
        transformers_logging.set_verbosity(verbosity)
    result: list[str] = []
    for start in range(0, len(stream) - length, length):
        result.append(tokenizer.decode(stream[start : start + length]).strip())
        if len(result) == count:
            break
    if len(result) < count:
        raise RuntimeError(f"generated only {len(result)} of {count} premises")
    return result


def mean_pair_tokens(tokenizer: Any, texts: Sequence[str], labels: Sequence[str]) -> float:
    sample = texts[: min(len(texts), 32)]
    lengths = [
        len(tokenizer(text, TEMPLATE.format(label))["input_ids"])
        for text in sample
        for label in labels
    ]
    return round(sum(lengths) / len(lengths), 1)


def labels() -> tuple[str, ...]:
    from tests.support.models import LABEL_WORDS

    return tuple(LABEL_WORDS[:LABEL_COUNT])


# -- model ---------------------------------------------------------------------------------


def model_directory(args: argparse.Namespace, scratch: Path) -> tuple[Path, str]:
    """A directory ``from_pretrained`` loads (written with ``save_pretrained`` unless
    ``--model``), and what it holds."""
    if args.model is not None:
        return Path(args.model), f"{args.model} (local weights)"
    if args.dry_run:
        from tests.support.models import build_tiny_bart

        return build_tiny_bart(scratch / "tiny-bart"), "tiny BART (2+2 layers, d_model 32)"
    from tests.support.models import bart_large_shaped

    return (
        bart_large_shaped(scratch / "bart-large-shaped"),
        "bart-large-shaped BART (12+12 layers, d_model 1024), random weights",
    )


def linear_weights(model: Any) -> int:
    """Weights of the model's nn.Linear layers: 2 FLOPs each per token (embeddings and
    norms are no matrix products)."""
    import torch

    return sum(
        module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear)
    )


# -- measurements --------------------------------------------------------------------------


@dataclass
class TokensFed:
    """What a forward pre-hook saw during one run of a row's workload."""

    forwards: int = 0
    rows: int = 0
    padded: int = 0  # rows x padded width, summed: what the model computed
    useful: int = 0  # the attention mask's ones: the pairs' own tokens
    largest_forward: int = 0


class ForwardCounter:
    """Counts the tokens fed to a model while attached. Reading the tokens synchronises, so
    it is attached to untimed runs only.

    Hooks the model and its ``base_model``: the scorer may run the base model and the head
    apart (BART), the pipeline calls the whole model. Only the outermost call is counted.
    """

    def __init__(self, *, read_tokens: bool = True) -> None:
        """``read_tokens`` False: shapes only (forwards and padded tokens), no synchronisation
        of its own, so that it can run while synchronisations are being counted."""
        self.fed = TokensFed()
        self._read_tokens = read_tokens
        self._depth = 0
        self._pad_id: int | None = None

    @contextlib.contextmanager
    def attached(self, model: Any) -> Iterator[ForwardCounter]:
        import torch

        self._pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        targets = [model]
        base = getattr(model, "base_model", None)
        if isinstance(base, torch.nn.Module) and base is not model:
            targets.append(base)
        handles = []
        for target in targets:
            handles.append(target.register_forward_pre_hook(self._enter, with_kwargs=True))
            handles.append(target.register_forward_hook(self._leave, always_call=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _leave(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        self._depth -= 1

    def _enter(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        rows, width = (int(size) for size in ids.shape)
        mask = kwargs.get("attention_mask")
        if not self._read_tokens:
            useful = 0
        elif mask is not None and mask.dim() == 2:
            useful = int(mask.sum())
        elif self._pad_id is not None:  # a 4D mask built by the caller: count non-pad ids
            useful = int((ids != self._pad_id).sum())
        else:
            useful = rows * width
        self.fed.forwards += 1
        self.fed.rows += rows
        self.fed.padded += rows * width
        self.fed.useful += useful
        self.fed.largest_forward = max(self.fed.largest_forward, rows * width)


@dataclass
class Measurement:
    method: str
    dtype: str
    pair_tokens: int
    setting: int | None  # the pipeline's batch size, the scorer's token budget
    pairs: int  # per repetition
    repeats: int = 0
    seconds: float | None = None  # all timed repetitions together
    pairs_per_s: float | None = None  # median over the repetitions
    pairs_per_s_min: float | None = None
    pairs_per_s_max: float | None = None
    pairs_per_s_q1: float | None = None
    pairs_per_s_q3: float | None = None
    gpu_busy_percent: float | None = None
    peak_memory_gib: float | None = None
    tokens: dict[str, float | int | None] = field(default_factory=dict)
    model_tflops_fed: float | None = None
    ceiling_fraction_fed: float | None = None
    ceiling_fraction_useful: float | None = None
    status: str = "ok"


@dataclass
class Workload:
    """What one repetition of a row runs, and the batcher's estimate of its tokens."""

    run: Callable[[], object]
    model: Any
    estimated_tokens: int | None = None
    micro_batches: int | None = None


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def token_report(fed: TokensFed, work: Workload, pairs: int) -> dict[str, float | int | None]:
    """The row's tokens: as fed (counted) and as the batcher estimated them."""
    report: dict[str, float | int | None] = {
        "forwards": fed.forwards,
        "padded_fed": fed.padded,
        "useful_fed": fed.useful,
        "largest_forward": fed.largest_forward,
        "padded_per_forward": round(fed.padded / fed.forwards, 1) if fed.forwards else None,
        "padded_per_pair": round(fed.padded / pairs, 2) if pairs else None,
        "useful_per_pair": round(fed.useful / pairs, 2) if pairs else None,
        "padding_share": round(1 - fed.useful / fed.padded, 4) if fed.padded else None,
        "estimated": work.estimated_tokens,
        "micro_batches": work.micro_batches,
    }
    if work.estimated_tokens and work.micro_batches:
        report.update(
            estimated_per_micro_batch=round(work.estimated_tokens / work.micro_batches, 1),
            padded_per_micro_batch=round(fed.padded / work.micro_batches, 1),
            padded_over_estimated=round(fed.padded / work.estimated_tokens, 3),
            useful_over_estimated=round(fed.useful / work.estimated_tokens, 3),
        )
    return report


class Bench:
    """Runs measurements inside the time budget, recording failures instead of dying."""

    def __init__(
        self,
        args: argparse.Namespace,
        device: torch.device,
        sampler: BusySampler,
        deadline: float,
    ) -> None:
        self.args = args
        self.device = device
        self.sampler = sampler
        self.deadline = deadline
        self.results: list[Measurement] = []
        self.ceiling_flops: float | None = None
        self.flops_per_token: int | None = None
        self.parameters = 0
        # Called after every measured or skipped row (main saves the results so far).
        self.on_row: Callable[[], None] = lambda: None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, row: Measurement, work: Workload) -> None:
        try:
            self._measure(row, work)
        finally:
            self.on_row()

    def _measure(self, row: Measurement, work: Workload) -> None:
        import torch

        self.results.append(row)
        if self.left() < MIN_LEFT_S:
            row.status = "skipped: time budget"
            return
        cuda = self.device.type == "cuda"
        try:
            counter = ForwardCounter()
            with counter.attached(work.model):
                work.run()  # untimed: warms kernels, caches and allocator; counts tokens
            self._sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            durations = self._repeat(work.run)
        except Exception as exc:
            row.status = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
            if cuda:
                torch.cuda.empty_cache()
            return
        self._record(row, durations, counter.fed, work)
        if cuda:
            row.peak_memory_gib = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        print(
            f"  {row.method:9} {row.dtype:9} ~{row.pair_tokens:<4} {row.setting or '':>6}"
            f" {row.pairs_per_s:10.1f} pairs/s (min {row.pairs_per_s_min}, max"
            f" {row.pairs_per_s_max}, {row.repeats} reps)  busy {row.gpu_busy_percent}%",
            flush=True,
        )

    def _repeat(self, run: Callable[[], object]) -> list[tuple[float, float]]:
        """(start, end) of each timed repetition: until ``min_seconds`` and ``MIN_REPEATS``."""
        spans: list[tuple[float, float]] = []
        total = 0.0
        while len(spans) < MAX_REPEATS:
            start = time.perf_counter()
            run()
            self._sync()
            end = time.perf_counter()
            spans.append((start, end))
            total += end - start
            if total >= self.args.min_seconds and len(spans) >= MIN_REPEATS:
                break
            if self.left() < 0:
                break
        return spans

    def _record(
        self, row: Measurement, spans: list[tuple[float, float]], fed: TokensFed, work: Workload
    ) -> None:
        rates = sorted(row.pairs / (end - start) for start, end in spans)
        total = sum(end - start for start, end in spans)
        q1, q3 = _quartiles(rates)
        row.repeats = len(spans)
        row.seconds = round(total, 3)
        row.pairs_per_s = round(statistics.median(rates), 1)
        row.pairs_per_s_min, row.pairs_per_s_max = round(rates[0], 1), round(rates[-1], 1)
        row.pairs_per_s_q1, row.pairs_per_s_q3 = round(q1, 1), round(q3, 1)
        row.gpu_busy_percent = self.sampler.mean(spans[0][0], spans[-1][1])
        row.tokens = token_report(fed, work, row.pairs)
        if total < self.args.min_seconds or len(spans) < MIN_REPEATS:
            row.status = f"ok, cut short by the time budget ({len(spans)} reps)"
        if fed.forwards == 0:  # the model is called some other way than the hooks expect
            row.status += "; no forward pass seen: tokens not counted"
        if self.flops_per_token and row.pairs:
            fed_flops = row.pairs_per_s * self.flops_per_token * fed.padded / row.pairs
            useful_flops = row.pairs_per_s * self.flops_per_token * fed.useful / row.pairs
            row.model_tflops_fed = _significant(fed_flops / 1e12)
            if self.ceiling_flops:
                row.ceiling_fraction_fed = round(fed_flops / self.ceiling_flops, 4)
                row.ceiling_fraction_useful = round(useful_flops / self.ceiling_flops, 4)


def matmul_ceiling(device: torch.device, n: int) -> dict[str, Any]:
    """bf16 ``n x n x n`` matrix products (random normal data): FLOP/s = 2 n^3 / t."""
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn((n, n), device=device, dtype=torch.bfloat16, generator=generator)
    c = torch.empty((n, n), device=device, dtype=torch.bfloat16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(CEILING_WARMUPS):
        torch.matmul(a, b, out=c)
    sync()
    per_product: list[float] = []
    spent = 0.0
    while spent < CEILING_MIN_S and len(per_product) < MAX_REPEATS:
        start = time.perf_counter()
        for _ in range(CEILING_GROUP):
            torch.matmul(a, b, out=c)
        sync()
        elapsed = time.perf_counter() - start
        spent += elapsed
        per_product.append(elapsed / CEILING_GROUP)
    flops = 2 * n**3
    rates = sorted(flops / t for t in per_product)
    del a, b, c
    return {
        "what": f"bf16 {n}x{n}x{n} torch.matmul, random normal data, FLOP/s = 2*{n}^3/t",
        "n": n,
        "groups": len(per_product),
        "products_per_group": CEILING_GROUP,
        "tflops_median": _significant(statistics.median(rates) / 1e12),
        "tflops_min": _significant(rates[0] / 1e12),
        "tflops_max": _significant(rates[-1] / 1e12),
        "flops": statistics.median(rates),
    }


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def count_syncs(scorer: NliScorer, batch: Sequence[ScoreRequest], device: torch.device) -> Any:
    """Host synchronisations during one ``scorer.score(batch)``: torch's sync debug mode
    warns at each; the warnings are caught and counted (with their call sites)."""
    import torch

    if device.type != "cuda":
        return "n/a"
    counter = ForwardCounter(read_tokens=False)
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught, counter.attached(scorer_model(scorer)):
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            scorer.score(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    syncs = [w for w in caught if SYNC_WARNING_MARK in str(w.message)]
    sites = Counter(f"{_short_path(w.filename)}:{w.lineno}" for w in syncs)
    return {
        "count": len(syncs),
        "events": len(batch),
        "pairs": len(batch) * LABEL_COUNT,
        "forwards": counter.fed.forwards,
        "sites": dict(sites.most_common(SYNC_SITES_KEPT)),
    }


def scorer_model(scorer: NliScorer) -> Any:
    """The model a scorer runs (to hook its forward passes; nothing else touches it)."""
    return scorer._model


def _short_path(filename: str) -> str:
    path = Path(filename)
    with contextlib.suppress(ValueError):
        return str(path.relative_to(REPO))
    return "/".join(path.parts[-3:])


def micro_batches(
    scorer: NliScorer, requests: Sequence[ScoreRequest]
) -> tuple[list[list[ScoreRequest]], int]:
    """Micro-batches closed when their estimated tokens would pass the scorer's budget (as
    the worker's batcher closes them), and the estimated tokens in all."""
    batches: list[list[ScoreRequest]] = [[]]
    tokens = 0
    total = 0
    for request in requests:
        estimate = scorer.estimate_tokens(request)
        if batches[-1] and tokens + estimate > scorer.max_batch_tokens:
            batches.append([])
            tokens = 0
        batches[-1].append(request)
        tokens += estimate
        total += estimate
    return batches, total


def scorer_workload(scorer: NliScorer, model: Any, requests: Sequence[ScoreRequest]) -> Workload:
    batches, estimated = micro_batches(scorer, requests)

    def run() -> None:
        for batch in batches:
            scorer.score(batch)

    return Workload(run, model, estimated_tokens=estimated, micro_batches=len(batches))


def requests_for(texts: Sequence[str]) -> list[ScoreRequest]:
    from worker.contract.scorer import ScoreRequest

    return [ScoreRequest(text, labels(), True, TEMPLATE) for text in texts]


def run_dtype(
    bench: Bench, directory: Path, dtype_name: str, texts: dict[int, list[str]]
) -> dict[str, Any]:
    """Every row of one dtype (the sweep too, for ``SWEEP_DTYPE``); its host-sync count."""
    import torch
    from transformers import pipeline

    from worker.config.settings import DEFAULT_MAX_BATCH_TOKENS, ModelSettings
    from worker.scoring.nli import NliScorer
    from worker.scoring.runtime import load_sequence_classifier

    args = bench.args
    settings = ModelSettings(
        model=str(directory),
        device=str(bench.device),
        dtype=dtype_name,
        max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS,
    )
    scorer = NliScorer.from_settings(settings)
    model, tokenizer, revision = load_sequence_classifier(
        settings, bench.device, getattr(torch, dtype_name)
    )
    if bench.flops_per_token is None:
        bench.parameters = sum(p.numel() for p in model.parameters())
        bench.flops_per_token = 2 * linear_weights(model)
        print(f"  {bench.parameters:,} parameters, {bench.flops_per_token // 2:,} in nn.Linear")
    classifier = pipeline(
        "zero-shot-classification",
        model=model,
        tokenizer=cast(Any, tokenizer),  # a PreTrainedTokenizerBase; typed as its backends
        device=bench.device,
    )
    sizes = DRY_PIPELINE_BATCH_SIZES if args.dry_run else tuple(args.pipeline_batch_sizes)
    syncs: Any = "not measured: the tagstream row did not run"
    for length in PAIR_LENGTHS:
        events = texts[length]
        piped = events[: args.pipeline_events]
        for size in sizes:
            call = functools.partial(
                classifier,
                piped,
                candidate_labels=list(labels()),
                multi_label=True,
                batch_size=size,
            )
            bench.measure(
                Measurement("pipeline", dtype_name, length, size, len(piped) * LABEL_COUNT),
                Workload(call, model),
            )
        requests = requests_for(events)
        work = scorer_workload(scorer, scorer_model(scorer), requests)
        row = Measurement(
            "tagstream", dtype_name, length, scorer.max_batch_tokens, len(requests) * LABEL_COUNT
        )
        bench.measure(row, work)
        if length == PAIR_LENGTHS[-1] and row.pairs_per_s is not None:
            first, _ = micro_batches(scorer, requests)
            syncs = count_syncs(scorer, first[0], bench.device)
    if dtype_name == SWEEP_DTYPE:
        requests = requests_for(texts[PAIR_LENGTHS[-1]])
        for budget in args.budgets:
            swept = NliScorer(
                model, tokenizer, name=str(directory), revision=revision, max_batch_tokens=budget
            )
            bench.measure(
                Measurement(
                    "sweep", dtype_name, PAIR_LENGTHS[-1], budget, len(requests) * LABEL_COUNT
                ),
                scorer_workload(swept, model, requests),
            )
    del scorer, model, classifier
    gc.collect()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"host_syncs_per_scorer_call": syncs, "revision": revision}


# -- report --------------------------------------------------------------------------------


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(device: torch.device) -> dict[str, Any]:
    import pydantic
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "libraries": library_versions(),
        "pydantic_from": str(Path(pydantic.__file__).parent.parent),
        "cuda_runtime": torch.version.cuda,
        "device": str(device),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            multiprocessors=properties.multi_processor_count,
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            query = [smi, "--query-gpu=driver_version", "--format=csv,noheader"]
            result = subprocess.run(query, capture_output=True, text=True, check=False)
            info["driver"] = result.stdout.strip()
    return info


def _number(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _range(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"{_number(low)}-{_number(high)}"


def _percent(value: float | int | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


COLUMNS: Final[tuple[tuple[str, Callable[[Measurement], str]], ...]] = (
    ("method", lambda r: r.method),
    ("dtype", lambda r: r.dtype),
    ("~tok", lambda r: str(r.pair_tokens)),
    ("bs/budget", lambda r: _number(r.setting)),
    ("pairs", lambda r: _number(r.pairs)),
    ("reps", lambda r: str(r.repeats)),
    ("s", lambda r: _number(r.seconds)),
    ("pairs/s median", lambda r: _number(r.pairs_per_s)),
    ("min-max", lambda r: _range(r.pairs_per_s_min, r.pairs_per_s_max)),
    ("busy %", lambda r: _number(r.gpu_busy_percent)),
    ("peak GiB", lambda r: _number(r.peak_memory_gib, 2)),
    ("est tok/mb", lambda r: _number(r.tokens.get("estimated_per_micro_batch"))),
    ("fed tok/mb", lambda r: _number(r.tokens.get("padded_per_micro_batch"))),
    ("fed/est", lambda r: _number(r.tokens.get("padded_over_estimated"), 2)),
    ("fed tok/fwd", lambda r: _number(r.tokens.get("padded_per_forward"))),
    ("pad %", lambda r: _percent(r.tokens.get("padding_share"))),
    ("% ceil fed", lambda r: _percent(r.ceiling_fraction_fed)),
    ("% ceil useful", lambda r: _percent(r.ceiling_fraction_useful)),
    ("status", lambda r: r.status),
)
LEFT_ALIGNED: Final = frozenset({"method", "dtype", "status"})


def table_cells(results: Sequence[Measurement]) -> tuple[list[str], list[list[str]]]:
    headers = [name for name, _ in COLUMNS]
    return headers, [[cell(r) for _, cell in COLUMNS] for r in results]


def text_table(results: Sequence[Measurement]) -> str:
    headers, rows = table_cells(results)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if h in LEFT_ALIGNED else c.rjust(w)
            for c, w, h in zip(cells, widths, headers, strict=True)
        ).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def markdown_table(results: Sequence[Measurement]) -> str:
    headers, rows = table_cells(results)
    align = ["---" if h in LEFT_ALIGNED else "---:" for h in headers]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [headers, align, *rows])


def summary(results: Sequence[Measurement]) -> list[dict[str, Any]]:
    """Per dtype and length: the best pipeline batch size against tagstream at the default
    budget (medians)."""
    rows = []
    for dtype in DTYPES:
        for length in PAIR_LENGTHS:
            group = [r for r in results if (r.dtype, r.pair_tokens) == (dtype, length)]
            piped = [r for r in group if r.method == "pipeline" and r.pairs_per_s]
            ours = [r for r in group if r.method == "tagstream" and r.pairs_per_s]
            if not piped or not ours:
                continue
            best = max(piped, key=lambda r: r.pairs_per_s or 0.0)
            mine = ours[0]
            assert best.pairs_per_s is not None and mine.pairs_per_s is not None
            rows.append(
                {
                    "dtype": dtype,
                    "pair_tokens": length,
                    "pipeline_best_pairs_per_s": best.pairs_per_s,
                    "pipeline_best_batch_size": best.setting,
                    "pipeline_gpu_busy_percent": best.gpu_busy_percent,
                    "tagstream_pairs_per_s": mine.pairs_per_s,
                    "tagstream_gpu_busy_percent": mine.gpu_busy_percent,
                    "speedup": round(mine.pairs_per_s / best.pairs_per_s, 2),
                }
            )
    return rows


def summary_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [
        f"{row['dtype']} ~{row['pair_tokens']} tokens: tagstream"
        f" {row['tagstream_pairs_per_s']:,.0f} pairs/s against the pipeline's"
        f" {row['pipeline_best_pairs_per_s']:,.0f} (batch size"
        f" {row['pipeline_best_batch_size']}): x{row['speedup']}"
        for row in rows
    ]


def _syncs_text(syncs: Any) -> str:
    if not isinstance(syncs, dict):
        return str(syncs)
    sites = ", ".join(f"{site} x{count}" for site, count in syncs["sites"].items())
    return (
        f"{syncs['count']} in one call of {syncs['events']} events ({syncs['pairs']} pairs,"
        f" {syncs['forwards']} forward passes){'; at ' + sites if sites else ''}"
    )


def markdown_report(report: dict[str, Any], results: Sequence[Measurement]) -> str:
    env = report["environment"]
    ceiling = report["ceiling"]
    where = env.get("gpu") or f"{env['device']} (dry run)"
    lines = [
        f"# bench/gpu.py on {where}",
        "",
        *([] if report["complete"] else ["- **partial**: written before the run ended"]),
        *(f"- {dtype}: skipped, time budget" for dtype in report["skipped_dtypes"]),
        *(
            ["- **dry run**: tiny model on the CPU; the numbers only show that the code runs"]
            if report["dry_run"]
            else []
        ),
        f"- finished {report['finished_at']}, {report['wall_s']} s:"
        f" `{' '.join(report['command'])}`",
        f"- Python {env['python']}, "
        + ", ".join(f"{name} {version}" for name, version in env["libraries"].items() if version),
        f"- model: {report['model']}; {report['parameters']:,} parameters, "
        f"{report['linear_weights']:,} in nn.Linear layers",
        f"- ceiling: {ceiling['what']}: median {ceiling['tflops_median']} TFLOP/s"
        f" (min {ceiling['tflops_min']}, max {ceiling['tflops_max']}, {ceiling['groups']}"
        f" groups of {ceiling['products_per_group']})",
        f"- model FLOPs: {report['flops_note']}",
        f"- tokens per pair (tokenizer, unpadded): {report['settings']['mean_tokens_per_pair']}",
    ]
    lines += [
        f"- host syncs per scorer call, {dtype}: {_syncs_text(syncs)}"
        for dtype, syncs in report["host_syncs"].items()
    ]
    lines += [
        "",
        "pairs/s: median of the timed repetitions (min-max beside it). est tok/mb: the"
        " batcher's characters-per-token estimate per micro-batch; fed tok/mb, fed tok/fwd:"
        " padded tokens (rows x width) the model was fed, per micro-batch and per forward"
        " pass; pad %: padding's share of the tokens fed; % ceil: model FLOP/s over the"
        " measured matmul ceiling, counting the tokens fed, or the useful (unpadded) ones.",
        "",
        markdown_table(results),
        "",
        *(f"- {line}" for line in summary_lines(report["summary"])),
        "",
    ]
    return "\n".join(lines)


# -- command -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def ints(value: str) -> list[int]:
        return [int(x) for x in value.split(",") if x]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json, gpu.md")
    parser.add_argument("--model", type=Path, default=None, help="local model directory")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--time-budget-s", type=float, default=DEFAULT_TIME_BUDGET_S)
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=None,
        help=f"timed seconds per row at least ({DEFAULT_MIN_SECONDS}; dry run {DRY_MIN_SECONDS})",
    )
    parser.add_argument("--events", type=int, default=None, help="events per repetition")
    parser.add_argument("--pipeline-events", type=int, default=None)
    parser.add_argument("--pipeline-batch-sizes", type=ints, default=list(GPU_PIPELINE_BATCH_SIZES))
    parser.add_argument("--budgets", type=ints, default=None, help="token budgets of the sweep")
    parser.add_argument("--ceiling-n", type=int, default=None, help="matmul size of the ceiling")
    args = parser.parse_args(argv)
    dry = bool(args.dry_run)
    if args.min_seconds is None:
        args.min_seconds = DRY_MIN_SECONDS if dry else DEFAULT_MIN_SECONDS
    if args.events is None:
        args.events = DRY_EVENTS if dry else GPU_EVENTS
    if args.pipeline_events is None:
        args.pipeline_events = DRY_EVENTS if dry else GPU_PIPELINE_EVENTS
    if args.budgets is None:
        args.budgets = list(DRY_BUDGETS if dry else GPU_BUDGETS)
    if args.ceiling_n is None:
        args.ceiling_n = DRY_CEILING_N if dry else CEILING_N
    return args


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    missing = missing_modules()
    if missing:
        print(
            f"bench/gpu.py: missing Python packages: {', '.join(missing)}.\n"
            "Install them (pip install -e . in this checkout installs all), or carry the"
            " wheels of `make gpu-bundle` and run bench/gpu-run.sh; see README.md, 'GPU'.",
            file=sys.stderr,
        )
        return EXIT_MISSING
    import torch

    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "bench/gpu.py: no CUDA device visible to torch "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "use --dry-run to check the script on a CPU.",
            file=sys.stderr,
        )
        return EXIT_MISSING
    else:
        device = torch.device("cuda", 0)
    args.out.mkdir(parents=True, exist_ok=True)
    sampler = BusySampler(0 if device.type == "cuda" else None)
    sampler.start()
    bench = Bench(args, device, sampler, deadline=started + float(args.time_budget_s))
    report = new_report(args, device, sampler)

    def save(final: bool) -> None:
        """gpu.json and gpu.md as they stand: after every row too, so that a run stopped at
        the device call's limit still brings back what it measured."""
        report.update(
            complete=final,
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            summary=summary(bench.results),
            measurements=[asdict(r) for r in bench.results],
            parameters=bench.parameters,
            linear_weights=(bench.flops_per_token or 0) // 2,
            wall_s=round(time.monotonic() - started, 1),
        )
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (args.out / "gpu.md").write_text(markdown_report(report, bench.results), encoding="utf-8")

    bench.on_row = functools.partial(save, False)
    print(f"ceiling: bf16 {args.ceiling_n}^3 matmul on {device} ...", flush=True)
    ceiling = matmul_ceiling(device, args.ceiling_n)
    bench.ceiling_flops = ceiling.pop("flops")
    report["ceiling"] = ceiling
    print(f"  median {ceiling['tflops_median']} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="tagstream-gpu-") as scratch:
        print("writing the model directory ...", flush=True)
        built = time.monotonic()
        directory, report["model"] = model_directory(args, Path(scratch))
        report["model_build_s"] = round(time.monotonic() - built, 1)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
        print(f"  {report['model']}: written in {report['model_build_s']} s", flush=True)
        texts = {
            length: premises(tokenizer, length, args.events, seed=length) for length in PAIR_LENGTHS
        }
        report["settings"]["mean_tokens_per_pair"] = measured = {
            length: mean_pair_tokens(tokenizer, texts[length], labels()) for length in PAIR_LENGTHS
        }
        print(f"  mean tokens per pair: {measured}", flush=True)
        for dtype_name in DTYPES:
            if bench.left() < MIN_LEFT_S:  # not even the model's loads would fit
                print(f"{dtype_name}: skipped, time budget", flush=True)
                report["host_syncs"][dtype_name] = "not measured: time budget"
                report["skipped_dtypes"].append(dtype_name)
                continue
            print(f"{dtype_name}:", flush=True)
            done = run_dtype(bench, directory, dtype_name, texts)
            report["host_syncs"][dtype_name] = done["host_syncs_per_scorer_call"]
            report["model_revision"] = done["revision"]
    sampler.stop()
    save(True)
    print("\n" + text_table(bench.results))
    for line in summary_lines(report["summary"]):
        print(line)
    for dtype_name, syncs in report["host_syncs"].items():
        print(f"host syncs per scorer call, {dtype_name}: {_syncs_text(syncs)}")
    print(f"\nwrote {args.out / 'gpu.json'} and gpu.md ({report['wall_s']} s)")
    if not any(r.pairs_per_s for r in bench.results):
        return EXIT_NOTHING_RAN
    return EXIT_ROW_FAILED if any(r.status.startswith("error") for r in bench.results) else 0


def new_report(
    args: argparse.Namespace, device: torch.device, sampler: BusySampler
) -> dict[str, Any]:
    """The report's fields known before the first measurement; main fills in the rest."""
    return {
        "complete": False,
        "finished_at": None,
        "command": [Path(sys.executable).name, "-m", "bench.gpu", *sys.argv[1:]],
        "environment": environment(device),
        "model": None,
        "model_revision": None,
        "parameters": 0,
        "linear_weights": 0,
        "flops_note": (
            "2 x nn.Linear weights per token (encoder and decoder both run over every token;"
            " attention's length-squared products and embeddings left out); '% ceil fed'"
            " counts every padded token fed, '% ceil useful' only the attention mask's ones;"
            " float16 rows are set against the bf16 ceiling (the same tensor-core rate)"
        ),
        "model_build_s": None,
        "dry_run": args.dry_run,
        "ceiling": None,
        "host_syncs": {},
        "skipped_dtypes": [],
        "settings": {
            "labels": LABEL_COUNT,
            "template": TEMPLATE,
            "multi_label": True,
            "events": args.events,
            "pipeline_events": args.pipeline_events,
            "pipeline_batch_sizes": args.pipeline_batch_sizes,
            "budgets": args.budgets,
            "min_seconds": args.min_seconds,
            "min_repeats": MIN_REPEATS,
            "mean_tokens_per_pair": None,
            "gpu_busy_method": sampler.method,
            "time_budget_s": args.time_budget_s,
        },
        "summary": [],
        "measurements": [],
        "wall_s": None,
    }


if __name__ == "__main__":
    raise SystemExit(main())
