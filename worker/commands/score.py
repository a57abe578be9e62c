"""``tagstream score``: score JSON-lines input events offline, without Kafka.

Reads one input event per line from a file (or stdin) and writes one scored event per
valid line to stdout, in input order. Each scored event's ``source`` is
``{"topic": "-", "partition": 0, "offset": <1-based line number>, "timestamp": null}``,
so an output record points back at its input line.

Blank lines are skipped silently (a trailing newline or spacing between records is not an
error). Every other line that cannot be decoded, validated or scored is reported on
stderr as ``line N: <stage>: <reason>`` and skipped. Exit status: 0 when every non-blank
line was scored, 2 when any was not or when a setting is invalid.

Flags override the ``TAGSTREAM_*`` environment variables of the same settings.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, NamedTuple

from pydantic import ValidationError
from tqdm import tqdm

from worker.config.loading import build_section, describe_errors
from worker.config.settings import ModelSettings, TaggingSettings
from worker.contract.codec import decode_input, encode_output, to_request
from worker.contract.events import EventFields
from worker.contract.scorer import ScoreError, Scorer, ScoreRequest
from worker.errors import (
    ConfigError,
    EventError,
    ScorerConfigError,
    ScoresError,
    UnknownProfileError,
)
from worker.exit_codes import EXIT_OK, EXIT_USAGE
from worker.observability.logs import configure_logging
from worker.scoring.factory import build_scorer

# Events per scorer call: enough rows to fill a CPU/GPU forward pass for short texts while
# keeping the first output line quick; the scorer splits further by its token budget.
DEFAULT_BATCH_SIZE: Final = 32
STDIN: Final = "-"
SOURCE_TOPIC: Final = "-"
SOURCE_PARTITION: Final = 0
HUB_PROGRESS_BARS_ENV: Final = "HF_HUB_DISABLE_PROGRESS_BARS"

# CLI destination -> settings field, per settings class.
MODEL_FLAGS: Final = {
    "model": "model",
    "revision": "revision",
    "scorer": "scorer",
    "device": "device",
    "dtype": "dtype",
    "max_batch_tokens": "max_batch_tokens",
    "long_text": "long_text",
    "max_chunks": "max_chunks",
}
TAGGING_FLAGS: Final = {
    "labels": "labels",
    "multi_label": "multi_label",
    "template": "hypothesis_template",
    "threshold": "threshold",
    "include_nli_probs": "include_nli_probs",
}
_FIELD_TO_FLAG: Final = {field: dest for dest, field in {**MODEL_FLAGS, **TAGGING_FLAGS}.items()}


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.add_argument(
        "input", nargs="?", default=STDIN, help="JSON-lines file of input events ('-': stdin)"
    )
    parser.add_argument("--labels", help="default labels, comma-separated")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--multi-label", dest="multi_label", action="store_const", const=True, default=None
    )
    mode.add_argument("--single-label", dest="multi_label", action="store_const", const=False)
    parser.add_argument("--template", help="hypothesis template with '{}' for the label")
    parser.add_argument("--threshold", type=float, help="multi-label tag threshold, 0..1")
    parser.add_argument("--model", help="hub id or local model directory")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--scorer", help="'nli', 'embedding' or 'module:attribute'")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", help="auto, float32, float16, bfloat16 or int8 (CPU only)")
    parser.add_argument("--max-batch-tokens", type=int, help="token budget of a forward pass")
    parser.add_argument(
        "--long-text", help="truncate, or chunk: read long texts in overlapping token windows"
    )
    parser.add_argument("--max-chunks", type=int, help="chunk mode: windows scored per event")
    parser.add_argument(
        "--include-nli-probs",
        action="store_const",
        const=True,
        default=None,
        help="add per-label NLI probabilities to each scored event",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"events per scorer call (default {DEFAULT_BATCH_SIZE})",
    )


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    return {
        field: getattr(args, dest)
        for dest, field in flags.items()
        if getattr(args, dest) is not None
    }


def load_settings(args: argparse.Namespace) -> tuple[ModelSettings, TaggingSettings]:
    """Environment settings with the given flags on top; raises :class:`ConfigError`."""
    model = build_section(ModelSettings, {}, _given(args, MODEL_FLAGS), _FIELD_TO_FLAG)
    tagging = build_section(TaggingSettings, {}, _given(args, TAGGING_FLAGS), _FIELD_TO_FLAG)
    return model, tagging


class _Line(NamedTuple):
    """The coordinates a scored line reports as its source (``-``, 0, the line number)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None


