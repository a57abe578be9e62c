"""HealthState and the /metrics, /healthz, /readyz server (real HTTP on a free port)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tests.support.observability import FakeClock, new_metrics, record_everything, samples_of
from worker.config.observability import ObservabilitySettings
from worker.errors import ObservabilityServerError
from worker.observability.health import HealthState
from worker.observability.metrics import WorkerMetrics
from worker.observability.server import ObservabilityServer, start_observability_server
from worker.observability.setup import start_observability

STALE_AFTER_S = 0.5
# Loopback answers in milliseconds; this only bounds a broken test.
HTTP_TIMEOUT_S = 10.0


def _get(port: int, path: str, accept: str | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept is not None:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def _json(port: int, path: str) -> tuple[int, dict[str, Any]]:
    status, content_type, body = _get(port, path)
    assert content_type == "application/json"
    parsed = orjson.loads(body)
    assert isinstance(parsed, dict)
    return status, parsed


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0)


@pytest.fixture
def health(clock: FakeClock) -> HealthState:
    return HealthState(stale_after_s=STALE_AFTER_S, clock=clock)


@pytest.fixture
def metrics() -> WorkerMetrics:
    return new_metrics()


@pytest.fixture
def server(metrics: WorkerMetrics, health: HealthState) -> Iterator[ObservabilityServer]:
    with ObservabilityServer(metrics.registry, health, host="127.0.0.1", port=0) as running:
        yield running


# -- readiness -----------------------------------------------------------------------------


def test_readyz_waits_for_model_and_group_then_fails_during_shutdown(
    server: ObservabilityServer, health: HealthState
) -> None:
    assert _json(server.port, "/readyz") == (
        503,
        {"status": "not_ready", "waiting_for": ["model", "group"]},
    )
    health.mark_model_ready()
    assert _json(server.port, "/readyz") == (503, {"status": "not_ready", "waiting_for": ["group"]})
    health.mark_joined()
    assert _json(server.port, "/readyz") == (200, {"status": "ready"})
    health.mark_shutting_down()
    assert _json(server.port, "/readyz") == (503, {"status": "shutting_down"})


def test_readiness_waits_for_the_control_topic_once_it_is_loading(health: HealthState) -> None:
    health.mark_model_ready()
    health.mark_joined()
    assert health.readiness().ok  # no control topic: nothing to wait for
    health.mark_profiles_loading()
    assert health.readiness().body == {"status": "not_ready", "waiting_for": ["profiles"]}
    health.mark_profiles_loaded()
    assert health.readiness().ok


def test_the_metrics_observer_holds_readiness_while_profiles_load() -> None:
    obs_settings = ObservabilitySettings(metrics_port=0)
    obs = start_observability(obs_settings, max_batch_size=8, metrics=new_metrics())
    obs.health.mark_model_ready()
    obs.health.mark_joined()
    obs.observer.profiles_loading()
    assert obs.health.readiness().body["waiting_for"] == ["profiles"]
    obs.observer.profiles_loaded(3)
    assert obs.health.readiness().ok
    obs.observer.profile_changed("set", 4)
    obs.observer.profile_rejected("invalid")
    exposition = obs.metrics.exposition().decode()
    assert "tagstream_label_profiles 4.0" in exposition
    assert 'tagstream_profile_changes_total{kind="set"} 1.0' in exposition
    assert 'tagstream_profile_records_rejected_total{reason="invalid"} 1.0' in exposition
    assert 'tagstream_profile_records_rejected_total{reason="too_many"} 0.0' in exposition


def test_readiness_is_lost_with_the_group_membership(health: HealthState) -> None:
    health.mark_model_ready()
    health.mark_joined()
    health.mark_left()
    assert health.readiness().body == {"status": "not_ready", "waiting_for": ["group"]}
    health.mark_joined()
    assert health.readiness().ok


def test_without_a_group_readiness_is_the_model_alone() -> None:
    health = HealthState(needs_group=False)  # tagstream serve
    assert health.readiness().body == {"status": "not_ready", "waiting_for": ["model"]}
    health.mark_model_ready()
    assert health.readiness().ok
    health.mark_shutting_down()
    assert health.readiness().body == {"status": "shutting_down"}


def test_readiness_is_lost_while_the_inference_circuit_is_open(health: HealthState) -> None:
    health.mark_model_ready()
    health.mark_joined()
    health.mark_scorer_failing(True)
    assert health.readiness().body == {"status": "not_ready", "waiting_for": ["scorer"]}
    health.mark_scorer_failing(False)
    assert health.readiness().ok


# -- liveness ------------------------------------------------------------------------------


def test_healthz_fails_naming_the_component_whose_heartbeat_is_stale(
    server: ObservabilityServer, health: HealthState, clock: FakeClock
) -> None:
    health.beat_poll()
    health.beat_inference()
    status, body = _json(server.port, "/healthz")
    assert (status, body["status"], body["stale"]) == (200, "ok", [])
    clock.now += STALE_AFTER_S * 2
    health.beat_poll()  # the poll loop goes on; the inference thread is stuck
    status, body = _json(server.port, "/healthz")
    assert (status, body["status"], body["stale"]) == (503, "stale", ["inference"])
    assert body["components"]["inference"]["age_s"] == pytest.approx(STALE_AFTER_S * 2)
    assert body["components"]["poll"]["age_s"] == 0
    health.beat_inference()  # an idle inference thread waking from its queue wait
    assert _json(server.port, "/healthz")[0] == 200


def test_an_inference_thread_waiting_on_an_empty_queue_stays_healthy(
    health: HealthState, clock: FakeClock
) -> None:
    health.beat_poll()
    with health.inference_idle():
        clock.now += STALE_AFTER_S * 10  # the queue stays empty for a long time
        health.beat_poll()
        check = health.liveness()
        assert check.ok
        assert check.body["components"]["inference"]["state"] == "waiting"
    # A batch arrived: busy scoring, so the bound applies again from now on.
    assert health.liveness().body["components"]["inference"] == {"age_s": 0.0}
    clock.now += STALE_AFTER_S * 2
    health.beat_poll()
    assert health.liveness().body["stale"] == ["inference"]


def test_healthz_reports_both_components_when_everything_stalls(
    server: ObservabilityServer, health: HealthState, clock: FakeClock
) -> None:
    health.beat_poll()
    health.beat_inference()
    clock.now += STALE_AFTER_S * 2
    status, body = _json(server.port, "/healthz")
    assert (status, body["stale"]) == (503, ["poll", "inference"])


def test_components_that_have_not_started_do_not_fail_liveness(
    health: HealthState, clock: FakeClock
) -> None:
    clock.now += STALE_AFTER_S * 100  # model loading takes long
    check = health.liveness()
    assert check.ok
    assert check.body["components"] == {
        "poll": {"state": "starting"},
        "inference": {"state": "starting"},
    }


def test_liveness_passes_while_shutting_down(health: HealthState, clock: FakeClock) -> None:
    health.beat_poll()
    health.beat_inference()
    health.mark_shutting_down()
    clock.now += STALE_AFTER_S * 2
    check = health.liveness()
    assert check.ok
    assert check.body["status"] == "shutting_down"


def test_stale_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        HealthState(stale_after_s=0)


# -- /metrics and the server -------------------------------------------------------------


def test_metrics_endpoint_serves_the_worker_registry(
    server: ObservabilityServer, metrics: WorkerMetrics
) -> None:
    record_everything(metrics)
    status, content_type, body = _get(server.port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    served = samples_of(body.decode())
    assert served[("tagstream_events_scored_total", frozenset())] == 1
    lag_labels = frozenset({("topic", "tagstream-input"), ("partition", "1")})
    assert served[("tagstream_consumer_lag_messages", lag_labels)] == 6


def test_metrics_endpoint_speaks_openmetrics_when_asked(server: ObservabilityServer) -> None:
    status, content_type, body = _get(
        server.port, "/metrics", accept="application/openmetrics-text"
    )
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_unknown_paths_are_404(server: ObservabilityServer) -> None:
    status, body = _json(server.port, "/nope")
    assert status == 404
    assert body["paths"] == ["/metrics", "/healthz", "/readyz"]


def test_head_requests_get_headers_only(server: ObservabilityServer) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/readyz", method="HEAD")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
    assert raised.value.code == 503
    assert raised.value.read() == b""


def test_port_zero_in_settings_turns_the_server_off(
    metrics: WorkerMetrics, health: HealthState
) -> None:
    settings = ObservabilitySettings(metrics_port=0)
    assert start_observability_server(settings, metrics.registry, health) is None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_settings_start_the_server_on_the_configured_port(
    metrics: WorkerMetrics, health: HealthState
) -> None:
    port = _free_port()
    settings = ObservabilitySettings(metrics_host="127.0.0.1", metrics_port=port)
    server = start_observability_server(settings, metrics.registry, health)
    assert server is not None
    try:
        assert server.port == port
        assert _get(port, "/healthz")[0] == 200
    finally:
        server.stop()
    server.stop()  # idempotent


def test_a_taken_port_is_a_clear_start_up_error(
    server: ObservabilityServer, metrics: WorkerMetrics, health: HealthState
) -> None:
    clash = ObservabilityServer(metrics.registry, health, host="127.0.0.1", port=server.port)
    with pytest.raises(ObservabilityServerError, match=f"127.0.0.1:{server.port}"):
        clash.start()


def test_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("METRICS_PORT", "METRICS_HOST", "LOG_FORMAT", "LOG_LEVEL"):
        monkeypatch.delenv(f"TAGSTREAM_{name}", raising=False)
    defaults = ObservabilitySettings()
    assert (defaults.metrics_port, defaults.metrics_host) == (9400, "0.0.0.0")
    assert (defaults.log_format, defaults.log_level) == ("auto", "INFO")
    monkeypatch.setenv("TAGSTREAM_METRICS_PORT", "0")
    monkeypatch.setenv("TAGSTREAM_LOG_FORMAT", "Console")
    monkeypatch.setenv("TAGSTREAM_LOG_LEVEL", "debug")
    monkeypatch.setenv("TAGSTREAM_HEALTH_STALE_AFTER_S", "15")
    configured = ObservabilitySettings()
    assert configured.metrics_port == 0
    assert (configured.log_format, configured.log_level) == ("console", "DEBUG")
    assert configured.health_stale_after_s == 15


def test_start_observability_wires_metrics_health_observer_and_server() -> None:
    settings = ObservabilitySettings(metrics_host="127.0.0.1", metrics_port=_free_port())
    obs = start_observability(settings, max_batch_size=16)
    try:
        assert obs.server is not None
        obs.observer.rebalance("assigned", [("news", 0)])
        obs.health.mark_model_ready()
        assert _json(obs.server.port, "/readyz") == (200, {"status": "ready"})
        status, _, body = _get(obs.server.port, "/metrics")
        assert status == 200
        assert samples_of(body.decode())[("tagstream_assigned_partitions", frozenset())] == 1
        config = obs.consumer_config()
        assert config["stats_cb"] == obs.metrics.update_from_statistics
        assert config["statistics.interval.ms"] > 0
        assert config["logger"].name == "tagstream.librdkafka"
    finally:
        obs.close()
    obs.close()


def test_start_observability_without_a_port_has_no_server() -> None:
    obs = start_observability(ObservabilitySettings(metrics_port=0), max_batch_size=16)
    assert obs.server is None
    obs.close()
