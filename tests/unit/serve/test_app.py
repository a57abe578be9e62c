"""``tagstream serve`` over real HTTP: pipeline parity, shared batches, the bounds, probes."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from tests.support.models import LABEL_WORDS, generated_sentences
from tests.support.scorers import FakeScorer
from tests.support.serve import running_server, wait_until
from worker.config.serve import ServeBatching, ServeSettings
from worker.config.settings import BatchSettings, ModelSettings, TaggingSettings
from worker.contract.scorer import LabelScores, ScoreOutcome, ScoreRequest
from worker.errors import DeviceError
from worker.pipeline.inference import WARM_UP_TEXT
from worker.scoring.nli import NliScorer

FIXTURES = ("tiny_bart_dir", "tiny_deberta_dir", "tiny_two_class_dir")
TOLERANCE = 1e-5  # as tests/unit/scoring/test_nli.py
TEMPLATE = "This example is {}."
CUSTOM = "The topic of this text is {}!"
LABELS = list(LABEL_WORDS[:6])
BATCH_SIZE_SUM = "tagstream_batch_size_events_sum"
BATCH_SIZE_COUNT = "tagstream_batch_size_events_count"
BATCHES = "tagstream_batches_total"
PENDING = "tagstream_serve_pending_texts"
# A batch that only closes on size: the wait never runs out within a test.
NEVER_S = 600_000


class RecordingScorer(FakeScorer):
    """The fake scorer, recording each batch's size; ``gate`` (when given) holds every
    batch but the warm-up until the test sets it."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__(ModelSettings())
        self.gate = gate
        self.batches: list[int] = []
        self.entered = threading.Event()

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        if requests[0].text != WARM_UP_TEXT:
            self.batches.append(len(requests))
            self.entered.set()
            if self.gate is not None:
                assert self.gate.wait(60)
        return super().score(requests)


