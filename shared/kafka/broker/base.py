"""What every embedded broker offers: a loopback address, start, stop, a process to measure."""

from __future__ import annotations

import socket
import subprocess
from abc import ABC, abstractmethod
from types import TracebackType
from typing import ClassVar


class BrokerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker(ABC):
    """One broker process on a loopback port; usable as a context manager."""

    kind: ClassVar[str]
    # Whether its topics and offsets outlive a stop (Apache Kafka on disk; Tansu keeps none).
    persistent: ClassVar[bool]

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (benchmarks sample its CPU time)."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @abstractmethod
    def start(self, timeout_s: float = 60.0) -> None:
        """Start the process and return once it answers clients; BrokerError if it cannot."""

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def close(self) -> None:
        """Stop for good: a broker that keeps data in a folder of its own removes it."""
        self.stop()

    def kill(self) -> None:
        """SIGKILL, as a crashed machine would: nothing is flushed."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
