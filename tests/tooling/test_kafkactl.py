"""Unit tests of the local broker script: config rendering, ids, protocol parsing, errors."""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "dev" / "kafka" / "kafkactl.py"


@pytest.fixture(scope="module")
def kafkactl() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kafkactl", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kafkactl"] = module
    spec.loader.exec_module(module)
    return module


def _properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def test_rendered_properties_are_single_node_kraft(kafkactl: ModuleType, tmp_path: Path) -> None:
    config = kafkactl.BrokerConfig(port=23001, controller_port=23002, data_dir=tmp_path)
    props = _properties(kafkactl.render_properties(config))
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:23001,CONTROLLER://127.0.0.1:23002"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:23001"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:23002"
    assert props["log.dirs"] == str(tmp_path / "logs")
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
    ):
        assert props[key] == "1", key
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert "$" not in kafkactl.render_properties(config)


def test_defaults_avoid_the_usual_kafka_ports(kafkactl: ModuleType) -> None:
    assert kafkactl.DEFAULT_PORT not in (9092, 9093)
    assert kafkactl.DEFAULT_CONTROLLER_PORT not in (9092, 9093)


def test_settings_come_from_flags_then_env(
    kafkactl: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import argparse

    monkeypatch.setenv("TAGSTREAM_KAFKA_PORT", "24001")
    monkeypatch.setenv("TAGSTREAM_KAFKA_CONTROLLER_PORT", "24002")
    monkeypatch.setenv("TAGSTREAM_KAFKA_DATA_DIR", str(tmp_path / "env"))
    from_env = kafkactl.config_from(
        argparse.Namespace(port=None, controller_port=None, data_dir=None)
    )
    assert (from_env.port, from_env.controller_port) == (24001, 24002)
    assert from_env.data_dir == (tmp_path / "env").resolve()
    from_flags = kafkactl.config_from(
        argparse.Namespace(port=25001, controller_port=25002, data_dir=str(tmp_path / "f"))
    )
    assert (from_flags.port, from_flags.controller_port) == (25001, 25002)
    assert from_flags.data_dir == (tmp_path / "f").resolve()


def test_same_broker_and_controller_port_is_refused(kafkactl: ModuleType) -> None:
    import argparse

    with pytest.raises(kafkactl.KafkaCtlError, match="must differ"):
        kafkactl.config_from(argparse.Namespace(port=1, controller_port=1, data_dir="/tmp/x"))


def test_cluster_ids_never_look_like_an_option(
    kafkactl: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    # b"\xf8..." encodes to an id starting with '-'; the next draw is a normal one.
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(kafkactl.uuid, "uuid4", lambda: next(draws))
    assert not kafkactl.new_cluster_id().startswith("-")


def test_cluster_ids_are_fresh_base64url_uuids(kafkactl: ModuleType) -> None:
    import base64

    first, second = kafkactl.new_cluster_id(), kafkactl.new_cluster_id()
    assert first != second
    assert len(first) == 22
    assert len(base64.urlsafe_b64decode(first + "==")) == 16


def test_metadata_request_is_a_framed_v4_request(kafkactl: ModuleType) -> None:
    frame = kafkactl._metadata_request(correlation_id=7)
    (size,) = struct.unpack_from(">i", frame, 0)
    assert size == len(frame) - 4
    api_key, version, correlation = struct.unpack_from(">hhi", frame, 4)
    assert (api_key, version, correlation) == (3, 4, 7)


def test_metadata_response_brokers_are_parsed(kafkactl: ModuleType) -> None:
    def broker(node: int, host: str, port: int, rack: str | None) -> bytes:
        encoded = struct.pack(">ih", node, len(host)) + host.encode() + struct.pack(">i", port)
        if rack is None:
            return encoded + struct.pack(">h", -1)
        return encoded + struct.pack(">h", len(rack)) + rack.encode()

    body = struct.pack(">ii", 0, 2) + broker(1, "127.0.0.1", 19092, None) + broker(2, "h", 9, "r1")
    assert kafkactl.parse_metadata_brokers(body) == [(1, "127.0.0.1", 19092), (2, "h", 9)]


def test_nothing_listening_is_not_ready(kafkactl: ModuleType) -> None:
    from tests.support.kafka_fixtures import free_port

    assert kafkactl.broker_answers(f"127.0.0.1:{free_port()}") is False


def test_missing_java_names_what_to_install(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "up",
            "--port",
            "29991",
            "--controller-port",
            "29992",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert result.returncode != 0
    assert "'java' not found" in result.stderr
    assert "JDK 17" in result.stderr


def test_status_of_a_stopped_broker_is_non_zero(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "status",
            "--port",
            "29993",
            "--controller-port",
            "29994",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "stopped" in result.stdout
