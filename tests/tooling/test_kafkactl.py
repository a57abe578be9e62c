"""Unit tests of the local broker script: config rendering, ids, protocol parsing, errors."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

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


# -- secured mode (up --secure) ---------------------------------------------------------------


def _secure(kafkactl: ModuleType, tmp_path: Path) -> Any:
    return kafkactl.BrokerConfig(
        port=23001, controller_port=23002, data_dir=tmp_path, secure_port=23003
    )


def test_plain_rendering_has_no_secured_listener(kafkactl: ModuleType, tmp_path: Path) -> None:
    config = kafkactl.BrokerConfig(port=23001, controller_port=23002, data_dir=tmp_path)
    props = _properties(kafkactl.render_properties(config))
    assert not config.secure
    settings = [f"{key}={value}".lower() for key, value in props.items()]
    assert not [line for line in settings if "sasl" in line or "ssl" in line]
    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"


def test_secure_rendering_adds_a_sasl_ssl_listener(kafkactl: ModuleType, tmp_path: Path) -> None:
    text = kafkactl.render_properties(_secure(kafkactl, tmp_path))
    props = _properties(text)
    assert "$" not in text
    assert props["listeners"] == (
        "PLAINTEXT://127.0.0.1:23001,CONTROLLER://127.0.0.1:23002,SASL_SSL://127.0.0.1:23003"
    )
    assert props["advertised.listeners"] == (
        "PLAINTEXT://127.0.0.1:23001,SASL_SSL://127.0.0.1:23003"
    )
    assert props["listener.security.protocol.map"] == (
        "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL"
    )
    # The probe, inter-broker and controller traffic stay on PLAINTEXT.
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["listener.name.sasl_ssl.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    jaas = props["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"]
    assert jaas == "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    assert props["listener.name.sasl_ssl.ssl.keystore.type"] == "PEM"
    keystore = props["listener.name.sasl_ssl.ssl.keystore.location"]
    assert keystore == str(tmp_path / "tls" / "broker-keystore.pem")
    assert not any("password" in key for key in props)


def test_scram_users_are_added_in_storage_tool_syntax(kafkactl: ModuleType) -> None:
    assert kafkactl.scram_argument("tagstream", "ab12") == (
        "SCRAM-SHA-512=[name=tagstream,password=ab12]"
    )
    for user, password in (("a,b", "x"), ("a", "x]"), ("a", "p=w"), ("a", "")):
        with pytest.raises(kafkactl.KafkaCtlError, match="SCRAM"):
            kafkactl.scram_argument(user, password)


def test_secure_format_creates_the_user_and_writes_client_env_first(
    kafkactl: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = _secure(kafkactl, tmp_path)
    calls: list[tuple[list[str], bool]] = []

    def run(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append((command, config.client_env_file.exists()))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(kafkactl.subprocess, "run", run)
    kafkactl.format_storage(config, tmp_path / "jars")

    [(command, env_written_before)] = calls
    assert env_written_before
    assert config.client_env_file.stat().st_mode & 0o777 == 0o600
    env = dict(
        line.split("=", 1)
        for line in config.client_env_file.read_text().splitlines()
        if not line.startswith("#")
    )
    assert env["TAGSTREAM_BOOTSTRAP_SERVERS"] == "127.0.0.1:23003"
    assert env["TAGSTREAM_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["TAGSTREAM_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["TAGSTREAM_SASL_USERNAME"] == "tagstream"
    assert env["TAGSTREAM_SSL_CA_LOCATION"] == str(tmp_path / "tls" / "ca.pem")
    password = env["TAGSTREAM_SASL_PASSWORD"]
    assert len(password) == 2 * kafkactl.PASSWORD_BYTES
    scram = command[command.index("--add-scram") + 1]
    assert scram == f"SCRAM-SHA-512=[name=tagstream,password={password}]"


def test_plain_format_adds_no_scram_user(kafkactl: ModuleType, tmp_path: Path) -> None:
    config = kafkactl.BrokerConfig(port=23001, controller_port=23002, data_dir=tmp_path)
    assert "--add-scram" not in kafkactl.format_command(config, tmp_path)


def test_secure_start_on_a_plainly_formatted_data_dir_is_refused(
    kafkactl: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(kafkactl, "require_tools", lambda *names: None)
    monkeypatch.setattr(kafkactl, "jar_dir", lambda: tmp_path / "jars")
    config = _secure(kafkactl, tmp_path)
    config.log_dirs.mkdir(parents=True)
    (config.log_dirs / "meta.properties").write_text("cluster.id=x\n")
    with pytest.raises(kafkactl.KafkaCtlError, match="formatted without --secure"):
        kafkactl.up(config)


def test_secured_mode_comes_from_flags_then_env(
    kafkactl: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import argparse

    def config(**flags: Any) -> Any:
        base = {"port": 1, "controller_port": 2, "data_dir": str(tmp_path)}
        return kafkactl.config_from(argparse.Namespace(**{**base, **flags}))

    monkeypatch.delenv("TAGSTREAM_KAFKA_SECURE", raising=False)
    monkeypatch.delenv("TAGSTREAM_KAFKA_SECURE_PORT", raising=False)
    assert config().secure_port is None
    assert config(secure=True).secure_port == kafkactl.DEFAULT_SECURE_PORT
    assert config(secure=False, secure_port=3).secure_port == 3
    monkeypatch.setenv("TAGSTREAM_KAFKA_SECURE", "1")
    assert config(secure=False, secure_port=None).secure_port == kafkactl.DEFAULT_SECURE_PORT
    monkeypatch.setenv("TAGSTREAM_KAFKA_SECURE_PORT", "4")
    assert config().secure_port == 4
    with pytest.raises(kafkactl.KafkaCtlError, match="--secure-port must differ"):
        config(secure_port=2)


def _serve_tls(keystore: Path, connections: int) -> int:
    """A TLS server on a free port presenting ``keystore`` for ``connections`` handshakes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(keystore)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener:
            for _ in range(connections):
                conn, _ = listener.accept()
                with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_throwaway_ca_signs_a_broker_certificate_clients_verify(
    kafkactl: ModuleType, tmp_path: Path
) -> None:
    config = _secure(kafkactl, tmp_path / "a")
    config.data_dir.mkdir()
    kafkactl.make_certificates(config)
    names = sorted(path.name for path in config.tls_dir.iterdir())
    assert names == ["broker-keystore.pem", "broker.crt", "ca.pem"]  # the CA key is gone
    assert config.keystore_file.stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" in config.keystore_file.read_text()
    assert "PRIVATE KEY" not in config.ca_file.read_text()
    before = config.ca_file.read_bytes()
    kafkactl.make_certificates(config)  # a restart keeps the CA clients already trust
    assert config.ca_file.read_bytes() == before

    other = _secure(kafkactl, tmp_path / "b")
    other.data_dir.mkdir()
    kafkactl.make_certificates(other)
    port = _serve_tls(config.keystore_file, connections=3)
    assert kafkactl.tls_error(f"127.0.0.1:{port}", config.ca_file) is None
    assert kafkactl.tls_error(f"localhost:{port}", config.ca_file) is None
    mistrusted = kafkactl.tls_error(f"127.0.0.1:{port}", other.ca_file)
    assert mistrusted is not None and "certificate verify failed" in mistrusted


def test_status_of_a_stopped_secure_broker_names_its_listener(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "status",
            "--port",
            "29995",
            "--controller-port",
            "29996",
            "--secure-port",
            "29997",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "sasl_ssl=127.0.0.1:29997" in result.stdout
