"""The HTTP contract of ``POST /v1/classify``: the Hugging Face Inference API's zero-shot
payload in, its answer shape out (plus tagstream's ``tags``), and what an error looks like.

A payload becomes one :class:`~worker.contract.scorer.ScoreRequest` per text through the
event contract itself (:class:`~worker.contract.events.InputEvent` with the configured
limits, :func:`~worker.contract.codec.to_request` for the defaults, the scorer's token
estimate against ``TAGSTREAM_MAX_EVENT_TOKENS``), so a text is accepted here exactly when it
would be accepted as an event. What an event would have dead-lettered at ``validate`` is a
422 here, each problem named by its place in the payload (``inputs[2]``,
``parameters.candidate_labels[0]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.config.settings import TaggingSettings
from worker.contract.codec import (
    checked_scores,
    fast_event,
    select_tags,
    to_request,
    validation_context,
)
from worker.contract.events import DecodedEvent, InputEvent
from worker.contract.scorer import LabelScores, ScoreError, ScoreOutcome, ScoreRequest
from worker.errors import EventTooCostlyError, NoLabelsError, ScoresError

# The InputEvent field -> where the same value sits in the payload.
PAYLOAD_FIELDS: Final = {
    "labels": "parameters.candidate_labels",
    "multi_label": "parameters.multi_label",
    "hypothesis_template": "parameters.hypothesis_template",
}
# How many problems one error answer lists: enough to fix a request, never an echo of it.
MAX_REPORTED_PROBLEMS: Final = 10
_VALUE_ERROR_PREFIX: Final = "Value error, "
NO_LABELS: Final = "no candidate labels, and no default labels are configured (TAGSTREAM_LABELS)"


class ClassifyParameters(BaseModel):
    """``parameters`` of the Inference API's zero-shot task; anything left out falls back
    to the worker's settings (``TAGSTREAM_LABELS``, ``TAGSTREAM_MULTI_LABEL``,
    ``TAGSTREAM_HYPOTHESIS_TEMPLATE``), as for an event."""

    model_config = ConfigDict(extra="forbid", strict=True)

    candidate_labels: list[str] | str | None = Field(
        default=None,
        description="Labels to score the text against: a list, or one comma-separated string.",
    )
    multi_label: bool | None = Field(
        default=None, description="Independent probabilities per label, or one softmax."
    )
    hypothesis_template: str | None = Field(
        default=None, description="NLI hypothesis with exactly one '{}' for the label."
    )


class ClassifyPayload(BaseModel):
    """The request body of ``POST /v1/classify``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: str | list[str] = Field(description="One text, or a list of texts.")
    parameters: ClassifyParameters = Field(default_factory=ClassifyParameters)
    options: dict[str, Any] | None = Field(
        default=None,
        description="The Inference API's options (wait_for_model, use_cache): accepted, ignored.",
    )


# Every field name of the payload models: what an error's location may name.
PAYLOAD_FIELD_NAMES: Final = frozenset(
    {*ClassifyPayload.model_fields, *ClassifyParameters.model_fields}
)


class ClassifyResult(BaseModel):
    """The answer for one text, in the Inference API's shape, plus ``tags``."""

    sequence: str = Field(description="The text, as sent.")
    labels: list[str] = Field(description="Candidate labels, highest score first.")
    scores: list[float] = Field(description="Each label's score, within 0..1.")
    tags: list[str] = Field(
        description="Labels past their threshold (multi-label), else the top label."
    )
    truncated: bool = Field(
        description="Part of the text was not read: cut to the model's length, or past "
        "TAGSTREAM_MAX_CHUNKS windows (as `truncated` in the worker's scored events)."
    )
    chunks_read: int | None = Field(
        default=None,
        description="With TAGSTREAM_LONG_TEXT=chunk: the token windows of the text that "
        "were scored (as in the worker's scored events); absent otherwise.",
    )


class Problem(BaseModel):
    """One thing wrong with a request: where in it, and what."""

    model_config = ConfigDict(frozen=True)

    field: str
    message: str


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer of ``/v1/classify``."""

    error: str = Field(description="What kind of failure: invalid request, queue full, ...")
    problems: list[Problem] = Field(default_factory=list)


class RequestError(Exception):
    """A request the contract refuses; ``problems`` name the fields."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(dict.fromkeys(problems))[:MAX_REPORTED_PROBLEMS]
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in self.problems))


def location(loc: Sequence[int | str], *, root: str = "") -> str:
    """``("parameters", "candidate_labels", 1)`` -> ``parameters.candidate_labels[1]``."""
    path = root
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


def texts_of(payload: ClassifyPayload, max_inputs: int) -> list[str]:
    """The payload's texts; raises :class:`RequestError` for none or too many."""
    texts = [payload.inputs] if isinstance(payload.inputs, str) else list(payload.inputs)
    if not texts:
        raise RequestError([Problem(field="inputs", message="must hold at least one text")])
    if len(texts) > max_inputs:
        message = f"{len(texts)} texts, more than TAGSTREAM_SERVE_MAX_INPUTS={max_inputs}"
        raise RequestError([Problem(field="inputs", message=message)])
    return texts


