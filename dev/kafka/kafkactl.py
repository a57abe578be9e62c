#!/usr/bin/env python3
"""Run a real single-node Apache Kafka broker (KRaft) from Maven Central jars, without Docker.

    python3 dev/kafka/kafkactl.py up|down|restart|status|logs [--port N] [--controller-port N]
                                                              [--data-dir DIR] [--secure]
                                                              [--secure-port N]

``up`` resolves the jars once into ``~/.cache/tagstream/kafka-<version>/`` (Maven), formats
storage with a fresh cluster id on first start, starts ``kafka.Kafka`` in the background and
returns only when the broker answers a real Metadata request. ``down`` stops it through its
pid file (SIGTERM, then SIGKILL). ``restart`` keeps the data directory.

Settings come from flags, else ``TAGSTREAM_KAFKA_PORT``, ``TAGSTREAM_KAFKA_CONTROLLER_PORT``,
``TAGSTREAM_KAFKA_DATA_DIR``, ``TAGSTREAM_KAFKA_HEAP``, else the defaults below. Standard library
only, so it runs before the project's virtual environment exists.

Secured mode: ``up --secure`` (or ``TAGSTREAM_KAFKA_SECURE=1``) adds a ``SASL_SSL`` listener on
``--secure-port`` (``TAGSTREAM_KAFKA_SECURE_PORT``, default 19094) next to the PLAINTEXT one,
which the readiness probe, inter-broker and controller traffic keep using. At the first secure
start ``openssl`` makes a throwaway CA and a broker certificate for 127.0.0.1/localhost under
``DATA_DIR/tls/`` (the CA's key is deleted once it has signed), and storage is formatted with a
SCRAM-SHA-512 user ``tagstream`` whose random password is written, with everything else a
client needs, to ``DATA_DIR/client.env`` (mode 0600; ``TAGSTREAM_*`` lines the worker reads:
``set -a; . DATA_DIR/client.env; set +a``). The CA certificate is ``DATA_DIR/tls/ca.pem``.
``up`` then also waits for a TLS handshake on the secure port that verifies against that CA.
SCRAM users exist only from format time on, so a data directory first formatted without
``--secure`` is refused; ``restart`` and ``down`` need the same flags as ``up``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from string import Template

HERE = Path(__file__).resolve().parent
# Away from 9092/9093 so a broker a developer already runs keeps its ports.
DEFAULT_PORT = 19092
DEFAULT_CONTROLLER_PORT = 19093
# A test broker needs little memory; 512 MiB leaves room for the model on a small machine.
DEFAULT_HEAP = "512m"
# A cold JVM start on a loaded 2-core machine takes ~10 s; 90 s only trips on a real failure.
START_TIMEOUT_S = 90.0
# Kafka flushes and closes its logs on SIGTERM; a clean stop takes a few seconds.
STOP_TIMEOUT_S = 30.0
# Poll the broker this often while waiting for it to answer.
PROBE_INTERVAL_S = 0.25
# One Metadata round trip on loopback; a slow answer just means "not ready yet".
PROBE_SOCKET_TIMEOUT_S = 2.0
# Metadata v4..v8 use the non-flexible encoding parsed below; Kafka 4.x still serves v4.
METADATA_API_KEY = 3
METADATA_VERSION = 4
EXIT_MISSING_TOOL = 3
# Next to the default broker and controller ports, and equally away from the usual 9094.
DEFAULT_SECURE_PORT = 19094
SECURE_LISTENER = "SASL_SSL"
SCRAM_MECHANISM = "SCRAM-SHA-512"
SASL_USERNAME = "tagstream"
# 128 random bits as hex: strong, and no character that --add-scram's parser reads as syntax.
PASSWORD_BYTES = 16
# A data directory in ~/.cache may serve a developer for months; a year keeps it trusted.
CERT_VALIDITY_DAYS = 365
# 2048-bit RSA: accepted by Java, OpenSSL and librdkafka alike, and made in well under a second.
RSA_KEY_BITS = "rsa:2048"
# openssl makes the CA and certificate in well under a second; a minute only trips on a hang.
OPENSSL_TIMEOUT_S = 60.0
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


class KafkaCtlError(RuntimeError):
    """A failure to report to the user (printed without a traceback)."""


@dataclass(frozen=True)
class BrokerConfig:
    """Where one local broker listens and keeps its data."""

    port: int
    controller_port: int
    data_dir: Path
    heap: str = DEFAULT_HEAP
    # The SASL_SSL listener's port; None: no secured listener (the default).
    secure_port: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def secure(self) -> bool:
        return self.secure_port is not None

    @property
    def secure_bootstrap(self) -> str:
        return f"127.0.0.1:{self.secure_port}"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def keystore_file(self) -> Path:
        return self.tls_dir / "broker-keystore.pem"

    @property
    def client_env_file(self) -> Path:
        return self.data_dir / "client.env"

    @property
    def log_dirs(self) -> Path:
        return self.data_dir / "logs"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "kafka.pid"

    @property
    def properties_file(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def server_log(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def stdout_log(self) -> Path:
        return self.data_dir / "kafka.out"


def kafka_version(pom: Path = HERE / "pom.xml") -> str:
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    if match is None:
        raise KafkaCtlError(f"no <kafka.version> in {pom}")
    return match.group(1)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tagstream"


def default_data_dir(port: int) -> Path:
    return cache_root() / "run" / f"kafka-{port}"


def render_properties(
    config: BrokerConfig,
    template: Path = HERE / "server.properties.template",
    offsets_partitions: int = 1,
    secure_template: Path = HERE / "secure.properties.template",
) -> str:
    """Fill the server.properties template for ``config`` (pure: unit-tested); a secure
    config gets the SASL_SSL listener and the secure template's settings appended."""
    secure = config.secure
    text = Template(template.read_text()).substitute(
        port=config.port,
        controller_port=config.controller_port,
        log_dirs=config.log_dirs,
        offsets_partitions=offsets_partitions,
        secure_listener=f",{SECURE_LISTENER}://{config.secure_bootstrap}" if secure else "",
        secure_protocol=f",{SECURE_LISTENER}:{SECURE_LISTENER}" if secure else "",
    )
    if not secure:
        return text
    return text + Template(secure_template.read_text()).substitute(
        mechanism=SCRAM_MECHANISM,
        mechanism_lower=SCRAM_MECHANISM.lower(),
        keystore=config.keystore_file,
        ca_file=config.ca_file,
    )


