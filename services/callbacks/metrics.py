"""The callbacks service's own metrics."""

from __future__ import annotations

from prometheus_client import Counter

from shared.metrics import PREFIX, look_labels_up_once

CALLBACKS_RECEIVED = Counter(
    f"{PREFIX}_callbacks_received_total",
    "Provider callback events stored on Kafka, by provider kind and event kind.",
    ["provider", "kind"],
)
CALLBACKS_REFUSED = Counter(
    f"{PREFIX}_callbacks_refused_total",
    "Provider callbacks answered with an error (nothing stored; after a 'deadline' 503 the "
    "events may still be stored late), by provider kind and reason.",
    ["provider", "reason"],
)

look_labels_up_once(CALLBACKS_RECEIVED, CALLBACKS_REFUSED)
