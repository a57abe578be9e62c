"""Accuracy of the embedding scorer on a labelled set: top-1 accuracy and macro-F1 of the tags.

The set is ``tests/data/zero_shot_eval.jsonl``: short news-like texts written for this
purpose, one JSON object a line, ``{"text", "labels", "split"}``, where ``labels`` are the
gold labels (one or two) and ``split`` is ``dev`` (used to choose the method and its
constants) or ``test`` (held out, reported). The demo's sample sentences are not in it.

Every text is scored through the worker's own path: ``EmbeddingScorer.from_settings`` on
the packaged MiniLM, requests built with the demo's labels and the default template, tags
chosen by ``worker.contract.codec.select_tags`` at the default threshold (multi-label).

* accuracy: the top-scored label is one of the gold labels;
* macro-F1: per label, F1 of "tagged" against "gold", averaged over the labels.

``--before DIR`` also scores the set with the scorer of another checkout (``DIR`` holds
its ``worker`` package, e.g. a worktree of the commit before a change), in a subprocess,
and reports both. Run from the repository root::

    python -m bench.zero_shot_eval [--before ../main] [--out bench/results/zero-shot-eval.json]

This file imports nothing from ``bench``, so the subprocess can run it against another
checkout's ``worker``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parents[1]
DATA: Final = REPO / "tests" / "data" / "zero_shot_eval.jsonl"
OUT: Final = REPO / "bench" / "results" / "zero-shot-eval.json"
# The demo's label set (dev/demo.py, DEMO_LABELS).
LABELS: Final = (
    "politics",
    "sports",
    "business",
    "technology",
    "science",
    "health",
    "entertainment",
    "weather",
)
SPLITS: Final = ("dev", "test")
# Thresholds reported besides the default, to show where the default sits on the curve.
SWEEP: Final = (0.3, 0.4, 0.5, 0.6, 0.7)
# Texts per scorer call: a worker micro-batch.
BATCH: Final = 64


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    labels: tuple[str, ...]
    split: str


@dataclass(frozen=True, slots=True)
class Scored:
    """One text's ranked labels and scores."""

    labels: tuple[str, ...]
    scores: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Metrics:
    texts: int
    accuracy: float
    macro_f1: float
    per_label_f1: dict[str, float]


def load_examples(path: Path = DATA) -> list[Example]:
    """The labelled set, in file order."""
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            examples.append(Example(obj["text"], tuple(obj["labels"]), obj["split"]))
    return examples


def tags_at(scored: Scored, threshold: float) -> set[str]:
    """Multi-label tags: every label scoring at least ``threshold``."""
    return {
        label
        for label, score in zip(scored.labels, scored.scores, strict=True)
        if score >= threshold
    }


def f1(tp: int, fp: int, fn: int) -> float:
    """F1 of counts; 0 when the label was never gold nor tagged."""
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def evaluate(
    examples: Sequence[Example],
    scored: Sequence[Scored],
    tags: Sequence[set[str]],
    labels: Sequence[str] = LABELS,
) -> Metrics:
    """Top-1 accuracy and macro-F1 of ``tags`` against the gold labels."""
    hits = sum(s.labels[0] in e.labels for e, s in zip(examples, scored, strict=True))
    per_label = {}
    for label in labels:
        tp = fp = fn = 0
        for example, tagged in zip(examples, tags, strict=True):
            gold, predicted = label in example.labels, label in tagged
            tp += gold and predicted
            fp += predicted and not gold
            fn += gold and not predicted
        per_label[label] = round(f1(tp, fp, fn), 4)
    return Metrics(
        texts=len(examples),
        accuracy=round(hits / len(examples), 4) if examples else 0.0,
        macro_f1=round(sum(per_label.values()) / len(labels), 4),
        per_label_f1=per_label,
    )


