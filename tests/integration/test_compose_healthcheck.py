"""docker-compose.yml's Kafka healthcheck, run as it is against a real broker (there is no Docker
engine here): healthy when the broker answers, not when nothing listens, and not when something
accepts connections without answering (a broker that is still starting)."""

from __future__ import annotations

import socket
import subprocess

import pytest

from shared.kafka.broker import EmbeddedBroker
from tests.deploy.test_compose import services

pytestmark = pytest.mark.integration


def healthcheck(host: str, port: int, timeout_s: float = 10.0) -> int:
    """The compose check's exit code, aimed at host:port instead of the container's own 9092."""
    command, shell, flag, script = services()["kafka"]["healthcheck"]["test"]
    assert (command, shell, flag) == ("CMD", "bash", "-c")
    script = script.replace("/dev/tcp/127.0.0.1/9092", f"/dev/tcp/{host}/{port}")
    return subprocess.run(
        [shell, flag, script], timeout=timeout_s, stderr=subprocess.DEVNULL, check=False
    ).returncode


def test_the_kafka_healthcheck_passes_against_a_running_broker(broker: EmbeddedBroker) -> None:
    host, port = broker.bootstrap_servers.rsplit(":", 1)
    assert healthcheck(host, int(port)) == 0


def test_the_kafka_healthcheck_fails_where_nothing_answers() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert healthcheck("127.0.0.1", port) != 0
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(subprocess.TimeoutExpired):  # compose's timeout marks it unhealthy
            healthcheck("127.0.0.1", silent.getsockname()[1], timeout_s=3.0)
