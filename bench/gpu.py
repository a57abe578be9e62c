"""NLI throughput on an NVIDIA GPU: the transformers pipeline against tagstream's NliScorer.

One command, no network, at most ``--time-budget-s`` (default 450 s, under the 8 minutes
the issue allows; whatever does not fit is reported as skipped):

1. Model: ``--model DIR`` loads real weights from a local directory (e.g. a copy of
   facebook/bart-large-mnli); otherwise a bart-large-shaped BART (12+12 layers, d_model 1024,
   FFN 4096, 16 heads, ~400M parameters; random weights) is built in GPU memory, with the
   tests' offline BPE tokenizer (1,200 tokens; the vocabulary size does not change the
   per-token compute of a classification model).
2. Workload: distinct English-like premises cut to give ~64- and ~128-token pairs with the
   8 labels' hypotheses ("This example is {}."), multi-label. No repeated texts, so the
   scorer's de-duplication gains nothing: this compares compute paths only.
3. For bfloat16 and float16, at each pair length: pairs/s of the pipeline (the documented
   call with ``batch_size`` 1 would be far slower; batch sizes ``--pipeline-batch-sizes``, best
   reported) and of NliScorer at the default token budget, fed micro-batches the way the
   worker's batcher closes them. Then a token-budget sweep of NliScorer (bfloat16, ~128
   tokens).
4. GPU busy: the mean of NVML's utilization.gpu (percent of time a kernel was running)
   sampled every 50 ms during each measurement (pynvml, else ``nvidia-smi``).

Prints a table and writes ``gpu.json`` to ``--out``. ``--dry-run`` runs the same code on the
CPU with a tiny model and a few events (seconds), to check the script before a GPU run.

Needs torch and transformers, and the worker's own dependencies (pydantic, pydantic-settings,
structlog, orjson): the script checks them first and says what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

REPO = Path(__file__).resolve().parents[1]

EXIT_MISSING: Final = 2
EXIT_NOTHING_RAN: Final = 3
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
LABEL_COUNT: Final = 8
TEMPLATE: Final = "This example is {}."
PAIR_LENGTHS: Final = (64, 128)
DTYPES: Final = ("bfloat16", "float16")
DEFAULT_TIME_BUDGET_S: Final = 450.0
# Pairs per measurement: 512 events x 8 labels keeps every GPU measurement to a few seconds
# while running dozens of full-budget forward passes.
GPU_EVENTS: Final = 512
# The pipeline is slower; fewer events keep its measurements as short.
GPU_PIPELINE_EVENTS: Final = 256
DRY_EVENTS: Final = 6
GPU_PIPELINE_BATCH_SIZES: Final = (16, 64, 256)
DRY_PIPELINE_BATCH_SIZES: Final = (4,)
GPU_BUDGETS: Final = (4096, 8192, 16384, 32768, 65536)
DRY_BUDGETS: Final = (512, 2048)
# Untimed run before each measurement: CUDA kernels, caches and allocator warmed.
WARMUP_EVENTS: Final = 16
SAMPLE_EVERY_S: Final = 0.05
# A measurement is skipped when less than this is left of the time budget.
MIN_LEFT_S: Final = 10.0
SPECIAL_TOKENS_PER_PAIR: Final = 4


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
    """Samples NVML's utilization.gpu in a thread; ``window()`` gives the mean since start."""

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
            import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py, GPU hosts only

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
                self._samples.append((time.monotonic(), self._read()))
            self._stop.wait(SAMPLE_EVERY_S)

    def mean(self, start: float, end: float) -> float | None:
        values = [value for moment, value in list(self._samples) if start <= moment <= end]
        return round(sum(values) / len(values), 1) if values else None

    def stop(self) -> None:
        self._stop.set()


# -- workload ------------------------------------------------------------------------------