def scram_argument(username: str, password: str) -> str:
    """The ``--add-scram`` value that creates one SCRAM user at format time."""
    if not all(re.fullmatch(r"[A-Za-z0-9_-]+", part) for part in (username, password)):
        # The parser splits on ',', '=' and brackets; keep both to characters it cannot misread.
        raise KafkaCtlError("SCRAM user names and passwords must be [A-Za-z0-9_-]")
    return f"{SCRAM_MECHANISM}=[name={username},password={password}]"


def render_client_env(config: BrokerConfig, username: str, password: str) -> str:
    """What a client needs to reach the secured listener, as the worker's ``TAGSTREAM_*``
    variables (one ``KEY=VALUE`` a line, shell-sourceable)."""
    settings = {
        "TAGSTREAM_BOOTSTRAP_SERVERS": config.secure_bootstrap,
        "TAGSTREAM_SECURITY_PROTOCOL": SECURE_LISTENER,
        "TAGSTREAM_SASL_MECHANISM": SCRAM_MECHANISM,
        "TAGSTREAM_SASL_USERNAME": username,
        "TAGSTREAM_SASL_PASSWORD": password,
        "TAGSTREAM_SSL_CA_LOCATION": str(config.ca_file),
    }
    header = "# Written by kafkactl.py up --secure: the SASL_SSL listener's client settings.\n"
    return header + "".join(f"{key}={value}\n" for key, value in settings.items())


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (created so, never widened)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID, base64url without padding (22 chars).

    Ids starting with '-' are drawn again: StorageTool's argument parser would read one as
    an option (about 1 id in 64).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


