"""Apache Kafka 4 (KRaft) as a plain JVM process: one node, broker and controller, data on disk.

``data_dir`` holds the broker's configuration, its log (``broker.log``) and its data: a broker
restarted on the same folder keeps its topics and committed offsets. Without one, a temporary
folder is used and removed at ``stop``. The jars come from ``distribution``. A ``SaslSslListener``
adds a listener that wants TLS and a SCRAM login (the tests of secured Kafka).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.kafka.broker import distribution
from shared.kafka.broker.base import BrokerError, EmbeddedBroker, free_port

NODE_ID = 1
LOG_FILE = "broker.log"
# Sized for a 2-core, 24 GiB machine that may run a suite and a benchmark at once: Kafka keeps
# its data in the page cache, not on the heap. KAFKA_HEAP_OPTS overrides it, as in Kafka's scripts.
DEFAULT_HEAP = "-Xms256m -Xmx1g"
JVM_OPTIONS = (
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)
LOG4J2 = """\
Configuration:
  Appenders:
    File:
      name: file
      fileName: "{log}"
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: file
    Logger:
      - name: org.apache.kafka.clients
        level: WARN
      - name: kafka.utils.Log4jControllerRegistration$
        level: WARN
"""


def new_cluster_id() -> str:
    """A Kafka Uuid in its base64url form, as ``kafka-storage random-uuid`` prints it."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka's own rule: it would read as a command-line flag
            return text


@dataclass(frozen=True)
class SaslSslListener:
    """A SASL_SSL listener beside PLAINTEXT (which brokers, the controller and our start probe
    keep using). Its users get SCRAM credentials when the data folder is formatted."""

    # One PEM file: the server's encrypted PKCS#8 private key, then its certificate chain
    # (Kafka's PEM key store by file location wants the key encrypted).
    keystore_pem: Path
    key_password: str
    users: Mapping[str, str] = field(default_factory=dict)  # name: password
    mechanisms: tuple[str, ...] = ("SCRAM-SHA-512", "SCRAM-SHA-256")

    def properties(self) -> dict[str, str]:
        jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return {
            "sasl.enabled.mechanisms": ",".join(self.mechanisms),
            **{
                f"listener.name.sasl_ssl.{mechanism.lower()}.sasl.jaas.config": jaas
                for mechanism in self.mechanisms
            },
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.keystore_pem),
            "ssl.key.password": self.key_password,
        }

    def format_arguments(self) -> list[str]:
        """``kafka-storage format`` arguments that create every user for every mechanism."""
        return [
            argument
            for mechanism in self.mechanisms
            for name, password in self.users.items()
            for argument in ("--add-scram", f"{mechanism}=[name={name},password={password}]")
        ]


def server_properties(
    port: int,
    controller_port: int,
    data: Path,
    host: str,
    sasl_ssl: tuple[SaslSslListener, int] | None = None,
) -> str:
    listeners = f"PLAINTEXT://{host}:{port}"
    protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    if sasl_ssl is not None:
        listeners += f",SASL_SSL://{host}:{sasl_ssl[1]}"
        protocols += ",SASL_SSL:SASL_SSL"
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        "listeners": f"{listeners},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": listeners,
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": protocols,
        "inter.broker.listener.name": "PLAINTEXT",
        # A static quorum of one: the controller's port may differ at each start.
        "controller.quorum.voters": f"{NODE_ID}@{host}:{controller_port}",
        "log.dirs": str(data),
        # One node: every internal topic has one replica.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # A new group's first assignment without the 3 s wait for more members.
        "group.initial.rebalance.delay.ms": "0",
        # Tests replace a vanished member within seconds (sessions of 3 s; Kafka's floor is 6 s).
        "group.min.session.timeout.ms": "1000",
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "log.segment.bytes": str(256 * 1024 * 1024),
    }
    if sasl_ssl is not None:
        settings.update(sasl_ssl[0].properties())
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def answering_cluster(host: str, port: int, timeout_s: float = 1.0) -> str | None:
    """The cluster id a Metadata (v4, no topics) round trip names, or None without an answer.

    Serving clients, not merely listening; and the cluster id tells our broker from another one
    that holds the port.
    """
    client = b"smsbridge-probe"
    request = struct.pack(">hhih", 3, 4, 1, len(client)) + client + struct.pack(">ib", 0, 0)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            head = _read_exactly(sock, 4)
            body = _read_exactly(sock, struct.unpack(">i", head)[0])
        # correlation id, throttle time, brokers [node id, host, port, rack], cluster id
        correlation, _throttle, brokers = struct.unpack_from(">iii", body)
        offset = 12
        for _ in range(brokers):
            offset += 4
            offset += 2 + struct.unpack_from(">h", body, offset)[0] + 4
            offset += 2 + max(0, struct.unpack_from(">h", body, offset)[0])
        (length,) = struct.unpack_from(">h", body, offset)
    except (OSError, struct.error):
        return None
    if correlation != 1 or brokers < 1 or length < 0:
        return None
    return body[offset + 2 : offset + 2 + length].decode("utf-8", "replace")