def premises(tokenizer: Any, target_pair_tokens: int, count: int, seed: int) -> list[str]:
    """``count`` distinct texts whose pairs with the hypotheses have ~target tokens."""
    from tests.support.models import LABEL_WORDS, generated_sentences

    hypothesis = len(
        tokenizer(TEMPLATE.format(LABEL_WORDS[0]), add_special_tokens=False)["input_ids"]
    )
    length = max(4, target_pair_tokens - hypothesis - SPECIAL_TOKENS_PER_PAIR)
    text = " ".join(generated_sentences(count * length // 6 + 200, seed=seed))
    stream: list[int] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
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


# -- models --------------------------------------------------------------------------------


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    description: str
    parameters: int


def build_model(args: argparse.Namespace, device: Any, scratch: Path) -> Loaded:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BartForSequenceClassification,
    )

    if args.model is not None:
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model, local_files_only=True, dtype=torch.float32
        ).to(device)
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        description = f"{args.model} (local weights)"
    elif args.dry_run:
        from tests.support.models import build_tiny_bart

        directory = build_tiny_bart(scratch / "tiny-bart")
        model = AutoModelForSequenceClassification.from_pretrained(directory).to(device)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        description = "tiny BART (2+2 layers, d_model 32; dry run)"
    else:
        from tests.support.models import (
            BART_LARGE_MAX_LENGTH,
            TINY_VOCAB_SIZE,
            _bart_tokenizer,
            bart_large_config,
        )

        tokenizer = _bart_tokenizer(scratch / "tokenizer", TINY_VOCAB_SIZE, BART_LARGE_MAX_LENGTH)
        torch.manual_seed(0)
        with torch.device(device):
            model = BartForSequenceClassification(bart_large_config(len(tokenizer)))
        description = "bart-large-shaped BART, random weights"
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    return Loaded(model, tokenizer, description, parameters)


# -- measurements --------------------------------------------------------------------------


@dataclass
class Measurement:
    method: str
    dtype: str
    pair_tokens: int
    setting: int | None
    pairs: int
    seconds: float | None = None
    pairs_per_s: float | None = None
    gpu_busy_percent: float | None = None
    peak_memory_gib: float | None = None
    status: str = "ok"
    detail: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Runs measurements inside the time budget, recording failures instead of dying."""

    def __init__(self, args: argparse.Namespace, device: Any, sampler: BusySampler) -> None:
        self.args = args
        self.device = device
        self.sampler = sampler
        self.deadline = time.monotonic() + float(args.time_budget_s)
        self.results: list[Measurement] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def measure(self, row: Measurement, warm: Callable[[], Any], run: Callable[[], Any]) -> None:
        import torch

        self.results.append(row)
        if self.left() < MIN_LEFT_S:
            row.status = "skipped: time budget"
            return
        cuda = self.device.type == "cuda"
        try:
            warm()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.monotonic()
            run()
            if cuda:
                torch.cuda.synchronize()
            end = time.monotonic()
        except Exception as exc:
            row.status = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
            if cuda:
                torch.cuda.empty_cache()
            return
        row.seconds = round(end - start, 3)
        row.pairs_per_s = round(row.pairs / (end - start), 1)
        row.gpu_busy_percent = self.sampler.mean(start, end)
        if cuda:
            row.peak_memory_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(
            f"  {row.method:10} {row.dtype:9} ~{row.pair_tokens:<4} {row.setting or '':>6}"
            f" {row.pairs_per_s:10.1f} pairs/s  busy {row.gpu_busy_percent}%",
            flush=True,
        )


def micro_batches(scorer: Any, requests: Sequence[Any]) -> list[list[Any]]:
    """Close a micro-batch when its estimated tokens would pass the scorer's budget (as the
    worker's batcher does)."""
    batches: list[list[Any]] = [[]]
    tokens = 0
    for request in requests:
        estimate = scorer.estimate_tokens(request)
        if batches[-1] and tokens + estimate > scorer.max_batch_tokens:
            batches.append([])
            tokens = 0
        batches[-1].append(request)
        tokens += estimate
    return batches