def score_texts(texts: Sequence[str], labels: Sequence[str] = LABELS) -> tuple[list[Scored], str]:
    """Score ``texts`` with the embedding scorer as the worker builds it; and its revision."""

    from worker.config.settings import ModelSettings, TaggingSettings
    from worker.contract.scorer import LabelScores, ScoreRequest
    from worker.scoring.embedding import EmbeddingScorer

    scorer = EmbeddingScorer.from_settings(ModelSettings(scorer="embedding", device="cpu"))
    template = TaggingSettings().hypothesis_template
    out: list[Scored] = []
    for start in range(0, len(texts), BATCH):
        requests = [
            ScoreRequest(text, tuple(labels), True, template)
            for text in texts[start : start + BATCH]
        ]
        for outcome in scorer.score(requests):
            if not isinstance(outcome, LabelScores):
                raise RuntimeError(f"scoring failed: {outcome}")
            out.append(Scored(outcome.labels, outcome.scores))
    return out, scorer.info.revision


def default_threshold() -> float:
    from worker.config.settings import TaggingSettings

    return TaggingSettings().threshold


def sample_texts() -> tuple[str, ...]:
    from worker.commands.produce import SAMPLE_TEXTS

    return tuple(SAMPLE_TEXTS)


def run_side(examples: Sequence[Example]) -> dict[str, Any]:
    """Every figure of one scorer: per split at the default threshold, the sweep, the demo."""
    started = time.perf_counter()
    samples = sample_texts()
    scored, revision = score_texts([e.text for e in examples] + list(samples))
    scored, sample_scores = scored[: len(examples)], scored[len(examples) :]
    threshold = default_threshold()
    result: dict[str, Any] = {"threshold": threshold, "model_revision": revision}
    for split in SPLITS:
        rows = [i for i, e in enumerate(examples) if e.split == split]
        part = [examples[i] for i in rows]
        part_scores = [scored[i] for i in rows]
        result[split] = asdict(
            evaluate(part, part_scores, [tags_at(s, threshold) for s in part_scores])
        )
        result[f"{split}_macro_f1_by_threshold"] = {
            str(t): evaluate(part, part_scores, [tags_at(s, t) for s in part_scores]).macro_f1
            for t in SWEEP
        }
    result["demo_samples"] = [
        {
            "text": text,
            "tags": sorted(tags_at(s, threshold), key=s.labels.index),
            "top": [
                [label, round(score, 3)]
                for label, score in zip(s.labels[:3], s.scores[:3], strict=True)
            ],
        }
        for text, s in zip(samples, sample_scores, strict=True)
    ]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def run_before(checkout: Path) -> dict[str, Any]:
    """``run_side`` with the ``worker`` package of ``checkout``, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve()), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--side-only"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def report(name: str, side: dict[str, Any]) -> None:
    for split in SPLITS:
        figures = side[split]
        print(
            f"{name:<7} {split:<5} texts {figures['texts']:>3}  accuracy {figures['accuracy']:.3f}"
            f"  macro-F1 {figures['macro_f1']:.3f}  (threshold {side['threshold']})"
        )
    sweep = side["dev_macro_f1_by_threshold"]
    print(
        f"{name:<7} dev macro-F1 by threshold: "
        + ", ".join(f"{t} {v:.3f}" for t, v in sweep.items())
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--before", type=Path, help="a checkout whose scorer is the baseline")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON results [%(default)s]")
    parser.add_argument("--samples", action="store_true", help="print the demo sentences' tags")
    parser.add_argument("--side-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    examples = load_examples()
    if args.side_only:
        print(json.dumps(run_side(examples)))
        return 0
    results: dict[str, Any] = {
        "data": str(DATA.relative_to(REPO)),
        "labels": list(LABELS),
        "after": run_side(examples),
    }
    if args.before is not None:
        results["before"] = run_before(args.before)
        report("before", results["before"])
    report("after", results["after"])
    if args.samples:
        for sample in results["after"]["demo_samples"]:
            print(f"  {sample['text'][:70]:<70}  {', '.join(sample['tags']) or '-'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
