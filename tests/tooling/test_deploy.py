"""Invariants of the deployment files: the Helm chart, docker-compose.yml and the Dockerfile.

The chart is rendered with the real ``helm`` (built by ``ci/validate-deploy.sh`` into
``~/.cache/tagstream/bin``); a missing helm fails these tests rather than skipping them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from ci.check_manifests import DEFAULT_KUBE_VERSION, check_documents, load_documents
from worker.config.loading import RunSettings, load_run_settings
from worker.config.observability import ObservabilitySettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tagstream"
ALL_ON = ROOT / "ci" / "values-all-on.yaml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
RELEASE = "tagstream-test"
HELM_CACHE = Path.home() / ".cache" / "tagstream" / "bin" / "helm"
# helm template renders in well under a second; a minute only trips on a hung process.
HELM_TIMEOUT_S = 60

Manifest = dict[str, Any]

# The public environment interface of the worker (issue 4 and 5), HF_HOME, and the
# OpenTelemetry collector endpoint (tracing).
PUBLIC_ENV = {
    "TAGSTREAM_TRACING",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "TAGSTREAM_PROCESSING_GUARANTEE",
    "TAGSTREAM_TRANSACTION_TIMEOUT_MS",
    "TAGSTREAM_TRANSACTIONAL_ID",
    "TAGSTREAM_BOOTSTRAP_SERVERS",
    "TAGSTREAM_INPUT_TOPICS",
    "TAGSTREAM_OUTPUT_TOPIC",
    "TAGSTREAM_DLQ_TOPIC",
    "TAGSTREAM_GROUP_ID",
    "TAGSTREAM_MODEL",
    "TAGSTREAM_REVISION",
    "TAGSTREAM_SCORER",
    "TAGSTREAM_LABELS",
    "TAGSTREAM_MULTI_LABEL",
    "TAGSTREAM_THRESHOLD",
    "TAGSTREAM_HYPOTHESIS_TEMPLATE",
    "TAGSTREAM_CONTROL_TOPIC",
    "TAGSTREAM_MAX_BATCH_SIZE",
    "TAGSTREAM_MAX_WAIT_MS",
    "TAGSTREAM_MAX_BATCH_TOKENS",
    "TAGSTREAM_DEVICE",
    "TAGSTREAM_DTYPE",
    "TAGSTREAM_LONG_TEXT",
    "TAGSTREAM_CHUNK_TOKENS",
    "TAGSTREAM_CHUNK_OVERLAP_TOKENS",
    "TAGSTREAM_MAX_CHUNKS",
    "TAGSTREAM_CHUNK_AGGREGATION",
    "TAGSTREAM_METRICS_PORT",
    "TAGSTREAM_LOG_FORMAT",
    "TAGSTREAM_LOG_LEVEL",
    "TAGSTREAM_SHUTDOWN_TIMEOUT_S",
    "TAGSTREAM_SECURITY_PROTOCOL",
    "TAGSTREAM_SASL_MECHANISM",
    "TAGSTREAM_SASL_USERNAME",
    "TAGSTREAM_SASL_PASSWORD",
    "TAGSTREAM_SSL_CA_LOCATION",
    "TAGSTREAM_SSL_CERTIFICATE_LOCATION",
    "TAGSTREAM_SSL_KEY_LOCATION",
    "TAGSTREAM_SSL_KEY_PASSWORD",
    "HF_HOME",
}
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
)


# ------------------------------------------------------------------------------ helm
def helm_binary() -> str:
    """The helm to render with: $TAGSTREAM_HELM, the CI cache, or the PATH."""
    candidates = [os.environ.get("TAGSTREAM_HELM"), str(HELM_CACHE), shutil.which("helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "helm not found (looked at $TAGSTREAM_HELM, ~/.cache/tagstream/bin/helm and PATH): "
        "run `bash ci/validate-deploy.sh` first, which builds helm v3.22.0 into "
        "~/.cache/tagstream/bin"
    )


def helm_template(*args: str) -> subprocess.CompletedProcess[str]:
    command = [
        helm_binary(),
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        "tagstream",
        "--kube-version",
        DEFAULT_KUBE_VERSION,
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=HELM_TIMEOUT_S
    )


@cache
def _render_text(args: tuple[str, ...]) -> str:
    result = helm_template(*args)
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def render(*args: str) -> list[Manifest]:
    """The rendered manifests (fresh copies: tests may mutate them)."""
    return load_documents(_render_text(args))


NOTES_PROBE = """apiVersion: v1
kind: ConfigMap
metadata:
  name: notes
data:
  notes: {{ tpl (.Files.Get "NOTES.txt") . | quote }}