def run_dtype(bench: Bench, loaded: Loaded, dtype_name: str, texts: dict[int, list[str]]) -> None:
    import torch
    from transformers import pipeline

    from tests.support.models import LABEL_WORDS
    from worker.config.settings import DEFAULT_MAX_BATCH_TOKENS
    from worker.contract.scorer import ScoreRequest
    from worker.scoring.nli import NliScorer

    labels = list(LABEL_WORDS[:LABEL_COUNT])
    model = loaded.model.to(getattr(torch, dtype_name))
    classifier = pipeline(
        "zero-shot-classification", model=model, tokenizer=loaded.tokenizer, device=bench.device
    )
    args = bench.args
    sizes = DRY_PIPELINE_BATCH_SIZES if args.dry_run else tuple(args.pipeline_batch_sizes)
    for length in PAIR_LENGTHS:
        events = texts[length]
        piped = events[: args.pipeline_events]
        warm_texts = events[:WARMUP_EVENTS]
        for size in sizes:

            def call(chosen: list[str], batch_size: int = size) -> Any:
                return classifier(
                    chosen, candidate_labels=labels, multi_label=True, batch_size=batch_size
                )

            bench.measure(
                Measurement("pipeline", dtype_name, length, size, len(piped) * LABEL_COUNT),
                functools.partial(call, warm_texts),
                functools.partial(call, piped),
            )
        scorer = NliScorer(model, loaded.tokenizer, max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS)
        requests = [ScoreRequest(text, tuple(labels), True, TEMPLATE) for text in events]

        def score(chosen: Sequence[Any], scorer: Any = scorer) -> None:
            for batch in micro_batches(scorer, chosen):
                scorer.score(batch)

        bench.measure(
            Measurement(
                "tagstream",
                dtype_name,
                length,
                DEFAULT_MAX_BATCH_TOKENS,
                len(requests) * LABEL_COUNT,
            ),
            functools.partial(score, requests[:WARMUP_EVENTS]),
            functools.partial(score, requests),
        )


def run_sweep(bench: Bench, loaded: Loaded, texts: list[str], budgets: Sequence[int]) -> None:
    import torch

    from tests.support.models import LABEL_WORDS
    from worker.contract.scorer import ScoreRequest
    from worker.scoring.nli import NliScorer

    labels = tuple(LABEL_WORDS[:LABEL_COUNT])
    dtype_name = "bfloat16"
    model = loaded.model.to(torch.bfloat16)
    requests = [ScoreRequest(text, labels, True, TEMPLATE) for text in texts]
    for budget in budgets:
        scorer = NliScorer(model, loaded.tokenizer, max_batch_tokens=budget)

        def score(chosen: Sequence[Any], scorer: Any = scorer) -> None:
            for batch in micro_batches(scorer, chosen):
                scorer.score(batch)

        bench.measure(
            Measurement("sweep", dtype_name, PAIR_LENGTHS[-1], budget, len(requests) * LABEL_COUNT),
            functools.partial(score, requests[:WARMUP_EVENTS]),
            functools.partial(score, requests),
        )


# -- report --------------------------------------------------------------------------------


def environment(device: Any) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
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


def print_table(results: list[Measurement]) -> None:
    header = (
        f"{'method':10} {'dtype':9} {'~tok':>5} {'setting':>8} {'pairs':>6} {'pairs/s':>10}"
        f" {'GPU busy %':>10} {'peak GiB':>8}  status"
    )
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        rate = f"{r.pairs_per_s:10.1f}" if r.pairs_per_s is not None else f"{'-':>10}"
        busy = f"{r.gpu_busy_percent:10.1f}" if r.gpu_busy_percent is not None else f"{'-':>10}"
        peak = f"{r.peak_memory_gib:8.2f}" if r.peak_memory_gib is not None else f"{'-':>8}"
        print(
            f"{r.method:10} {r.dtype:9} {r.pair_tokens:5d} {r.setting or '':>8} {r.pairs:6d}"
            f" {rate} {busy} {peak}  {r.status}"
        )