# --- the Kafka wire protocol, just enough for one Metadata request --------------------------


def _metadata_request(correlation_id: int) -> bytes:
    client_id = b"kafkactl"
    header = struct.pack(
        ">hhih", METADATA_API_KEY, METADATA_VERSION, correlation_id, len(client_id)
    )
    body = struct.pack(">i?", -1, False)  # topics = null (all), allow_auto_topic_creation
    payload = header + client_id + body
    return struct.pack(">i", len(payload)) + payload


def _read_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.extend(chunk)
    return bytes(chunks)


def parse_metadata_brokers(response: bytes) -> list[tuple[int, str, int]]:
    """Brokers (node id, host, port) from a Metadata v4 response body after the correlation id."""
    offset = 4  # throttle_time_ms
    (count,) = struct.unpack_from(">i", response, offset)
    offset += 4
    brokers = []
    for _ in range(count):
        node_id, host_len = struct.unpack_from(">ih", response, offset)
        offset += 6
        host = response[offset : offset + host_len].decode()
        offset += host_len
        (port, rack_len) = struct.unpack_from(">ih", response, offset)
        offset += 6 + max(rack_len, 0)
        brokers.append((node_id, host, port))
    return brokers


def probe_metadata(
    bootstrap: str, timeout: float = PROBE_SOCKET_TIMEOUT_S
) -> list[tuple[int, str, int]]:
    """Send a real Metadata request; return the brokers it lists (raises when unreachable)."""
    host, _, port = bootstrap.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(_metadata_request(correlation_id=1))
        (size,) = struct.unpack(">i", _read_exact(sock, 4))
        response = _read_exact(sock, size)
    (correlation_id,) = struct.unpack_from(">i", response, 0)
    if correlation_id != 1:
        raise ConnectionError("unexpected correlation id")
    return parse_metadata_brokers(response[4:])


def broker_answers(bootstrap: str) -> bool:
    try:
        return len(probe_metadata(bootstrap)) > 0
    except (OSError, struct.error, UnicodeDecodeError):
        return False


def tls_error(bootstrap: str, ca_file: Path, timeout: float = PROBE_SOCKET_TIMEOUT_S) -> str | None:
    """None when a TLS handshake with ``bootstrap`` verifies against ``ca_file`` (host name
    included), else why not. The SASL_SSL listener opens with the others; this proves its
    certificate is the one clients will be told to trust."""
    host, _, port = bootstrap.rpartition(":")
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            return None
    except OSError as exc:  # ssl.SSLError and certificate errors included
        return str(exc) or type(exc).__name__


# --- jars, storage, process -----------------------------------------------------------------


def require_tools(*names: str) -> None:
    hints = {
        "java": "a JDK 17 or newer (Debian: apt-get install openjdk-17-jdk-headless)",
        "mvn": "Apache Maven (Debian: apt-get install maven)",
        "openssl": "OpenSSL, for --secure (Debian: apt-get install openssl)",
    }
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        lines = [f"kafkactl: '{name}' not found on PATH; install {hints[name]}" for name in missing]
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(EXIT_MISSING_TOOL)


def jar_dir() -> Path:
    """Resolve the broker's jars once per pom.xml content into the cache; return the folder."""
    pom = HERE / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    target = cache_root() / f"kafka-{kafka_version()}" / digest
    marker = target / ".complete"
    if marker.exists():
        return target
    require_tools("mvn")
    print(f"kafkactl: resolving Kafka {kafka_version()} jars from Maven Central into {target}")
    target.mkdir(parents=True, exist_ok=True)
    command = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={target}",
    ]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise KafkaCtlError("mvn could not resolve the Kafka jars (see its output above)")
    marker.write_text(digest + "\n")
    return target