def _classify(client: httpx.Client, payload: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/classify", json=payload)


def _payload(text: str | list[str], labels: Sequence[str], **parameters: Any) -> dict[str, Any]:
    return {"inputs": text, "parameters": {"candidate_labels": list(labels), **parameters}}


# -- parity with the pipeline ------------------------------------------------------------------


def _parity_payloads() -> list[dict[str, Any]]:
    texts = list(generated_sentences(4, seed=11))
    return [
        _payload(texts[0], LABELS, multi_label=True, hypothesis_template=TEMPLATE),
        _payload(texts[1], LABELS, multi_label=False, hypothesis_template=TEMPLATE),
        _payload(texts[2], ["weather"], multi_label=False, hypothesis_template=TEMPLATE),
        _payload(texts[3], LABEL_WORDS[4:12], multi_label=True, hypothesis_template=CUSTOM),
        _payload(texts[:3], ["music", "food", "sports"], multi_label=False),
    ]


@pytest.mark.parametrize("fixture", FIXTURES)
def test_the_endpoint_gives_the_pipelines_scores(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    directory: Path = request.getfixturevalue(fixture)
    model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    zero_shot = pipeline("zero-shot-classification", model=model.eval(), tokenizer=tokenizer)
    scorer = NliScorer(model, tokenizer, max_batch_tokens=16_384)
    payloads = _parity_payloads()

    # Sent at once, so that they are batched together.
    with running_server(scorer) as live, live.client() as client, ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(lambda p: _classify(client, p), payloads))

    compared = 0
    for payload, answer in zip(payloads, answers, strict=True):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        results = [body] if isinstance(payload["inputs"], str) else body
        texts = [payload["inputs"]] if isinstance(payload["inputs"], str) else payload["inputs"]
        for text, result in zip(texts, results, strict=True):
            parameters = payload["parameters"]
            expected = cast(
                dict[str, Any],
                zero_shot(
                    text,
                    candidate_labels=parameters["candidate_labels"],
                    multi_label=parameters["multi_label"],
                    hypothesis_template=parameters.get("hypothesis_template", TEMPLATE),
                ),
            )
            assert result["sequence"] == expected["sequence"] == text
            assert result["labels"] == expected["labels"]
            deltas = [abs(a - b) for a, b in zip(result["scores"], expected["scores"], strict=True)]
            assert max(deltas) <= TOLERANCE
            if not parameters["multi_label"]:
                assert result["tags"] == expected["labels"][:1]
            compared += 1
    assert compared == 7


# -- batching ----------------------------------------------------------------------------------


def _send_all(client: httpx.Client, pool: ThreadPoolExecutor, texts: Sequence[str]) -> list[Any]:
    return [pool.submit(_classify, client, _payload(text, ["a", "b"])) for text in texts]


def test_texts_that_arrive_while_the_model_is_busy_share_the_next_batch() -> None:
    """Continuous batching: the first request goes alone (the model was idle); the seven
    that arrive while it is scored wait in the open batch and go together once it is done."""
    gate = threading.Event()
    scorer = RecordingScorer(gate)
    with running_server(scorer) as live, live.client() as client, ThreadPoolExecutor(8) as pool:
        first = _send_all(client, pool, ["first"])
        assert scorer.entered.wait(60)
        rest = _send_all(client, pool, [f"text {i}" for i in range(7)])
        wait_until(lambda: live.sample(PENDING) == 8, "eight pending texts")
        gate.set()
        answers = [future.result(60) for future in [*first, *rest]]
        assert [answer.status_code for answer in answers] == [200] * 8
        assert scorer.batches == [1, 7]
        assert live.sample(BATCH_SIZE_COUNT) == 2
        assert live.sample(BATCH_SIZE_SUM) == 8  # a mean batch size of 4
        assert live.sample(BATCHES, {"reason": "idle"}) == 2
        metrics = client.get("/metrics").text
    assert "tagstream_batch_size_events_sum 8.0" in metrics


def test_a_lone_request_does_not_wait_for_company_when_the_model_is_idle() -> None:
    scorer = RecordingScorer()
    batch = BatchSettings(max_batch_size=64, max_wait_ms=NEVER_S)
    with running_server(scorer, batch=batch) as live, live.client() as client:
        answers = [_classify(client, _payload(f"text {i}", ["a"])) for i in range(3)]
        assert [answer.status_code for answer in answers] == [200] * 3
        assert scorer.batches == [1, 1, 1]
        assert live.sample(BATCHES, {"reason": "idle"}) == 3
        assert live.sample(BATCHES, {"reason": "time"}) == 0


def test_windowed_batching_waits_for_company_as_the_worker_does() -> None:
    scorer = RecordingScorer()
    serve = ServeSettings(serve_batching=ServeBatching.WINDOWED)
    batch = BatchSettings(max_batch_size=8, max_wait_ms=NEVER_S)
    with running_server(scorer, serve=serve, batch=batch) as live, live.client() as client:
        with ThreadPoolExecutor(8) as pool:
            answers = [f.result(60) for f in _send_all(client, pool, [f"t {i}" for i in range(8)])]
        assert [answer.status_code for answer in answers] == [200] * 8
        assert scorer.batches == [8]
        assert live.sample(BATCH_SIZE_COUNT) == 1
        assert live.sample(BATCH_SIZE_SUM) == 8
        assert live.sample(BATCHES, {"reason": "size"}) == 1


def test_one_request_s_texts_are_answered_in_order() -> None:
    scorer = RecordingScorer()
    batch = BatchSettings(max_batch_size=3, max_wait_ms=10)
    texts = ["sports today", "finance news", "sports and finance", "nothing"]
    with running_server(scorer, batch=batch) as live, live.client() as client:
        answer = _classify(client, _payload(texts, ["sports", "finance"], multi_label=True))
    assert answer.status_code == 200
    body = answer.json()
    assert [result["sequence"] for result in body] == texts
    assert [result["tags"] for result in body] == [
        ["sports"],
        ["finance"],
        ["sports", "finance"],
        [],
    ]
    assert sorted(scorer.batches) == [1, 3]


# -- bounds ------------------------------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after_and_the_rest_still_scores() -> None:
    gate = threading.Event()
    scorer = RecordingScorer(gate)
    serve = ServeSettings(serve_max_pending_texts=2, serve_max_inputs=2)
    with running_server(scorer, serve=serve) as live, live.client() as client:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_classify, client, _payload(["one", "two"], ["a"]))
            assert scorer.entered.wait(60)
            refused = _classify(client, _payload("three", ["a"]))
            gate.set()
            accepted = first.result(60)
        again = _classify(client, _payload("three", ["a"]))
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["problems"][0]["field"] == "inputs"
    assert "TAGSTREAM_SERVE_MAX_PENDING_TEXTS=2" in refused.json()["problems"][0]["message"]
    assert accepted.status_code == 200 and again.status_code == 200
    assert live.sample("tagstream_http_requests_total", {"path": "/v1/classify", "status": "429"})