def _event_fields(parameters: ClassifyParameters) -> dict[str, Any]:
    labels = parameters.candidate_labels
    if isinstance(labels, str):  # the Inference API's comma-separated form
        labels = [label.strip() for label in labels.split(",") if label.strip()]
    fields: dict[str, Any] = {
        "labels": labels,
        "multi_label": parameters.multi_label,
        "hypothesis_template": parameters.hypothesis_template,
    }
    return {name: value for name, value in fields.items() if value is not None}


def _payload_location(error_loc: Sequence[int | str], text_field: str) -> list[int | str]:
    if not error_loc:
        return [text_field]
    head, *rest = error_loc
    mapped = text_field if head == "text" else PAYLOAD_FIELDS.get(str(head), str(head))
    return [mapped, *rest]


def _decode(obj: dict[str, Any], tagging: TaggingSettings, text_field: str) -> DecodedEvent:
    event = fast_event(obj, tagging)
    if event is not None:
        return event
    try:
        model = InputEvent.model_validate(obj, context=validation_context(tagging))
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise RequestError(
            Problem(
                field=location(_payload_location(error["loc"], text_field)),
                message=error["msg"].removeprefix(_VALUE_ERROR_PREFIX),
            )
            for error in errors
        ) from None
    return DecodedEvent.of(model)


def score_requests(
    payload: ClassifyPayload,
    tagging: TaggingSettings,
    max_inputs: int,
    estimate_tokens: Callable[[ScoreRequest], int],
) -> tuple[list[ScoreRequest], list[int]]:
    """Each text's scorer request and its token estimate; raises :class:`RequestError`
    naming every field that breaks the event contract or its limits."""
    texts = texts_of(payload, max_inputs)
    single = isinstance(payload.inputs, str)
    shared = _event_fields(payload.parameters)
    requests: list[ScoreRequest] = []
    tokens: list[int] = []
    problems: list[Problem] = []
    for index, text in enumerate(texts):
        text_field = "inputs" if single else f"inputs[{index}]"
        try:
            event = _decode({"text": text, **shared}, tagging, text_field)
            request = to_request(event, tagging)
        except RequestError as exc:
            problems.extend(exc.problems)
            continue
        except NoLabelsError:
            problems.append(Problem(field=PAYLOAD_FIELDS["labels"], message=NO_LABELS))
            continue
        try:
            cost = estimate_tokens(request)
        except Exception as exc:  # the worker dead-letters such an event at inference
            problems.append(Problem(field=text_field, message=f"cannot be estimated: {exc!r}"))
            continue
        if cost > tagging.max_event_tokens:
            too_costly = EventTooCostlyError(cost, tagging.max_event_tokens)
            problems.append(Problem(field=text_field, message=str(too_costly)))
            continue
        requests.append(request)
        tokens.append(cost)
    if problems:
        raise RequestError(problems)
    return requests, tokens


class ScoringFailedError(Exception):
    """A text the scorer could not score; ``transient`` when trying later may work."""

    def __init__(self, field: str, outcome: ScoreError) -> None:
        super().__init__(f"{field}: {outcome.error_class}: {outcome.message}")
        self.transient = outcome.transient
        self.problem = Problem(
            field=field, message=f"cannot be scored: {outcome.error_class}: {outcome.message}"
        )


def results(
    payload: ClassifyPayload,
    requests: Sequence[ScoreRequest],
    outcomes: Sequence[ScoreOutcome],
    tagging: TaggingSettings,
) -> list[dict[str, Any]]:
    """The answer documents (the :class:`ClassifyResult` shape); raises
    :class:`ScoringFailedError` for the first text that has no valid scores."""
    single = isinstance(payload.inputs, str)
    answers: list[dict[str, Any]] = []
    for index, (request, outcome) in enumerate(zip(requests, outcomes, strict=True)):
        field = "inputs" if single else f"inputs[{index}]"
        if isinstance(outcome, ScoreError):
            raise ScoringFailedError(field, outcome)
        answers.append(_answer(request, outcome, tagging, field))
    return answers


def _answer(
    request: ScoreRequest, scores: LabelScores, tagging: TaggingSettings, field: str
) -> dict[str, Any]:
    try:
        labels, values = checked_scores(scores)
    except ScoresError as exc:
        raise ScoringFailedError(field, ScoreError.from_exception(exc)) from None
    answer: dict[str, Any] = {
        "sequence": request.text,
        "labels": labels,
        "scores": values,
        "tags": select_tags(scores, request.multi_label, tagging),
        "truncated": bool(scores.truncated),
    }
    if scores.chunks is not None:
        answer["chunks_read"] = int(scores.chunks)
    return answer
