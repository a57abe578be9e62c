"""Throughput of tagstream's NliScorer against transformers' zero-shot pipeline.

Both sides score the same generated events with the same model object at the same dtype:

* ``pipeline-docs``: the pipeline as its documentation shows it, one call per event,
  default ``batch_size`` (1);
* ``pipeline-bsN``: the pipeline handed the whole list of texts with ``batch_size=N``; the
  best N is the "tuned pipeline";
* ``tagstream``: :class:`NliScorer` fed micro-batches closed on its token estimate, as the
  worker's batcher feeds it.

Every event has the same 8 labels (multi-label, which costs the same forward passes as
single-label). Text lengths are heavy-tailed (most 10-40 words, some 200-400) and some texts
repeat. Throughput is counted in requested (text, label) pairs per second, so work the scorer
avoids (repeated texts) counts as speed, as it does in production.

``--precision`` measures the scorer alone in every dtype instead (``--dtypes`` defaults to
float32, bfloat16 and int8 there): pairs/s, and the largest score difference to float32 over
the benchmark's events and labels. ``int8`` is ``TAGSTREAM_DTYPE=int8``: the float32 model
with its linear layers quantized dynamically (:func:`worker.scoring.runtime.quantize_linear`).

Run from the repository root: ``python -m bench.scorer [--events N] [--models tiny,bart-large]
[--dtypes float32,bfloat16] [--budget-sweep 4096,8192,...] [--precision] [--out results.json]
[--plot scorer.png]``. The plot (matplotlib, ``pip install -e '.[bench]'``) shows tagstream's
pairs/s against the token budget, with the pipeline's best and documented calls as lines,
one panel per model and dtype; it is written next to ``--out`` unless ``--plot`` says.
The bart-large-shaped model (random weights) is built once into ``--model-cache``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    pipeline,
)

from bench.common import cpu_flags, machine_info
from tests.support.models import (
    LABEL_WORDS,
    bart_large_shaped,
    build_tiny_bart,
    generated_sentences,
)
from worker.config.settings import DEFAULT_MAX_BATCH_TOKENS
from worker.contract.scorer import LabelScores, ScoreRequest
from worker.scoring.nli import NliScorer
from worker.scoring.runtime import INT8, quantize_linear

REPO = Path(__file__).resolve().parents[1]

SEED = 20240601
LABELS = LABEL_WORDS[:8]
TEMPLATE = "This example is {}."
# Share of events that are long (200-400 words); the rest are 10-40 words.
LONG_FRACTION = 0.15
# Share of events whose text repeats an earlier event's text (re-sent or duplicated news).
REPEAT_FRACTION = 0.2
SHORT_WORDS = (10, 40)
LONG_WORDS = (200, 400)


@dataclass(frozen=True)
class ModelDefaults:
    """Per-model run size: bart-large on 2 CPU cores scores ~40 tokens/s in float32."""

    events: int
    pipeline_batch_sizes: tuple[int, ...]
    repeats: int


# The documented pipeline (one call per event) is batch size 1 and always measured; batched
# pipeline runs pad every pair to the batch's longest, so big batches of heavy-tailed texts
# are slow on a CPU, and cost minutes each on bart-large.
MODEL_DEFAULTS = {
    "tiny": ModelDefaults(events=64, pipeline_batch_sizes=(1, 4, 16), repeats=3),
    "bart-large": ModelDefaults(events=5, pipeline_batch_sizes=(4,), repeats=1),
}
DEFAULT_MODELS = ("tiny", "bart-large")
DEFAULT_DTYPES = ("float32", "bfloat16")
# Events used once, untimed, so lazy initialisation does not land in any measurement.
WARMUP_EVENTS = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --precision: int8 is the float32 model quantized; float32 is the reference it is held to.
PRECISION_DTYPES = ("float32", "bfloat16", INT8)
REFERENCE_DTYPE = "float32"


@dataclass
class Measurement:
    model: str
    dtype: str
    method: str
    setting: int | None
    seconds: float
    pairs: int
    pairs_per_s: float


def make_events(count: int, seed: int = SEED) -> list[str]:
    """Heavy-tailed lengths with repeats, deterministic, in exact proportions.

    ``LONG_FRACTION`` of the events are long and ``REPEAT_FRACTION`` repeat an earlier text
    (at least one of each from 4 events on), so even a handful of events has the mix.
    """
    rng = random.Random(seed)
    words = " ".join(generated_sentences(4000, seed=seed)).split()
    floor = 1 if count >= 4 else 0
    repeats = max(floor, round(count * REPEAT_FRACTION))
    long = max(floor, round(count * LONG_FRACTION))
    kinds = ["long"] * long + ["short"] * (count - repeats - long)
    rng.shuffle(kinds)
    texts: list[str] = []
    for kind in kinds:
        low, high = LONG_WORDS if kind == "long" else SHORT_WORDS
        length = rng.randint(low, high)
        start = rng.randrange(len(words) - length)
        texts.append(" ".join(words[start : start + length]))
    for _ in range(repeats):
        texts.insert(rng.randrange(1, len(texts) + 1), rng.choice(texts))
    return texts


def model_dir(name: str, cache: Path, scratch: Path) -> Path:
    if name == "tiny":
        return build_tiny_bart(scratch / "tiny-bart")
    if name == "bart-large":
        return bart_large_shaped(cache / "bart-large-shaped")
    raise SystemExit(f"unknown model {name!r}: use tiny or bart-large")


def timed(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def micro_batches(scorer: NliScorer, requests: Sequence[ScoreRequest]) -> list[list[ScoreRequest]]:
    """Close a micro-batch when its estimated tokens reach the scorer's budget."""
    batches: list[list[ScoreRequest]] = [[]]
    tokens = 0
    for request in requests:
        estimate = scorer.estimate_tokens(request)
        if batches[-1] and tokens + estimate > scorer.max_batch_tokens:
            batches.append([])
            tokens = 0
        batches[-1].append(request)
        tokens += estimate
    return batches


