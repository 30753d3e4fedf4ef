"""The embedded broker of ``smsbridge dev``, the test suite and the benchmarks.

Apache Kafka (``apache_kafka``) when Java 17+ and its jars (or Maven, to fetch them) are here;
else Tansu (``tansu``), a memory-only stand-in, with one line saying why.
``SMSBRIDGE_EMBEDDED_BROKER=kafka|tansu`` forces one: a forced broker that cannot start is an
error, never a silent fallback. The chosen kind is exported in that same variable, so the
services started beside it know which broker they talk to (``shared.kafka.clients.broker_kind``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shared.kafka.broker import distribution
from shared.kafka.broker.apache_kafka import ApacheKafkaBroker
from shared.kafka.broker.base import BrokerError, EmbeddedBroker, free_port
from shared.kafka.broker.tansu import TansuBroker

__all__ = [
    "EMBEDDED_BROKER_ENV",
    "ApacheKafkaBroker",
    "BrokerError",
    "EmbeddedBroker",
    "TansuBroker",
    "choose_kind",
    "embedded_broker",
    "free_port",
]

log = logging.getLogger(__name__)

EMBEDDED_BROKER_ENV = "SMSBRIDGE_EMBEDDED_BROKER"
KINDS = ("kafka", "tansu")


def choose_kind(*, fetch: bool = True) -> str:
    """``kafka`` or ``tansu``: the forced kind, else Apache Kafka where it can run here."""
    forced = os.environ.get(EMBEDDED_BROKER_ENV, "").strip().lower()
    if forced:
        if forced not in KINDS:
            raise BrokerError(f"{EMBEDDED_BROKER_ENV}={forced!r}: expected one of {KINDS}")
        if forced == "kafka" and (reason := distribution.unavailable_reason(fetch=fetch)):
            raise BrokerError(f"{EMBEDDED_BROKER_ENV}=kafka, but {reason}")
        return forced
    reason = distribution.unavailable_reason(fetch=fetch)
    if reason is None:
        return "kafka"
    log.warning("embedded broker: Tansu (memory only), because %s", reason)
    return "tansu"


def embedded_broker(
    port: int | None = None, *, data_dir: Path | None = None, kind: str | None = None
) -> EmbeddedBroker:
    """The embedded broker to start; ``data_dir`` keeps Apache Kafka's data across restarts."""
    chosen = kind or choose_kind()
    os.environ[EMBEDDED_BROKER_ENV] = chosen
    if chosen == "kafka":
        return ApacheKafkaBroker(port=port, data_dir=data_dir)
    return TansuBroker(port=port)