def test_a_body_over_the_limit_is_answered_413_without_being_parsed() -> None:
    serve = ServeSettings(serve_max_request_bytes=2048)
    with running_server(RecordingScorer(), serve=serve) as live, live.client() as client:
        big = _classify(client, _payload("x" * 4096, ["a"]))
        chunked = client.post(
            "/v1/classify",
            content=iter([b'{"inputs": "', b"y" * 4096, b'"}']),
            headers={"content-type": "application/json"},
        )
        small = _classify(client, _payload("x" * 1000, ["a"]))
    assert big.status_code == 413 and chunked.status_code == 413
    assert "TAGSTREAM_SERVE_MAX_REQUEST_BYTES=2048" in big.json()["problems"][0]["message"]
    assert small.status_code == 200


@pytest.mark.parametrize(
    ("payload", "field", "needle"),
    [
        ({"inputs": "   ", "parameters": {"candidate_labels": ["a"]}}, "inputs", "blank"),
        ({"inputs": ["ok", ""], "parameters": {"candidate_labels": ["a"]}}, "inputs[1]", "blank"),
        ({"inputs": "x" * 200, "parameters": {"candidate_labels": ["a"]}}, "inputs", "100"),
        ({"inputs": "text"}, "parameters.candidate_labels", "TAGSTREAM_LABELS"),
        (
            {"inputs": "t", "parameters": {"candidate_labels": ["a"], "hypothesis_template": "x"}},
            "parameters.hypothesis_template",
            "{}",
        ),
        (
            {"inputs": "t", "parameters": {"candidate_labels": ["a", "b", "c"]}},
            "parameters.candidate_labels",
            "at most 2 labels",
        ),
        ({"inputs": ["a"] * 5, "parameters": {"candidate_labels": ["a"]}}, "inputs", "MAX_INPUTS"),
        ({"inputs": [], "parameters": {"candidate_labels": ["a"]}}, "inputs", "at least one"),
        ({"inputs": 3}, "inputs", "valid"),
        ({"inputs": "t", "parameters": {"multi_label": "yes"}}, "parameters.multi_label", ""),
        ({"inputs": "t", "extra": 1}, "extra", ""),
        ({"text": "t"}, "inputs", "required"),
    ],
)
def test_invalid_requests_are_422_naming_the_field(
    payload: dict[str, Any], field: str, needle: str
) -> None:
    tagging = TaggingSettings(max_text_chars=100, max_labels=2)
    serve = ServeSettings(serve_max_inputs=4)
    server = running_server(RecordingScorer(), serve=serve, tagging=tagging)
    with server as live, live.client() as client:
        answer = _classify(client, payload)
    assert answer.status_code == 422, answer.text
    problems = answer.json()["problems"]
    assert any(p["field"].startswith(field) and needle in p["message"] for p in problems), problems


