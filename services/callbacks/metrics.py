"""The callbacks service's own metrics."""

from __future__ import annotations

from prometheus_client import Counter

from shared.metrics import PREFIX

CALLBACKS_RECEIVED = Counter(
    f"{PREFIX}_callbacks_received_total",
    "Provider callback events stored on Kafka, by provider kind and event kind.",
    ["provider", "kind"],
)
CALLBACKS_REFUSED = Counter(
    f"{PREFIX}_callbacks_refused_total",
    "Provider callbacks refused (nothing stored), by provider kind and reason.",
    ["provider", "reason"],
)