def _cluster_id(data: Path) -> str:
    for line in (data / "meta.properties").read_text("utf-8").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "cluster.id":
            return value.strip()
    raise BrokerError(f"{data / 'meta.properties'} names no cluster.id")


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return bytes(data)


class ApacheKafkaBroker(EmbeddedBroker):
    kind = "kafka"
    persistent = True

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        data_dir: Path | None = None,
        sasl_ssl: SaslSslListener | None = None,
    ) -> None:
        super().__init__(port, host)
        self._temporary = data_dir is None
        self.root = (
            Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="smsbridge-kafka-"))
        )
        self.sasl_ssl = sasl_ssl
        self.sasl_ssl_port = free_port(host) if sasl_ssl is not None else None

    @property
    def sasl_ssl_bootstrap_servers(self) -> str:
        if self.sasl_ssl_port is None:
            raise BrokerError("this broker has no SASL_SSL listener")
        return f"{self.host}:{self.sasl_ssl_port}"

    @property
    def log_path(self) -> Path:
        return self.root / LOG_FILE

    def start(self, timeout_s: float = 60.0) -> None:
        reason = distribution.unavailable_reason()
        if reason is not None:
            raise BrokerError(f"Apache Kafka cannot run here: {reason}")
        self.root.mkdir(parents=True, exist_ok=True)
        data = self.root / "data"
        config = self.root / "server.properties"
        secure = (
            (self.sasl_ssl, self.sasl_ssl_port)
            if self.sasl_ssl is not None and self.sasl_ssl_port is not None
            else None
        )
        config.write_text(
            server_properties(self.port, free_port(self.host), data, self.host, secure)
        )
        log4j = self.root / "log4j2.yaml"
        log4j.write_text(LOG4J2.format(log=self.log_path))
        jvm = (
            *os.environ.get("KAFKA_HEAP_OPTS", DEFAULT_HEAP).split(),
            *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={log4j}",
        )
        if not (data / "meta.properties").exists():
            self._format(config, jvm)
        cluster_id = _cluster_id(data)
        with (self.root / "stdout.log").open("ab") as stdout:
            self._process = subprocess.Popen(
                distribution.java_command("kafka.Kafka", str(config), jvm_options=jvm),
                stdout=stdout,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in `smsbridge dev` reaches it through stop()
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BrokerError(f"Apache Kafka exited with code {code}\n{self.log_tail()}")
            if answering_cluster(self.host, self.port) == cluster_id:
                return
            time.sleep(0.1)
        self.stop()
        raise BrokerError(
            f"Apache Kafka did not answer on {self.bootstrap_servers} in {timeout_s:g}s\n"
            f"{self.log_tail()}"
        )

    def _format(self, config: Path, jvm: tuple[str, ...]) -> None:
        command = distribution.java_command(
            distribution.TOOLS["kafka-storage"],
            "format",
            "--cluster-id",
            new_cluster_id(),
            "--config",
            str(config),
            *(self.sasl_ssl.format_arguments() if self.sasl_ssl is not None else ()),
            jvm_options=jvm,
        )
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise BrokerError(f"formatting {self.root} failed: {completed.stderr.strip()[-2000:]}")

    def log_tail(self, lines: int = 30) -> str:
        """Why it failed: the broker log's errors and its end (and the end of its stdout)."""
        parts = []
        for path in (self.log_path, self.root / "stdout.log"):
            if path.exists():
                logged = path.read_text("utf-8", "replace").splitlines()
                # The shutdown after an error pushes it out of the tail: its first errors, each
                # with the line after it (the exception), come first.
                errors = [
                    f"{line}\n{logged[index + 1] if index + 1 < len(logged) else ''}"
                    for index, line in enumerate(logged[:-lines])
                    if " ERROR " in line or " FATAL " in line
                ]
                parts.append(f"--- {path} ---\n" + "\n".join([*errors[:5], *logged[-lines:]]))
        return "\n".join(parts)

    def close(self) -> None:
        """Stop, and remove a temporary data folder."""
        self.stop()
        if self._temporary:
            shutil.rmtree(self.root, ignore_errors=True)