"""


def render_notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt as ``helm install`` would print it.

    ``helm template`` skips NOTES.txt and ``helm lint`` forgives its failures, so a copy of
    the chart renders it through ``tpl`` into a ConfigMap.
    """
    chart = tmp_path / "tagstream"
    shutil.copytree(CHART, chart)
    shutil.copy(CHART / "templates" / "NOTES.txt", chart / "NOTES.txt")
    (chart / "templates" / "notes-probe.yaml").write_text(NOTES_PROBE, encoding="utf-8")
    command = [helm_binary(), "template", RELEASE, str(chart), "--namespace", "tagstream"]
    command += ["--kube-version", DEFAULT_KUBE_VERSION, "--show-only"]
    command += ["templates/notes-probe.yaml", *args]
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, timeout=HELM_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr
    notes: str = yaml.safe_load(result.stdout)["data"]["notes"]
    return notes


def render_error(*args: str) -> str:
    result = helm_template(*args)
    assert result.returncode != 0, f"helm template {' '.join(args)} should have failed"
    return result.stderr


def one(docs: Sequence[Manifest], kind: str) -> Manifest:
    matches = [doc for doc in docs if doc["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


def kinds(docs: Sequence[Manifest]) -> set[str]:
    return {doc["kind"] for doc in docs}


def worker_container(docs: Sequence[Manifest]) -> Manifest:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["worker"]
    result: Manifest = containers[0]
    return result


def config(docs: Sequence[Manifest]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap")["data"]
    return data


def env_by_name(container: Manifest) -> dict[str, Manifest]:
    return {item["name"]: item for item in container.get("env", [])}


def volume(docs: Sequence[Manifest], name: str) -> Manifest:
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    matches = [item for item in volumes if item["name"] == name]
    assert len(matches) == 1, f"expected one volume {name}, got {len(matches)}"
    result: Manifest = matches[0]
    return result


def mount(docs: Sequence[Manifest], name: str) -> Manifest:
    matches = [item for item in worker_container(docs)["volumeMounts"] if item["name"] == name]
    assert len(matches) == 1, f"expected one mount of {name}, got {len(matches)}"
    result: Manifest = matches[0]
    return result


def sets(*assignments: str) -> tuple[str, ...]:
    return tuple(arg for assignment in assignments for arg in ("--set", assignment))


ALL_ON_ARGS = ("-f", str(ALL_ON))
TLS_SECRET = "tagstream-kafka-tls"
TLS_MOUNT = "/etc/tagstream/tls"
# Mutual TLS with an encrypted key; ci/values-all-on.yaml already speaks SASL_SSL.
MTLS_ARGS = sets(
    f"kafka.tls.existingSecret={TLS_SECRET}",
    "kafka.tls.certificateKey=tls.crt",
    "kafka.tls.keyKey=tls.key",
    "kafka.tls.keyPasswordKey=key-password",
)
# Server verification only: the CA under its default key.
TLS_BASE = ("kafka.securityProtocol=SSL", f"kafka.tls.existingSecret={TLS_SECRET}")
CA_ONLY_ARGS = sets(*TLS_BASE)
RENDERINGS = {"default": (), "all-on": ALL_ON_ARGS, "all-on-mtls": (*ALL_ON_ARGS, *MTLS_ARGS)}


@pytest.fixture(params=sorted(RENDERINGS))
def docs(request: pytest.FixtureRequest) -> list[Manifest]:
    """The chart rendered with the default values, with every optional resource on, and with
    mutual TLS on top of that."""
    return render(*RENDERINGS[request.param])


def test_default_render_has_the_core_resources_only() -> None:
    assert kinds(render()) == {
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    }


def test_all_on_values_turn_every_optional_resource_on() -> None:
    assert kinds(render(*ALL_ON_ARGS)) >= {
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
        "PrometheusRule",
        "PodDisruptionBudget",
    }
    assert "HorizontalPodAutoscaler" in kinds(render(*ALL_ON_ARGS, "--set", "autoscaling.kind=hpa"))


def test_the_prometheus_rule_carries_the_compose_alerts_untemplated() -> None:
    rule = one(render(*sets("metrics.prometheusRule.enabled=true")), "PrometheusRule")
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]
    # Prometheus' own templates reach it as written, not rendered (or broken) by helm.
    summaries = [r["annotations"]["summary"] for r in rule["spec"]["groups"][0]["rules"]]
    assert any("{{ $labels.instance }}" in summary for summary in summaries)
    assert "PrometheusRule" not in kinds(render())


def test_notes_describe_the_release(tmp_path: Path) -> None:
    plain = render_notes(tmp_path / "plain")
    assert "Replicas: 1 (fixed; the group uses at most 6, one per partition)" in plain
    assert "port-forward svc/tagstream-test 9400:9400" in plain
    keda = render_notes(tmp_path / "keda", *ALL_ON_ARGS)
    assert "KEDA scales 1..8 replicas on the group's lag (500 messages per replica)" in keda
    assert 'Secret "tagstream-kafka-credentials" (keys user, pass)' in keda
    hpa = render_notes(tmp_path / "hpa", *ALL_ON_ARGS, "--set", "autoscaling.kind=hpa")
    assert "a HorizontalPodAutoscaler scales 1..8 replicas" in hpa
    crowded = render_notes(tmp_path / "crowded", "--set", "replicaCount=9")
    assert "WARNING: replicaCount (9) exceeds kafka.partitions (6)" in crowded


def test_grace_period_exceeds_the_worker_shutdown_timeout(docs: list[Manifest]) -> None:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    shutdown_timeout = int(config(docs)["TAGSTREAM_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > shutdown_timeout


@pytest.mark.parametrize(
    "overrides",
    [
        ("terminationGracePeriodSeconds=30",),
        ("shutdownTimeoutSeconds=90", "terminationGracePeriodSeconds=60"),
    ],
)
def test_a_grace_period_not_above_the_shutdown_timeout_is_refused(
    overrides: tuple[str, ...],
) -> None:
    args = [arg for override in overrides for arg in ("--set", override)]
    assert "must be larger than shutdownTimeoutSeconds" in render_error(*args)


def test_probes_hit_healthz_and_readyz_on_the_metrics_port(docs: list[Manifest]) -> None:
    container = worker_container(docs)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # /healthz passes while the model loads, so only /readyz can bound start-up.
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics"
    assert ports["metrics"] == int(config(docs)["TAGSTREAM_METRICS_PORT"])
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_runs_as_non_root_with_a_read_only_root_filesystem(docs: list[Manifest]) -> None:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = worker_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The only writable paths are volumes: the model cache (HF_HOME) and /tmp.
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {config(docs)["HF_HOME"], "/tmp"}


def test_keda_scales_on_the_group_lag_up_to_the_partition_count() -> None:
    docs = render(*ALL_ON_ARGS)
    spec = one(docs, "ScaledObject")["spec"]
    settings = config(docs)
    assert spec["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert spec["maxReplicaCount"] == 8
    assert spec["maxReplicaCount"] <= 12  # kafka.partitions in ci/values-all-on.yaml
    topics = [trigger["metadata"]["topic"] for trigger in spec["triggers"]]
    assert ",".join(topics) == settings["TAGSTREAM_INPUT_TOPICS"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["consumerGroup"] == settings["TAGSTREAM_GROUP_ID"]
        assert trigger["metadata"]["bootstrapServers"] == settings["TAGSTREAM_BOOTSTRAP_SERVERS"]
        assert trigger["metadata"]["allowIdleConsumers"] == "false"


def test_max_replica_count_defaults_to_the_partition_count() -> None:
    docs = render("--set", "autoscaling.enabled=true", "--set", "kafka.partitions=4")
    assert one(docs, "ScaledObject")["spec"]["maxReplicaCount"] == 4
    # The autoscaler owns the replica count.
    assert "replicas" not in one(docs, "Deployment")["spec"]


def test_more_replicas_than_partitions_is_refused() -> None:
    error = render_error("--set", "autoscaling.enabled=true", "--set", "autoscaling.maxReplicas=7")
    assert "exceeds kafka.partitions (6)" in error


def test_hpa_is_the_alternative_to_keda() -> None:
    docs = render(*ALL_ON_ARGS, "--set", "autoscaling.kind=hpa")
    assert "ScaledObject" not in kinds(docs)
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["maxReplicas"] == 8
    assert hpa["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]


def test_sasl_credentials_come_from_the_existing_secret_only() -> None:
    docs = render(*ALL_ON_ARGS)
    env = {item["name"]: item for item in worker_container(docs)["env"]}
    for variable, key in (("TAGSTREAM_SASL_USERNAME", "user"), ("TAGSTREAM_SASL_PASSWORD", "pass")):
        assert env[variable]["valueFrom"]["secretKeyRef"] == {
            "name": "tagstream-kafka-credentials",
            "key": key,
        }
        assert "value" not in env[variable]
    assert config(docs)["TAGSTREAM_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert not any("PASSWORD" in name or "USERNAME" in name for name in config(docs))
    auth = one(docs, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert {ref["name"] for ref in auth} == {"tagstream-kafka-credentials"}
    # The chart never creates a Secret: credentials are the operator's, not the chart's.
    assert "Secret" not in kinds(docs)


def test_no_sasl_env_without_a_mechanism() -> None:
    names = {item["name"] for item in worker_container(render()).get("env", [])}
    assert not names & {"TAGSTREAM_SASL_USERNAME", "TAGSTREAM_SASL_PASSWORD"}


def test_a_sasl_mechanism_without_a_secret_is_refused() -> None:
    error = render_error("--set", "kafka.sasl.mechanism=PLAIN")
    assert "kafka.sasl.existingSecret is required" in error


def test_a_sasl_mechanism_without_a_sasl_protocol_is_refused() -> None:
    # The worker would refuse this combination at start-up; the chart refuses it earlier.
    error = render_error(
        "--set", "kafka.sasl.mechanism=PLAIN", "--set", "kafka.sasl.existingSecret=creds"
    )
    assert "needs kafka.securityProtocol SASL_PLAINTEXT or SASL_SSL" in error


def test_tls_files_are_mounted_read_only_from_the_existing_secret() -> None:
    docs = render(*ALL_ON_ARGS, *MTLS_ARGS)
    assert mount(docs, "kafka-tls") == {
        "name": "kafka-tls",
        "mountPath": TLS_MOUNT,
        "readOnly": True,
    }
    secret = volume(docs, "kafka-tls")["secret"]
    assert secret["secretName"] == TLS_SECRET
    assert secret["defaultMode"] == 0o440
    # Only the files the worker reads: the key password is not mounted.
    assert secret["items"] == [
        {"key": "ca.crt", "path": "ca.crt"},
        {"key": "tls.crt", "path": "tls.crt"},
        {"key": "tls.key", "path": "tls.key"},
    ]
    assert "Secret" not in kinds(docs)


@pytest.mark.parametrize(("mode", "expected"), [("0400", 0o400), ("0440", 0o440)])
def test_the_tls_file_mode_is_0400_or_0440(mode: str, expected: int) -> None:
    docs = render(*CA_ONLY_ARGS, "--set", f"kafka.tls.defaultMode={mode}")
    assert volume(docs, "kafka-tls")["secret"]["defaultMode"] == expected
    assert "defaultMode" in render_error(*CA_ONLY_ARGS, "--set", "kafka.tls.defaultMode=0644")


def test_tls_locations_point_into_the_mount() -> None:
    docs = render(*ALL_ON_ARGS, *MTLS_ARGS)
    settings = config(docs)
    expected = {
        "TAGSTREAM_SSL_CA_LOCATION": "ca.crt",
        "TAGSTREAM_SSL_CERTIFICATE_LOCATION": "tls.crt",
        "TAGSTREAM_SSL_KEY_LOCATION": "tls.key",
    }
    mounted = {item["path"] for item in volume(docs, "kafka-tls")["secret"]["items"]}
    for variable, file_name in expected.items():
        location = PurePosixPath(settings[variable])
        assert location == PurePosixPath(mount(docs, "kafka-tls")["mountPath"]) / file_name
        assert location.name in mounted, f"{variable} names a file the volume does not hold"


def test_tls_key_password_comes_from_a_secret_key_ref_only() -> None:
    docs = render(*ALL_ON_ARGS, *MTLS_ARGS)
    password = env_by_name(worker_container(docs))["TAGSTREAM_SSL_KEY_PASSWORD"]
    assert password == {
        "name": "TAGSTREAM_SSL_KEY_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": TLS_SECRET, "key": "key-password"}},
    }
    assert "TAGSTREAM_SSL_KEY_PASSWORD" not in config(docs)
    assert not any("key-password" in str(value) for value in config(docs).values())


def test_ca_only_tls_verifies_the_brokers_without_a_client_certificate() -> None:
    docs = render(*CA_ONLY_ARGS)
    settings = config(docs)
    assert settings["TAGSTREAM_SSL_CA_LOCATION"] == f"{TLS_MOUNT}/ca.crt"
    assert not {"TAGSTREAM_SSL_CERTIFICATE_LOCATION", "TAGSTREAM_SSL_KEY_LOCATION"} & set(settings)
    assert "TAGSTREAM_SSL_KEY_PASSWORD" not in env_by_name(worker_container(docs))
    assert volume(docs, "kafka-tls")["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


def test_the_worker_holds_the_tls_key_password_as_a_secret_str(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = render(*ALL_ON_ARGS, *MTLS_ARGS)
    env = dict(config(docs))
    env["TAGSTREAM_SASL_USERNAME"] = env["TAGSTREAM_SASL_PASSWORD"] = "from-the-secret"
    env["TAGSTREAM_SSL_KEY_PASSWORD"] = "key-password-from-the-secret"
    run, _ = worker_settings(env, monkeypatch)
    assert run.kafka.ssl_ca_location == f"{TLS_MOUNT}/ca.crt"
    assert run.kafka.ssl_certificate_location == f"{TLS_MOUNT}/tls.crt"
    assert run.kafka.ssl_key_location == f"{TLS_MOUNT}/tls.key"
    assert isinstance(run.kafka.ssl_key_password, SecretStr)
    assert run.kafka.ssl_key_password.get_secret_value() == "key-password-from-the-secret"
    assert "key-password-from-the-secret" not in repr(run.kafka)


def test_keda_reads_the_tls_files_from_the_same_secret() -> None:
    docs = render(*ALL_ON_ARGS, *MTLS_ARGS)
    refs = one(docs, "TriggerAuthentication")["spec"]["secretTargetRef"]
    tls_refs = {ref["parameter"]: ref for ref in refs if ref["name"] == TLS_SECRET}
    assert {parameter: ref["key"] for parameter, ref in tls_refs.items()} == {
        "ca": "ca.crt",
        "cert": "tls.crt",
        "key": "tls.key",
        "keyPassword": "key-password",
    }
    # TLS without SASL still needs the TriggerAuthentication for the CA.
    ca_only = render(*CA_ONLY_ARGS, "--set", "autoscaling.enabled=true")
    auth = one(ca_only, "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "ca", "name": TLS_SECRET, "key": "ca.crt"}
    ]
    for trigger in one(ca_only, "ScaledObject")["spec"]["triggers"]:
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert trigger["metadata"]["tls"] == "enable"


@pytest.mark.parametrize(
    ("assignments", "message"),
    [
        pytest.param(
            (f"kafka.tls.existingSecret={TLS_SECRET}",),
            "kafka.tls.existingSecret needs kafka.securityProtocol SSL or SASL_SSL, not PLAINTEXT",
            id="plaintext",
        ),
        pytest.param(
            ("kafka.securityProtocol=SASL_PLAINTEXT", f"kafka.tls.existingSecret={TLS_SECRET}"),
            "needs kafka.securityProtocol SSL or SASL_SSL, not SASL_PLAINTEXT",
            id="sasl-plaintext",
        ),
        pytest.param(
            (*TLS_BASE, "kafka.tls.certificateKey=tls.crt"),
            "kafka.tls.certificateKey needs kafka.tls.keyKey",
            id="certificate-without-key",
        ),
        pytest.param(
            (*TLS_BASE, "kafka.tls.keyKey=tls.key"),
            "kafka.tls.keyKey needs kafka.tls.certificateKey",
            id="key-without-certificate",
        ),
        pytest.param(
            (*TLS_BASE, "kafka.tls.keyPasswordKey=key-password"),
            "kafka.tls.keyPasswordKey needs kafka.tls.keyKey",
            id="password-without-key",
        ),
        pytest.param(
            (*TLS_BASE, "kafka.tls.caKey="),
            "kafka.tls.existingSecret is set but names no file",
            id="no-file",
        ),
        pytest.param(
            (*TLS_BASE, "kafka.tls.certificateKey=ca.crt", "kafka.tls.keyKey=tls.key"),
            "must name different keys of the Secret",
            id="same-key-twice",
        ),
        pytest.param(
            ("kafka.tls.certificateKey=tls.crt", "kafka.tls.keyKey=tls.key"),
            "need kafka.tls.existingSecret",
            id="files-without-secret",
        ),
        pytest.param(
            (*TLS_BASE, "kafka.tls.mountPath=/tmp"),
            "kafka.tls.mountPath (/tmp) would hide another volume",
            id="mount-over-tmp",
        ),
        pytest.param(
            (*TLS_BASE, "podSecurityContext.fsGroup=null"),
            "kafka.tls.existingSecret needs podSecurityContext.fsGroup",
            id="no-fs-group",
        ),
        pytest.param(
            (*TLS_BASE, "config.TAGSTREAM_SSL_CA_LOCATION=/elsewhere/ca.crt"),
            "config sets TAGSTREAM_SSL_CA_LOCATION, which kafka.tls sets",
            id="config-overrides-location",
        ),
    ],
)
def test_an_unusable_tls_combination_is_refused(assignments: tuple[str, ...], message: str) -> None:
    assert message in render_error(*sets(*assignments))


@pytest.mark.parametrize("name", ["TAGSTREAM_SSL_KEY_PASSWORD", "TAGSTREAM_SASL_PASSWORD"])
def test_a_password_in_the_config_map_is_refused(name: str) -> None:
    error = render_error("--set", f"config.{name}=hunter2")
    assert f"config.{name} would put a password into the ConfigMap" in error


def test_notes_name_the_tls_secret(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, *ALL_ON_ARGS, *MTLS_ARGS)
    assert f'TLS files come from Secret "{TLS_SECRET}", mounted read-only at {TLS_MOUNT}' in notes
    assert "(ca.crt, tls.crt, tls.key; key password from key key-password)" in notes


def test_every_resource_has_the_standard_labels(docs: list[Manifest]) -> None:
    for doc in docs:
        labels = doc["metadata"]["labels"]
        for label in STANDARD_LABELS:
            assert labels.get(label), f"{doc['kind']} lacks {label}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/name"] == "tagstream"


def test_selectors_match_the_pod_labels(docs: list[Manifest]) -> None:
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        one(docs, "Service")["spec"]["selector"],
        one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    selectors += [
        constraint["labelSelector"]["matchLabels"]
        for constraint in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    ]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()


def test_the_config_map_speaks_the_public_environment_interface(docs: list[Manifest]) -> None:
    extra = {"TAGSTREAM_COMMIT_INTERVAL_MS"}  # ci/values-all-on.yaml's free-form `config`
    assert set(config(docs)) <= PUBLIC_ENV | extra
    container = worker_container(docs)
    assert {"configMapRef": {"name": one(docs, "ConfigMap")["metadata"]["name"]}} in container[
        "envFrom"
    ]


def worker_settings(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> tuple[RunSettings, ObservabilitySettings]:
    """What the worker makes of exactly this environment (its own validation, not a copy)."""
    for name in list(os.environ):
        if name.startswith("TAGSTREAM_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_run_settings(), ObservabilitySettings()


def test_tracing_values_reach_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    default = config(render())
    assert not {"TAGSTREAM_TRACING", "OTEL_EXPORTER_OTLP_ENDPOINT"} & set(default)
    endpoint = "http://otel-collector.observability:4318"
    env = config(render(*sets("tracing.enabled=true", f"tracing.otlpEndpoint={endpoint}")))
    assert env["TAGSTREAM_TRACING"] == "true"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == endpoint
    run, _ = worker_settings(dict(env), monkeypatch)
    assert run.tracing.enabled(env)
    # The endpoint alone turns tracing on as well (the worker reads the variable).
    only_endpoint = config(render(*sets(f"tracing.otlpEndpoint={endpoint}")))
    assert "TAGSTREAM_TRACING" not in only_endpoint
    run, _ = worker_settings(dict(only_endpoint), monkeypatch)
    assert run.tracing.enabled(only_endpoint)


def test_a_tracing_endpoint_that_is_not_a_url_is_refused() -> None:
    assert "otlpEndpoint" in render_error(*sets("tracing.otlpEndpoint=collector:4318"))


def test_the_worker_accepts_the_chart_settings(
    docs: list[Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = dict(config(docs))
    secret_env = [item["name"] for item in worker_container(docs)["env"] if "valueFrom" in item]
    env.update({name: "from-the-secret" for name in secret_env if name.startswith("TAGSTREAM_")})
    run, observability = worker_settings(env, monkeypatch)
    assert run.kafka.input_topics == env["TAGSTREAM_INPUT_TOPICS"].split(",")
    assert run.kafka.group_id == env["TAGSTREAM_GROUP_ID"]
    assert run.shutdown.shutdown_timeout_s == float(env["TAGSTREAM_SHUTDOWN_TIMEOUT_S"])
    assert observability.metrics_port == int(env["TAGSTREAM_METRICS_PORT"])


def test_the_control_topic_is_set_only_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "TAGSTREAM_CONTROL_TOPIC" not in config(render())
    env = config(render("--set", "tagging.controlTopic=tagstream.profiles"))
    assert env["TAGSTREAM_CONTROL_TOPIC"] == "tagstream.profiles"
    run, _ = worker_settings(env, monkeypatch)
    assert run.profiles.control_topic == "tagstream.profiles"
    assert "controlTopic" in render_error("--set", "tagging.controlTopic=not a topic")


def test_the_gpu_is_requested_and_limited() -> None:
    resources = worker_container(render())["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["limits"]["nvidia.com/gpu"] == 1
    cpu_only = worker_container(render("--set", "gpu.count=0"))["resources"]
    assert "nvidia.com/gpu" not in cpu_only["requests"]
    assert "nvidia.com/gpu" not in cpu_only.get("limits", {})


def test_the_values_schema_rejects_unknown_and_invalid_values() -> None:
    assert "partitionz" in render_error("--set", "kafka.partitionz=3")
    assert "securityProtocol" in render_error("--set", "kafka.securityProtocol=TLS")


def test_rendered_manifests_pass_offline_validation(docs: list[Manifest]) -> None:
    assert check_documents(docs, DEFAULT_KUBE_VERSION) == []


def test_offline_validation_catches_a_broken_custom_resource() -> None:
    docs = render(*ALL_ON_ARGS)
    scaled_object = one(docs, "ScaledObject")
    del scaled_object["spec"]["maxReplicaCount"]
    del one(docs, "ServiceMonitor")["spec"]["endpoints"]
    one(docs, "Deployment")["spec"]["template"]["spec"]["bogus"] = True
    problems = "\n".join(check_documents(docs, DEFAULT_KUBE_VERSION))
    assert "'maxReplicaCount' is a required property" in problems
    assert "'endpoints' is a required property" in problems
    assert "'bogus' was unexpected" in problems


def _value_paths(values: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted paths of every key in values.yaml, leaves and inner mappings alike."""
    paths: set[str] = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if isinstance(value, dict) and value:
            paths |= _value_paths(value, f"{path}.")
    return paths


def test_the_chart_readme_documents_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    paths = _value_paths(values)
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))
    assert documented <= paths, f"README documents unknown values: {documented - paths}"
    leaves = {p for p in paths if not any(q.startswith(f"{p}.") for q in paths)}
    undocumented = {
        leaf
        for leaf in leaves
        if not any(leaf == doc or leaf.startswith(f"{doc}.") for doc in documented)
    }
    assert not undocumented, f"values missing from the README table: {sorted(undocumented)}"


# ---------------------------------------------------------------------------- compose
_DEFAULT = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+):-(?P<default>[^}]*)\}$")


def resolve(value: Any) -> str:
    """A compose value with ``${NAME:-default}`` replaced by its default."""
    text = str(value)
    match = _DEFAULT.match(text)
    return match["default"] if match else text


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def services(compose: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = compose["services"]
    return result


def test_compose_has_the_stack_services(compose: dict[str, Any]) -> None:
    assert set(services(compose)) == {
        "kafka",
        "init-topics",
        "worker",
        "worker-gpu",
        "producer",
        "prometheus",
        "grafana",
    }


def test_compose_kafka_is_official_single_node_kraft_with_a_healthcheck(
    compose: dict[str, Any],
) -> None:
    kafka = services(compose)["kafka"]
    assert resolve(kafka["image"]).startswith("apache/kafka:4.")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])


def test_compose_workers_start_after_kafka_is_healthy_and_topics_exist(
    compose: dict[str, Any],
) -> None:
    expected = {
        "kafka": {"condition": "service_healthy"},
        "init-topics": {"condition": "service_completed_successfully"},
    }
    for name in ("worker", "worker-gpu", "producer"):
        assert services(compose)[name]["depends_on"] == expected, name
    assert services(compose)["init-topics"]["depends_on"] == {
        "kafka": {"condition": "service_healthy"}
    }


def test_compose_profiles(compose: dict[str, Any]) -> None:
    profiles = {name: svc.get("profiles", []) for name, svc in services(compose).items()}
    assert profiles == {
        "kafka": [],
        "init-topics": [],
        "worker": [],
        "producer": [],
        "worker-gpu": ["gpu"],
        "prometheus": ["monitoring"],
        "grafana": ["monitoring"],
    }


def test_compose_gpu_worker_reserves_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    gpu = services(compose)["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["build"]["args"]["BASE"] == "cuda"
    assert gpu["environment"]["TAGSTREAM_DEVICE"] == "cuda"
    assert services(compose)["worker"]["build"]["args"]["BASE"] == "cpu"


def test_compose_topics_agree_across_services(compose: dict[str, Any]) -> None:
    svc = services(compose)
    env = svc["worker"]["environment"]
    init_env = svc["init-topics"]["environment"]
    assert resolve(env["TAGSTREAM_INPUT_TOPICS"]) == resolve(init_env["INPUT_TOPIC"])
    assert resolve(env["TAGSTREAM_OUTPUT_TOPIC"]) == resolve(init_env["OUTPUT_TOPIC"])
    assert resolve(env["TAGSTREAM_DLQ_TOPIC"]) == resolve(init_env["DLQ_TOPIC"])
    script = svc["init-topics"]["command"][0]
    for variable in ("INPUT_TOPIC", "OUTPUT_TOPIC", "DLQ_TOPIC"):
        assert f'create "$${variable}"' in script
    producer = [resolve(arg) for arg in svc["producer"]["command"]]
    assert producer[0] == "produce"
    assert producer[producer.index("--topic") + 1] == resolve(env["TAGSTREAM_INPUT_TOPICS"])


def test_compose_worker_env_uses_public_names_and_drains_before_kill(
    compose: dict[str, Any],
) -> None:
    worker = services(compose)["worker"]
    env = worker["environment"]
    tagstream_names = {name for name in env if name.startswith("TAGSTREAM_")}
    assert tagstream_names <= PUBLIC_ENV
    grace = int(worker["stop_grace_period"].removesuffix("s"))
    assert grace > int(env["TAGSTREAM_SHUTDOWN_TIMEOUT_S"])
    assert "/var/cache/tagstream/hf" in {v.split(":")[1] for v in worker["volumes"]}
    assert worker["read_only"] is True


@pytest.mark.parametrize("service", ["worker", "worker-gpu"])
def test_the_worker_accepts_the_compose_settings(
    compose: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        name: resolve(value) for name, value in services(compose)[service]["environment"].items()
    }
    run, observability = worker_settings(env, monkeypatch)
    assert run.kafka.bootstrap_servers == "kafka:9092"
    assert run.kafka.dead_letter_topic == env["TAGSTREAM_DLQ_TOPIC"]
    assert run.model.scorer == env["TAGSTREAM_SCORER"]
    assert observability.metrics_port == 9400


def test_compose_prometheus_scrapes_the_workers(compose: dict[str, Any]) -> None:
    config_path = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    scrape = yaml.safe_load(config_path.read_text(encoding="utf-8"))["scrape_configs"]
    job = next(job for job in scrape if job["job_name"] == "tagstream")
    discovery = job["dns_sd_configs"][0]
    assert set(discovery["names"]) == {"worker", "worker-gpu"}
    worker_env = services(compose)["worker"]["environment"]
    assert discovery["port"] == int(worker_env["TAGSTREAM_METRICS_PORT"])
    assert job["metrics_path"] == "/metrics"


def test_compose_grafana_gets_the_prometheus_source_and_the_dashboard(
    compose: dict[str, Any],
) -> None:
    mounts = dict(volume.split(":")[:2] for volume in services(compose)["grafana"]["volumes"])
    by_target = {target: ROOT / source for source, target in mounts.items()}
    datasources_file = by_target["/etc/grafana/provisioning/datasources/tagstream.yml"]
    source = yaml.safe_load(datasources_file.read_text(encoding="utf-8"))["datasources"][0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    dashboard_target = next(t for t in by_target if t.endswith("tagstream-dashboard.json"))
    providers_dir = by_target["/etc/grafana/provisioning/dashboards"]
    provider_paths = {
        provider["options"]["path"]
        for provider_file in sorted(providers_dir.glob("*.y*ml"))
        for provider in yaml.safe_load(provider_file.read_text(encoding="utf-8"))["providers"]
    }
    assert str(Path(dashboard_target).parent) in provider_paths


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, svc in services(compose).items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


# ------------------------------------------------------------------------- Dockerfile
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line.removesuffix("\\").strip() + " "
        if line.endswith("\\"):
            continue
        keyword, _, args = pending.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def arg_defaults(instructions: Sequence[tuple[str, str]]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name] = value
    return defaults


def test_dockerfile_is_multi_stage_with_a_cpu_or_cuda_base() -> None:
    instructions = dockerfile_instructions()
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert arg_defaults(instructions)["BASE"] == "cpu"
    assert "${PYTHON_IMAGE} AS base-cpu" in froms
    assert "${CUDA_IMAGE} AS base-cuda" in froms
    assert "base-${BASE} AS builder" in froms
    assert froms[-1] == "base-${BASE} AS runtime"
    assert arg_defaults(instructions)["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert "-runtime-" in arg_defaults(instructions)["CUDA_IMAGE"]


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    stage = final_stage()
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users, "the runtime stage sets no USER"
    user = users[-1]
    for name, value in arg_defaults(stage).items():
        user = user.replace(f"${{{name}}}", value)
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER {user!r}: numeric, so Kubernetes can verify runAsNonRoot"
    assert int(uid) != 0


def test_dockerfile_healthcheck_entrypoint_and_model_cache_volume() -> None:
    stage = dict(final_stage())
    assert "/healthz" in stage["HEALTHCHECK"]
    assert "urllib.request" in stage["HEALTHCHECK"]
    assert "curl" not in stage["HEALTHCHECK"]
    assert stage["ENTRYPOINT"] == '["tagstream"]'
    assert stage["CMD"] == '["run"]'
    hf_home = re.search(r"HF_HOME=(\S+)", stage["ENV"])
    assert hf_home is not None
    assert hf_home[1] in stage["VOLUME"]


def test_dockerfile_bakes_in_no_secrets() -> None:
    secret = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|SASL|API_KEY", re.IGNORECASE)
    for keyword, args in dockerfile_instructions():
        if keyword in {"ENV", "ARG", "LABEL"}:
            names = re.findall(r"([A-Za-z_][\w.]*)=", args) or [args.split("=")[0]]
            assert not [name for name in names if secret.search(name)], f"{keyword} {args}"


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "worker"}
    copied = [args.split()[0] for keyword, args in dockerfile_instructions() if keyword == "COPY"]
    sources = {source for source in copied if not source.startswith("--")}
    assert sources <= allowed