def java_command(config: BrokerConfig, jars: Path, main: str, *args: str) -> list[str]:
    return [
        "java",
        f"-Xms{config.heap}",
        f"-Xmx{config.heap}",
        "-XX:+UseG1GC",
        "-XX:TieredStopAtLevel=1",  # C1 only: faster start, plenty for a test broker
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={HERE / 'log4j2.xml'}",
        f"-Dkafka.logs.dir={config.data_dir}",
        "-cp",
        f"{jars}/*",
        main,
        *args,
    ]


def is_formatted(config: BrokerConfig) -> bool:
    return (config.log_dirs / "meta.properties").exists()


def format_command(config: BrokerConfig, jars: Path, scram: str | None = None) -> list[str]:
    """``StorageTool format`` with a fresh cluster id; ``scram``: an ``--add-scram`` value."""
    extra = ["--add-scram", scram] if scram is not None else []
    return java_command(
        config,
        jars,
        "kafka.tools.StorageTool",
        "format",
        "--standalone",
        "-t",
        new_cluster_id(),
        "-c",
        str(config.properties_file),
        *extra,
    )


def format_storage(config: BrokerConfig, jars: Path) -> None:
    """Format the log dir with a fresh cluster id, unless it is formatted already (restart).

    Secure: the SCRAM user is created here, the only time ``--add-scram`` can; its password
    goes to ``client.env`` first, so a failed format leaves nothing formatted without it.
    """
    if is_formatted(config):
        return
    scram = None
    if config.secure:
        password = secrets.token_hex(PASSWORD_BYTES)
        scram = scram_argument(SASL_USERNAME, password)
        _write_private(config.client_env_file, render_client_env(config, SASL_USERNAME, password))
    result = subprocess.run(
        format_command(config, jars, scram), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise KafkaCtlError(f"storage format failed:\n{result.stdout}{result.stderr}")


# --- the throwaway CA and broker certificate (--secure) -------------------------------------


def certificate_commands(tls_dir: Path, serial: int) -> list[list[str]]:
    """The openssl calls that make ``ca.pem`` and a broker key and certificate signed by it
    (SAN 127.0.0.1 and localhost: librdkafka checks the host name by default)."""
    days = str(CERT_VALIDITY_DAYS)
    return [
        # The CA: self-signed, allowed to sign certificates and nothing else.
        ["openssl", "req", "-x509", "-newkey", RSA_KEY_BITS, "-nodes", "-sha256",
         "-keyout", str(tls_dir / "ca.key"), "-out", str(tls_dir / "ca.pem"), "-days", days,
         "-subj", "/CN=tagstream kafkactl throwaway CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        # The broker's key (unencrypted PKCS#8, which Kafka's PEM keystore reads) and request.
        ["openssl", "req", "-newkey", RSA_KEY_BITS, "-nodes", "-sha256",
         "-keyout", str(tls_dir / "broker.key"), "-out", str(tls_dir / "broker.csr"),
         "-subj", "/CN=localhost"],
        ["openssl", "x509", "-req", "-sha256", "-in", str(tls_dir / "broker.csr"),
         "-CA", str(tls_dir / "ca.pem"), "-CAkey", str(tls_dir / "ca.key"),
         "-set_serial", str(serial), "-days", days,
         "-extfile", str(tls_dir / "broker.ext"), "-out", str(tls_dir / "broker.crt")],
    ]  # fmt: skip


BROKER_EXTENSIONS = """\
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
"""


def make_certificates(config: BrokerConfig) -> None:
    """Make the CA and the broker's PEM keystore once per data directory (kept on restart,
    so that running clients keep trusting the broker). The CA's key is deleted after it
    signed the broker certificate: nothing else can ever be signed by this CA."""
    if config.ca_file.exists() and config.keystore_file.exists():
        return
    require_tools("openssl")
    tls_dir = config.tls_dir
    shutil.rmtree(tls_dir, ignore_errors=True)
    tls_dir.mkdir(parents=True, mode=0o700)
    (tls_dir / "broker.ext").write_text(BROKER_EXTENSIONS)
    # A random serial: a browser-style trust store that kept an older CA sees a new pair.
    serial = secrets.randbits(63)
    for command in certificate_commands(tls_dir, serial):
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=OPENSSL_TIMEOUT_S
        )
        if result.returncode != 0:
            raise KafkaCtlError(f"{' '.join(command[:2])} failed:\n{result.stderr}")
    key = (tls_dir / "broker.key").read_text()
    _write_private(config.keystore_file, key + (tls_dir / "broker.crt").read_text())
    for name in ("ca.key", "broker.key", "broker.csr", "broker.ext"):
        (tls_dir / name).unlink()


def read_pid(config: BrokerConfig) -> int | None:
    try:
        pid = int(config.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


def ready(config: BrokerConfig) -> tuple[bool, str | None]:
    """Whether the broker answers (and, secure, its TLS listener verifies); why not, if known."""
    if not broker_answers(config.bootstrap):
        return False, None
    if not config.secure:
        return True, None
    error = tls_error(config.secure_bootstrap, config.ca_file)
    return error is None, error


def wait_until_ready(config: BrokerConfig, pid: int, started: float) -> None:
    why: str | None = None
    while time.monotonic() - started < START_TIMEOUT_S:
        answering, why = ready(config)
        if answering:
            return
        if read_pid(config) != pid:
            raise KafkaCtlError(
                f"broker exited during start-up; last lines of {config.stdout_log} and "
                f"{config.server_log}:\n{tail(config.stdout_log)}\n{tail(config.server_log)}"
            )
        time.sleep(PROBE_INTERVAL_S)
    reason = f" (TLS on {config.secure_bootstrap}: {why})" if why else ""
    raise KafkaCtlError(
        f"broker did not answer within {START_TIMEOUT_S:.0f}s{reason}:\n{tail(config.server_log)}"
    )


def up(config: BrokerConfig) -> None:
    started = time.monotonic()
    pid = read_pid(config)
    if pid is not None:
        if ready(config)[0]:
            print(f"kafkactl: broker already running (pid {pid}) on {config.bootstrap}")
            _print_secure(config)
            return
        wait_until_ready(config, pid, started)
        print(f"kafkactl: broker running (pid {pid}) on {config.bootstrap}")
        _print_secure(config)
        return
    require_tools("java")
    jars = jar_dir()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    if config.secure:
        if is_formatted(config) and not config.client_env_file.exists():
            raise KafkaCtlError(
                f"{config.data_dir} was formatted without --secure, and SCRAM users can only "
                "be created at format time; use a fresh --data-dir"
            )
        make_certificates(config)
    config.properties_file.write_text(render_properties(config))
    format_storage(config, jars)
    command = java_command(config, jars, "kafka.Kafka", str(config.properties_file))
    with config.stdout_log.open("ab") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    config.pid_file.write_text(f"{process.pid}\n")
    wait_until_ready(config, process.pid, started)
    elapsed = time.monotonic() - started
    print(
        f"kafkactl: Kafka {kafka_version()} up on {config.bootstrap} "
        f"(pid {process.pid}, data {config.data_dir}) in {elapsed:.1f}s"
    )
    _print_secure(config)


def _print_secure(config: BrokerConfig) -> None:
    if config.secure:
        print(
            f"kafkactl: {SECURE_LISTENER} ({SCRAM_MECHANISM}, user {SASL_USERNAME}) on "
            f"{config.secure_bootstrap}; CA {config.ca_file}; "
            f"client settings in {config.client_env_file}"
        )


def down(config: BrokerConfig) -> None:
    pid = read_pid(config)
    if pid is None:
        config.pid_file.unlink(missing_ok=True)
        print("kafkactl: no broker running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and read_pid(config) == pid:
        _reap(pid)
        time.sleep(PROBE_INTERVAL_S)
    if read_pid(config) == pid:
        print(f"kafkactl: broker did not stop in {STOP_TIMEOUT_S:.0f}s, sending SIGKILL")
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
    config.pid_file.unlink(missing_ok=True)
    print(f"kafkactl: broker stopped (pid {pid})")


def _reap(pid: int) -> None:
    """Collect the exit status when the broker is our own child (tests start it that way)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def status(config: BrokerConfig) -> int:
    pid = read_pid(config)
    answering = ready(config)[0]
    state = "running" if pid is not None else "stopped"
    secure = f" sasl_ssl={config.secure_bootstrap}" if config.secure else ""
    print(
        f"kafkactl: {state} pid={pid} bootstrap={config.bootstrap}{secure} "
        f"answering={'yes' if answering else 'no'} data={config.data_dir}"
    )
    return 0 if pid is not None and answering else 1


def config_from(args: argparse.Namespace) -> BrokerConfig:
    env = os.environ
    port = args.port or int(env.get("TAGSTREAM_KAFKA_PORT", DEFAULT_PORT))
    controller_port = args.controller_port or int(
        env.get("TAGSTREAM_KAFKA_CONTROLLER_PORT", DEFAULT_CONTROLLER_PORT)
    )
    data_dir = args.data_dir or env.get("TAGSTREAM_KAFKA_DATA_DIR") or default_data_dir(port)
    heap = env.get("TAGSTREAM_KAFKA_HEAP", DEFAULT_HEAP)
    if port == controller_port:
        raise KafkaCtlError("--port and --controller-port must differ")
    secure_port = _secure_port(args, env)
    if secure_port in (port, controller_port):
        raise KafkaCtlError("--secure-port must differ from --port and --controller-port")
    return BrokerConfig(
        port=port,
        controller_port=controller_port,
        data_dir=Path(data_dir).resolve(),
        heap=heap,
        secure_port=secure_port,
    )


def _secure_port(args: argparse.Namespace, env: os._Environ[str]) -> int | None:
    """The SASL_SSL port when secured mode is asked for (``--secure``, ``--secure-port``,
    ``TAGSTREAM_KAFKA_SECURE``), else None."""
    port = getattr(args, "secure_port", None) or env.get("TAGSTREAM_KAFKA_SECURE_PORT")
    wanted = getattr(args, "secure", False) or port is not None
    if not wanted and env.get("TAGSTREAM_KAFKA_SECURE", "").strip().lower() in TRUE_WORDS:
        wanted = True
    if not wanted:
        return None
    return int(port) if port else DEFAULT_SECURE_PORT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["up", "down", "restart", "status", "logs"])
    parser.add_argument("--port", type=int, help=f"broker port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--controller-port",
        type=int,
        help=f"KRaft controller port (default {DEFAULT_CONTROLLER_PORT})",
    )
    parser.add_argument(
        "--data-dir", help="data directory (default ~/.cache/tagstream/run/kafka-PORT)"
    )
    parser.add_argument(
        "--secure",
        action="store_true",
        help=f"add a {SECURE_LISTENER} listener with {SCRAM_MECHANISM} users (see above)",
    )
    parser.add_argument(
        "--secure-port",
        type=int,
        help=f"{SECURE_LISTENER} listener port; implies --secure (default {DEFAULT_SECURE_PORT})",
    )
    parser.add_argument("--lines", type=int, default=100, help="lines shown by 'logs'")
    args = parser.parse_args(argv)
    try:
        config = config_from(args)
        if args.action == "up":
            up(config)
        elif args.action == "down":
            down(config)
        elif args.action == "restart":
            down(config)
            up(config)
        elif args.action == "status":
            return status(config)
        else:
            print(tail(config.server_log, args.lines))
    except KafkaCtlError as exc:
        print(f"kafkactl: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