@dataclass(frozen=True, slots=True)
class _Pending:
    line: int
    event: EventFields
    request: ScoreRequest


class _Run:
    """Scores lines in batches, writes scored events, reports failures; counts problems."""

    def __init__(
        self, scorer: Scorer, tagging: TaggingSettings, out: IO[bytes], progress: tqdm[Any]
    ) -> None:
        self.scorer = scorer
        self.tagging = tagging
        self.out = out
        self.progress = progress
        self.failures = 0
        self.scored = 0

    def report(self, line: int, stage: str, reason: str) -> None:
        self.failures += 1
        self.progress.write(f"line {line}: {stage}: {reason}", file=sys.stderr)

    def prepare(self, line: int, raw: bytes) -> _Pending | None:
        try:
            event = decode_input(raw, self.tagging)
            if event.profile is not None:  # no control topic here: as a worker without one
                raise UnknownProfileError(event.profile, None)
            return _Pending(line, event, to_request(event, self.tagging))
        except EventError as exc:
            self.report(line, exc.stage, str(exc))
            return None

    def flush(self, pending: list[_Pending]) -> None:
        if not pending:
            return
        outcomes = self.scorer.score([item.request for item in pending])
        scored_at = datetime.now(UTC)
        chunks: list[bytes] = []
        for item, outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, ScoreError):
                self.report(item.line, "score", f"{outcome.error_class}: {outcome.message}")
                continue
            coordinates = _Line(SOURCE_TOPIC, SOURCE_PARTITION, item.line, None)
            try:
                value = encode_output(
                    item.event,
                    item.request,
                    outcome,
                    coordinates,
                    self.tagging,
                    self.scorer.info,
                    scored_at,
                )
            except ScoresError as exc:
                self.report(item.line, "score", f"{type(exc).__name__}: {exc}")
                continue
            chunks.append(value + b"\n")
        self.out.write(b"".join(chunks))
        self.out.flush()
        self.scored += len(chunks)
        self.progress.update(len(pending))


def score_lines(
    lines: Iterable[bytes],
    scorer: Scorer,
    tagging: TaggingSettings,
    out: IO[bytes],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: tqdm[Any] | None = None,
) -> int:
    """Score JSON lines to ``out``; return how many non-blank lines were not scored."""
    run = _Run(scorer, tagging, out, tqdm(disable=True) if progress is None else progress)
    pending: list[_Pending] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        item = run.prepare(number, raw)
        if item is None:
            continue
        pending.append(item)
        if len(pending) >= batch_size:
            run.flush(pending)
            pending = []
    run.flush(pending)
    return run.failures


@contextmanager
def _open_input(name: str) -> Iterator[IO[bytes]]:
    if name == STDIN:
        yield sys.stdin.buffer
        return
    with Path(name).open("rb") as handle:
        yield handle


def _quiet_libraries(interactive: bool) -> None:
    """Keep stdout for scored events only: logs go to stderr, no load bars in pipelines."""
    configure_logging(stream=sys.stderr)
    if not interactive:  # read when transformers is first imported, i.e. by build_scorer
        os.environ.setdefault(HUB_PROGRESS_BARS_ENV, "1")


def _fail(message: str) -> int:
    print(f"tagstream score: {message}", file=sys.stderr)
    return EXIT_USAGE


def execute(args: argparse.Namespace) -> int:
    interactive = sys.stderr.isatty()
    try:
        _quiet_libraries(interactive)
        model_settings, tagging = load_settings(args)
    except ConfigError as exc:
        return _fail(str(exc))
    except ValidationError as exc:  # a logging setting (TAGSTREAM_LOG_*)
        return _fail(describe_errors(exc))
    if args.input != STDIN and not Path(args.input).is_file():
        return _fail(f"input file not found: {args.input}")
    try:
        scorer = build_scorer(model_settings, include_nli_probs=tagging.include_nli_probs)
    except (ScorerConfigError, ValueError, OSError) as exc:
        return _fail(f"cannot build the scorer: {exc}")
    progress = tqdm(unit="event", file=sys.stderr, disable=not interactive)
    try:
        with _open_input(args.input) as lines, progress:
            failures = score_lines(
                lines,
                scorer,
                tagging,
                sys.stdout.buffer,
                batch_size=args.batch_size,
                progress=progress,
            )
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); silence the flush at interpreter exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_USAGE
    if failures:
        print(f"tagstream score: {failures} line(s) not scored", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