def run_scorer(scorer: NliScorer, requests: Sequence[ScoreRequest]) -> list[LabelScores]:
    outcomes = [o for batch in micro_batches(scorer, requests) for o in scorer.score(batch)]
    return [o for o in outcomes if isinstance(o, LabelScores)]


def mean_tokens_per_pair(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> float:
    hypotheses = [TEMPLATE.format(label) for label in LABELS]
    lengths = [
        len(tokenizer(text, hypothesis, truncation="only_first")["input_ids"])
        for text in texts
        for hypothesis in hypotheses
    ]
    return sum(lengths) / len(lengths)


def load(directory: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForSequenceClassification.from_pretrained(
        directory, dtype=dtype, attn_implementation="sdpa"
    )
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def load_precision(
    directory: Path, dtype_name: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model as ``TAGSTREAM_DTYPE=<dtype_name>`` runs it (int8: float32, quantized)."""
    if dtype_name != INT8:
        return load(directory, DTYPES[dtype_name])
    model, tokenizer = load(directory, torch.float32)
    return quantize_linear(model), tokenizer


def label_scores(outcomes: Sequence[LabelScores]) -> list[dict[str, float]]:
    return [dict(zip(o.labels, o.scores, strict=True)) for o in outcomes]


def bench_precision(
    name: str, directory: Path, dtypes: Sequence[str], size: RunSize
) -> list[dict[str, Any]]:
    """NliScorer alone in each dtype on the same events: pairs/s and the score difference to
    float32 (always measured first, as the reference)."""
    texts = make_events(size.events)
    requests = [ScoreRequest(text, LABELS, True, TEMPLATE) for text in texts]
    warmup = [r for r in requests if len(r.text) < 400][:WARMUP_EVENTS]
    pairs = len(requests) * len(LABELS)
    rows: list[dict[str, Any]] = []
    reference: list[dict[str, float]] | None = None
    for dtype_name in [REFERENCE_DTYPE, *(d for d in dtypes if d != REFERENCE_DTYPE)]:
        model, tokenizer = load_precision(directory, dtype_name)
        scorer = NliScorer(model, tokenizer, name=name, max_batch_tokens=size.budgets[0])
        run_scorer(scorer, warmup)
        seconds, outputs = timed(partial(run_scorer, scorer, requests), size.repeats)
        scores = label_scores(cast(list[LabelScores], outputs))
        if reference is None:
            reference = scores
        worst = max(
            abs(got[label] - want[label])
            for got, want in zip(scores, reference, strict=True)
            for label in LABELS
        )
        rows.append(
            {
                "model": name,
                "dtype": scorer.info.dtype,
                "events": len(requests),
                "pairs": pairs,
                "seconds": round(seconds, 2),
                "pairs_per_s": round(pairs / seconds, 2),
                "max_abs_score_difference_vs_float32": worst,
                "max_batch_tokens": size.budgets[0],
                "repeats": size.repeats,
            }
        )
        print(
            f"  {name:10} {scorer.info.dtype:8} {pairs / seconds:9.2f} pairs/s"
            f"  ({seconds:.1f} s)  max |score - float32| {worst:.3g}",
            flush=True,
        )
        del scorer, model
    return rows


def print_precision(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'model':10} {'dtype':8} {'pairs':>5} {'pairs/s':>8} {'x float32':>9} {'max diff':>9}"
    )
    print("\nNliScorer per dtype (pairs/s; largest score difference to float32)")
    print(header)
    print("-" * len(header))
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["dtype"] == REFERENCE_DTYPE)
        print(
            f"{row['model']:10} {row['dtype']:8} {row['pairs']:5d} {row['pairs_per_s']:8.2f}"
            f" {row['pairs_per_s'] / base['pairs_per_s']:9.2f}"
            f" {row['max_abs_score_difference_vs_float32']:9.2g}"
        )


@dataclass(frozen=True)
class RunSize:
    events: int
    pipeline_batch_sizes: tuple[int, ...]
    repeats: int
    budgets: tuple[int, ...]


def run_size(model: str, args: argparse.Namespace) -> RunSize:
    """The model's defaults, overridden by whatever the command line gives."""
    defaults = MODEL_DEFAULTS[model]
    return RunSize(
        events=args.events or defaults.events,
        pipeline_batch_sizes=tuple(args.pipeline_batch_sizes or defaults.pipeline_batch_sizes),
        repeats=args.repeats or defaults.repeats,
        budgets=tuple(args.budget_sweep or (DEFAULT_MAX_BATCH_TOKENS,)),
    )


def bench_model(
    name: str, directory: Path, dtype_name: str, size: RunSize
) -> tuple[list[Measurement], dict[str, Any]]:
    model, tokenizer = load(directory, DTYPES[dtype_name])
    zero_shot = pipeline("zero-shot-classification", model=model, tokenizer=cast(Any, tokenizer))
    texts = make_events(size.events)
    labels = list(LABELS)
    pairs = len(texts) * len(labels)
    requests = [ScoreRequest(text, LABELS, True, TEMPLATE) for text in texts]
    warmup = [t for t in texts if len(t) < 400][:WARMUP_EVENTS]  # short ones: warm, not slow
    results: list[Measurement] = []

    def record(method: str, setting: int | None, seconds: float) -> None:
        results.append(
            Measurement(name, dtype_name, method, setting, seconds, pairs, pairs / seconds)
        )
        print(
            f"  {name:10} {dtype_name:8} {method:14} {setting or '':>6}"
            f" {pairs / seconds:9.2f} pairs/s  ({seconds:.1f} s)",
            flush=True,
        )

    def documented() -> list[dict[str, Any]]:
        return [zero_shot(text, candidate_labels=labels, multi_label=True) for text in texts]

    def batched(batch_size: int) -> Callable[[], object]:
        return lambda: zero_shot(
            texts, candidate_labels=labels, multi_label=True, batch_size=batch_size
        )

    def ours(scorer: NliScorer) -> Callable[[], object]:
        return lambda: run_scorer(scorer, requests)

    contenders: list[tuple[str, int | None, Callable[[], object]]] = [
        ("pipeline-docs", None, documented),
        *(("pipeline-bs", b, batched(b)) for b in size.pipeline_batch_sizes),
        *(
            (
                "tagstream",
                budget,
                ours(NliScorer(model, tokenizer, name=name, max_batch_tokens=budget)),
            )
            for budget in size.budgets
        ),
    ]
    for method, setting, _ in contenders:  # warm every path on short events, untimed
        if method == "tagstream":
            budget = DEFAULT_MAX_BATCH_TOKENS if setting is None else setting
            run_scorer(NliScorer(model, tokenizer, max_batch_tokens=budget), requests[:2])
        else:
            zero_shot(warmup, candidate_labels=labels, multi_label=True, batch_size=setting or 1)
    # Round robin, best of the repeats: every contender sees the same background load.
    best = [float("inf")] * len(contenders)
    outputs: list[object] = [None] * len(contenders)
    for round_number in range(size.repeats):
        for index, (method, setting, run) in enumerate(contenders):
            seconds, outputs[index] = timed(run, 1)
            best[index] = min(best[index], seconds)
            print(
                f"    round {round_number + 1}: {method} {setting or ''} {seconds:.2f} s",
                flush=True,
            )
    for (method, setting, _), seconds in zip(contenders, best, strict=True):
        record(method, setting, seconds)
    reference, scored = outputs[0], outputs[-1]

    expected = cast(list[dict[str, Any]], reference)
    worst = max(
        abs(a - b)
        for got, want in zip(cast(list[LabelScores], scored), expected, strict=True)
        for a, b in zip(got.scores, want["scores"], strict=True)
    )
    workload = {
        "model": name,
        "dtype": dtype_name,
        "events": len(texts),
        "pairs": pairs,
        "distinct_texts": len(set(texts)),
        "mean_tokens_per_pair": round(mean_tokens_per_pair(tokenizer, texts), 1),
        "max_abs_score_difference_vs_pipeline": worst,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pipeline_batch_sizes": list(size.pipeline_batch_sizes),
        "repeats": size.repeats,
    }
    return results, workload


def ratios(results: list[Measurement]) -> list[dict[str, Any]]:
    """Per model and dtype: best tagstream vs best pipeline (any way of calling it) and docs."""
    rows = []
    for model, dtype in dict.fromkeys((r.model, r.dtype) for r in results):
        group = [r for r in results if (r.model, r.dtype) == (model, dtype)]
        ours = max((r for r in group if r.method == "tagstream"), key=lambda r: r.pairs_per_s)
        piped = [r for r in group if r.method.startswith("pipeline")]
        tuned = max(piped, key=lambda r: r.pairs_per_s)
        docs = next(r for r in group if r.method == "pipeline-docs")
        rows.append(
            {
                "model": model,
                "dtype": dtype,
                "tagstream_pairs_per_s": round(ours.pairs_per_s, 2),
                "tagstream_budget": ours.setting,
                "tuned_pipeline_pairs_per_s": round(tuned.pairs_per_s, 2),
                "tuned_pipeline": f"bs{tuned.setting or 1}"
                + (" (docs)" if tuned.method == "pipeline-docs" else ""),
                "docs_pipeline_pairs_per_s": round(docs.pairs_per_s, 2),
                "ratio_vs_tuned": round(ours.pairs_per_s / tuned.pairs_per_s, 2),
                "ratio_vs_docs": round(ours.pairs_per_s / docs.pairs_per_s, 2),
            }
        )
    return rows


def machine() -> dict[str, Any]:
    """The shared machine facts plus what decides a model's speed on this host."""
    flags = cpu_flags()
    return {
        **machine_info(),
        "avx512_bf16": "avx512_bf16" in flags,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_out(path: Path, report: dict[str, Any]) -> None:
    """``report`` as indented JSON at ``path`` (its folder made if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


def print_table(rows: list[dict[str, Any]], workloads: list[dict[str, Any]]) -> None:
    header = (
        f"{'model':10} {'dtype':8} {'pairs':>5} {'tok/pair':>8} {'tagstream':>10}"
        f" {'tuned pipeline':>20} {'docs pipe':>10} {'x tuned':>8} {'x docs':>7}"
    )
    print("\npairs/s (requested text x label pairs per second)")
    print(header)
    print("-" * len(header))
    for row, work in zip(rows, workloads, strict=True):
        tuned = f"{row['tuned_pipeline_pairs_per_s']:.2f} {row['tuned_pipeline']}"
        print(
            f"{row['model']:10} {row['dtype']:8} {work['pairs']:5d}"
            f" {work['mean_tokens_per_pair']:8.1f} {row['tagstream_pairs_per_s']:10.2f}"
            f" {tuned:>20} {row['docs_pipeline_pairs_per_s']:10.2f}"
            f" {row['ratio_vs_tuned']:8.2f} {row['ratio_vs_docs']:7.2f}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def ints(value: str) -> list[int]:
        return [int(v) for v in value.split(",") if v]

    def choices(allowed: Iterable[str]) -> Callable[[str], list[str]]:
        def parse(value: str) -> list[str]:
            chosen = [v.strip() for v in value.split(",") if v.strip()]
            unknown = sorted(set(chosen) - set(allowed))
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown: {', '.join(unknown)}")
            return chosen

        return parse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events", type=int, default=None, help="events per model (default: per model)"
    )
    parser.add_argument("--models", type=choices(MODEL_DEFAULTS), default=list(DEFAULT_MODELS))
    parser.add_argument(
        "--dtypes",
        type=choices([*DTYPES, INT8]),
        default=None,
        help="default: float32,bfloat16 (with --precision: float32,bfloat16,int8)",
    )
    parser.add_argument(
        "--precision",
        action="store_true",
        help="the scorer alone per dtype: pairs/s and the score difference to float32",
    )
    parser.add_argument(
        "--budget-sweep",
        type=ints,
        default=None,
        help="tagstream max_batch_tokens values, e.g. 4096,8192,16384 (default: settings')",
    )
    parser.add_argument(
        "--pipeline-batch-sizes",
        type=ints,
        default=None,
        help="batched pipeline runs besides the documented one (default: per model)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs, the best counts (default: per model)"
    )
    parser.add_argument("--model-cache", type=Path, default=REPO / "bench" / "results" / "models")
    parser.add_argument("--out", type=Path, default=None, help="write results JSON here")
    parser.add_argument(
        "--plot", type=Path, default=None, help="PNG of the budget sweep (default: --out .png)"
    )
    return parser.parse_args(argv)


def plot(results: list[Measurement], path: Path) -> Path | None:
    """tagstream pairs/s against the token budget; the pipeline as horizontal lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    groups = list(dict.fromkeys((r.model, r.dtype) for r in results))
    figure, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for axis, (model, dtype) in zip(axes[0], groups, strict=True):
        group = [r for r in results if (r.model, r.dtype) == (model, dtype)]
        ours = sorted(
            (r for r in group if r.method == "tagstream"),
            key=lambda r: r.setting or DEFAULT_MAX_BATCH_TOKENS,
        )
        budgets = [r.setting or DEFAULT_MAX_BATCH_TOKENS for r in ours]
        axis.plot(budgets, [r.pairs_per_s for r in ours], marker="o", label="tagstream")
        piped = [r for r in group if r.method.startswith("pipeline")]
        best = max(piped, key=lambda r: r.pairs_per_s)
        docs = next(r for r in piped if r.method == "pipeline-docs")
        axis.axhline(best.pairs_per_s, color="tab:red", linestyle="--", label="pipeline, best")
        axis.axhline(docs.pairs_per_s, color="tab:gray", linestyle=":", label="pipeline, docs")
        axis.set_xscale("log", base=2)
        axis.set_title(f"{model} {dtype}")
        axis.set_xlabel("max_batch_tokens")
        axis.set_ylabel("pairs/s")
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")
    return path


def precision_main(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    dtypes = args.dtypes or list(PRECISION_DTYPES)
    print(f"torch threads: {torch.get_num_threads()}, labels per event: {len(LABELS)}")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            directory = model_dir(name, args.model_cache, Path(scratch))
            rows.extend(bench_precision(name, directory, dtypes, run_size(name, args)))
    print_precision(rows)
    if args.out is not None:
        report = {
            "machine": machine(),
            "settings": {
                "labels": list(LABELS),
                "template": TEMPLATE,
                "multi_label": True,
                "seed": SEED,
                "command": sys.argv,
            },
            "precision": rows,
        }
        write_out(args.out, report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.precision:
        return precision_main(args)
    if args.dtypes is None:
        args.dtypes = list(DEFAULT_DTYPES)
    if INT8 in args.dtypes:
        raise SystemExit("int8 is measured with --precision (the pipeline side has no int8 run)")
    results: list[Measurement] = []
    workloads: list[dict[str, Any]] = []
    print(f"torch threads: {torch.get_num_threads()}, labels per event: {len(LABELS)}")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            directory = model_dir(name, args.model_cache, Path(scratch))
            size = run_size(name, args)
            for dtype_name in args.dtypes:
                measured, workload = bench_model(name, directory, dtype_name, size)
                results.extend(measured)
                workloads.append(workload)
    rows = ratios(results)
    print_table(rows, workloads)
    if args.out is not None:
        report = {
            "machine": machine(),
            "settings": {
                "labels": list(LABELS),
                "template": TEMPLATE,
                "multi_label": True,
                "long_fraction": LONG_FRACTION,
                "repeat_fraction": REPEAT_FRACTION,
                "short_words": SHORT_WORDS,
                "long_words": LONG_WORDS,
                "seed": SEED,
                "budget_sweep": args.budget_sweep,
                "command": sys.argv,
            },
            "summary": rows,
            "workloads": workloads,
            "measurements": [asdict(r) for r in results],
        }
        write_out(args.out, report)
    picture = args.plot or (args.out.with_suffix(".png") if args.out is not None else None)
    if picture is not None:
        plot(results, picture)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
