"""Apache Kafka's jars: pinned in ``deploy/kafka/pom.xml``, copied by Maven into a cache folder.

Nothing is downloaded from anywhere but Maven Central (through the local Maven's settings). The
cache is ``.smsbridge/kafka-dist/<version>/libs`` beside the checkout, or ``$SMSBRIDGE_KAFKA_LIBS``
for jars placed elsewhere (an image that ships them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from shared.kafka.broker.base import BrokerError

REPO_ROOT = Path(__file__).resolve().parents[3]
POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
LIBS_ENV = "SMSBRIDGE_KAFKA_LIBS"
MIN_JAVA = 17
# The operator tools we run, by the name of their script in Apache Kafka's bin/ folder.
TOOLS = {
    "kafka-storage": "kafka.tools.StorageTool",
    "kafka-consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "kafka-topics": "org.apache.kafka.tools.TopicCommand",
    "kafka-configs": "org.apache.kafka.tools.ConfigCommand",
}
# The tools that connect to brokers as clients, so take ``--command-config``.
CLIENT_TOOLS = frozenset({"kafka-consumer-groups", "kafka-topics", "kafka-configs"})


def kafka_version() -> str:
    """The pinned version: ``<kafka.version>`` of the pom."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text("utf-8"))
    if match is None:
        raise BrokerError(f"{POM}: no <kafka.version>")
    return match.group(1).strip()


def libs_dir() -> Path:
    if configured := os.environ.get(LIBS_ENV):
        return Path(configured)
    return REPO_ROOT / ".smsbridge" / "kafka-dist" / kafka_version() / "libs"


def _complete(libs: Path) -> bool:
    return any(libs.glob("kafka_2.13-*.jar")) and any(libs.glob("kafka-tools-*.jar"))


@cache
def java_major(java: str = "java") -> int | None:
    """The major version of ``java`` on PATH, or None when there is none."""
    if shutil.which(java) is None:
        return None
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        ).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def fetch_jars(libs: Path | None = None) -> Path:
    """Copy the pinned jars into ``libs`` with Maven; a no-op when they are there already."""
    target = libs or libs_dir()
    if _complete(target):
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("Maven (mvn) is not installed, so Apache Kafka's jars cannot be fetched")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Into a fresh folder, then renamed: an interrupted fetch never passes for a complete one.
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=target.parent))
    command = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies"]
    completed = subprocess.run(
        [*command, f"-DoutputDirectory={staging}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0 or not _complete(staging):
        shutil.rmtree(staging, ignore_errors=True)
        tail = (completed.stdout + completed.stderr).strip().splitlines()[-15:]
        raise BrokerError("fetching Apache Kafka's jars failed:\n" + "\n".join(tail))
    if _complete(target):  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    else:
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def unavailable_reason(*, fetch: bool = True) -> str | None:
    """Why Apache Kafka cannot run here, or None when it can (fetching its jars if allowed)."""
    major = java_major()
    if major is None:
        return "Java is not installed (Apache Kafka needs Java 17 or later)"
    if major < MIN_JAVA:
        return f"Java {major} is too old (Apache Kafka needs Java {MIN_JAVA} or later)"
    if _complete(libs_dir()):
        return None
    if not fetch:
        return f"Apache Kafka's jars are not in {libs_dir()}"
    try:
        fetch_jars()
    except BrokerError as exc:
        return str(exc)
    return None


def java_command(main_class: str, *args: str, jvm_options: tuple[str, ...] = ()) -> list[str]:
    classpath = str(libs_dir() / "*")
    return ["java", *jvm_options, "-cp", classpath, main_class, *args]


def run_tool(
    tool: str,
    *args: str,
    timeout_s: float = 120.0,
    client_properties: Mapping[str, str] | None = None,
) -> str:
    """Run one of Apache Kafka's command-line tools; its standard output, or BrokerError.

    ``client_properties`` (TLS and SASL, ``security.java_client_properties``) reach a client tool
    as a ``--command-config`` file readable by us alone, unless the caller names one.
    """
    with tempfile.TemporaryDirectory(prefix="smsbridge-tool-") as folder:
        if client_properties and tool in CLIENT_TOOLS and "--command-config" not in args:
            path = Path(folder) / "client.properties"
            path.touch(mode=0o600)
            path.write_text(properties_text(client_properties), "utf-8")
            args = (*args, "--command-config", str(path))
        command = java_command(TOOLS[tool], *args, jvm_options=("-Xmx256m", "-XX:+UseSerialGC"))
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    if completed.returncode != 0:
        raise BrokerError(f"{tool} {' '.join(args)} failed: {completed.stderr.strip()[-2000:]}")
    return completed.stdout


def properties_text(properties: Mapping[str, str]) -> str:
    """A Java ``.properties`` file: backslashes and line breaks (PEM values) escaped."""
    lines = []
    for key, value in properties.items():
        escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "")
        lines.append(f"{key}={escaped}\n")
    return "".join(lines)