def summary(results: list[Measurement]) -> list[dict[str, Any]]:
    """Per dtype and length: best pipeline vs tagstream at the default budget."""
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json")
    parser.add_argument("--model", type=Path, default=None, help="local model directory")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--time-budget-s", type=float, default=DEFAULT_TIME_BUDGET_S)
    parser.add_argument("--events", type=int, default=None, help="events per measurement")
    parser.add_argument("--pipeline-events", type=int, default=None)
    parser.add_argument(
        "--pipeline-batch-sizes",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=list(GPU_PIPELINE_BATCH_SIZES),
    )
    parser.add_argument(
        "--budgets",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=None,
        help="token budgets of the sweep",
    )
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = DRY_EVENTS if args.dry_run else GPU_EVENTS
    if args.pipeline_events is None:
        args.pipeline_events = DRY_EVENTS if args.dry_run else GPU_PIPELINE_EVENTS
    if args.budgets is None:
        args.budgets = list(DRY_BUDGETS if args.dry_run else GPU_BUDGETS)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    missing = missing_modules()
    if missing:
        print(
            f"bench/gpu.py: missing Python packages: {', '.join(missing)}.\n"
            "Install them (pip install -e . in this checkout installs all), or carry wheels;"
            " see docs/performance.md.",
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
        torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    sampler = BusySampler(0 if device.type == "cuda" else None)
    sampler.start()
    bench = Bench(args, device, sampler)
    with tempfile.TemporaryDirectory(prefix="tagstream-gpu-") as scratch:
        print(f"building the model on {device} ...", flush=True)
        built = time.monotonic()
        loaded = build_model(args, device, Path(scratch))
        build_s = round(time.monotonic() - built, 1)
        print(f"  {loaded.description}: {loaded.parameters:,} parameters in {build_s} s")
        texts = {
            length: premises(loaded.tokenizer, length, args.events, seed=length)
            for length in PAIR_LENGTHS
        }
        from tests.support.models import LABEL_WORDS

        measured_tokens = {
            length: mean_pair_tokens(loaded.tokenizer, texts[length], LABEL_WORDS[:LABEL_COUNT])
            for length in PAIR_LENGTHS
        }
        print(f"  mean tokens per pair: {measured_tokens}", flush=True)
        for dtype_name in DTYPES:
            run_dtype(bench, loaded, dtype_name, texts)
        run_sweep(bench, loaded, texts[PAIR_LENGTHS[-1]], args.budgets)
    sampler.stop()
    print_table(bench.results)
    rows = summary(bench.results)
    for row in rows:
        print(
            f"{row['dtype']:9} ~{row['pair_tokens']} tokens: tagstream "
            f"{row['tagstream_pairs_per_s']:,.0f} pairs/s vs pipeline "
            f"{row['pipeline_best_pairs_per_s']:,.0f} (bs {row['pipeline_best_batch_size']})"
            f" = x{row['speedup']}"
        )
    report = {
        "environment": environment(device),
        "model": loaded.description,
        "parameters": loaded.parameters,
        "model_build_s": build_s,
        "dry_run": args.dry_run,
        "settings": {
            "labels": LABEL_COUNT,
            "template": TEMPLATE,
            "multi_label": True,
            "events": args.events,
            "pipeline_events": args.pipeline_events,
            "pipeline_batch_sizes": args.pipeline_batch_sizes,
            "budgets": args.budgets,
            "mean_tokens_per_pair": measured_tokens,
            "gpu_busy_method": sampler.method,
            "time_budget_s": args.time_budget_s,
            "command": sys.argv,
        },
        "summary": rows,
        "measurements": [asdict(r) for r in bench.results],
        "wall_s": round(time.monotonic() - started, 1),
    }
    path = args.out / "gpu.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path} ({report['wall_s']} s)")
    return 0 if any(r.pairs_per_s for r in bench.results) else EXIT_NOTHING_RAN


if __name__ == "__main__":
    raise SystemExit(main())