def test_a_body_that_is_not_json_is_400_naming_the_body() -> None:
    with running_server(RecordingScorer()) as live, live.client() as client:
        answer = client.post(
            "/v1/classify", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert answer.status_code == 400
    assert answer.json()["problems"][0]["field"] == "body"


def test_labels_as_one_comma_separated_string_and_configured_defaults() -> None:
    tagging = TaggingSettings(labels=["sports", "finance"], multi_label=False)
    with running_server(RecordingScorer(), tagging=tagging) as live, live.client() as client:
        given = _classify(client, {"inputs": "food", "parameters": {"candidate_labels": "a, food"}})
        default = _classify(client, {"inputs": "finance today"})
    assert given.json()["labels"] == ["food", "a"]
    assert default.json()["labels"][0] == "finance"
    assert default.json()["tags"] == ["finance"]


def test_a_text_the_scorer_rejects_is_422_naming_it() -> None:
    with running_server(RecordingScorer()) as live, live.client() as client:
        answer = _classify(client, _payload(["fine", "<<score-error>>"], ["a"]))
    assert answer.status_code == 422
    assert answer.json()["problems"][0]["field"] == "inputs[1]"
    assert "FakeScoreError" in answer.json()["problems"][0]["message"]


class BrokenDeviceScorer(RecordingScorer):
    """Scores the warm-up, then fails as a sticky CUDA error does."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        if requests[0].text != WARM_UP_TEXT:
            raise DeviceError("CUDA error: an illegal memory access was encountered")
        return super().score(requests)


def test_a_device_error_answers_503_and_stops_the_server() -> None:
    with running_server(BrokenDeviceScorer()) as live, live.client() as client:
        answer = _classify(client, _payload("t", ["a"]))
        wait_until(lambda: bool(live.fatal), "the fatal report")
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    assert answer.json()["problems"][0]["field"] == "inputs"
    assert [type(exc) for exc in live.fatal] == [DeviceError]


# -- probes ------------------------------------------------------------------------------------


def test_probes_answer_while_the_model_loads_and_classify_waits_for_it() -> None:
    gate = threading.Event()
    server = running_server(RecordingScorer(), load_gate=gate, wait_ready=False)
    with server as live, live.client() as client:
        assert client.get("/healthz").status_code == 200
        loading = client.get("/readyz")
        early = _classify(client, _payload("t", ["a"]))
        gate.set()
        wait_until(lambda: live.health.readiness().ok, "ready")
        ready = client.get("/readyz")
        later = _classify(client, _payload("t", ["a"]))
    assert loading.status_code == 503 and loading.json()["waiting_for"] == ["model"]
    assert early.status_code == 503 and early.headers["Retry-After"] == "1"
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    assert later.status_code == 200


def test_the_openapi_document_describes_the_endpoint() -> None:
    with running_server(RecordingScorer()) as live, live.client() as client:
        document = client.get("/openapi.json").json()
    operation = document["paths"]["/v1/classify"]["post"]
    assert {"200", "400", "413", "422", "429", "503"} <= set(operation["responses"])
    assert {"/healthz", "/readyz", "/metrics"} <= set(document["paths"])
    schemas = document["components"]["schemas"]
    assert {"inputs", "parameters"} <= set(schemas["ClassifyPayload"]["properties"])
    assert set(schemas["ClassifyResult"]["properties"]) == {
        "sequence",
        "labels",
        "scores",
        "tags",
        "truncated",
        "chunks_read",
    }


class ChunkingScorer(FakeScorer):
    """The fake scorer, as a scorer reading long texts in windows would answer: a text
    of more than 40 characters is read in 3 windows, one of more than 80 is cut."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreOutcome]:
        outcomes = super().score(requests)
        return [
            outcome._replace(truncated=len(request.text) > 80, chunks=3)
            if isinstance(outcome, LabelScores) and len(request.text) > 40
            else outcome
            for request, outcome in zip(requests, outcomes, strict=True)
        ]


def test_an_answer_says_whether_the_text_was_cut_and_how_many_windows_were_read() -> None:
    texts = ["short sports text", "sports " * 8, "sports " * 16]
    with running_server(ChunkingScorer(ModelSettings())) as live, live.client() as client:
        answer = _classify(client, _payload(texts, ["sports", "finance"]))
    assert answer.status_code == 200, answer.text
    short, chunked, cut = answer.json()
    assert short["truncated"] is False and "chunks_read" not in short
    assert chunked["truncated"] is False and chunked["chunks_read"] == 3
    assert cut["truncated"] is True and cut["chunks_read"] == 3
