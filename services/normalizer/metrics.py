"""The normalizer's own metrics (the runner's are in ``shared/metrics.py``)."""

from __future__ import annotations

from prometheus_client import Counter

from shared.metrics import PREFIX

DLR_RECEIVED = Counter(
    f"{PREFIX}_dlr_received_total",
    "Provider status events read, by provider kind and canonical status ('unknown' if unmapped).",
    ["provider", "status"],
)
STATUS_CHANGES = Counter(
    f"{PREFIX}_status_changes_total",
    "Status events emitted (forward moves of a message's status).",
    ["status"],
)
STATUS_DROPPED = Counter(
    f"{PREFIX}_status_dropped_total",
    "Statuses not emitted: duplicate event, after a final status, not forward, unknown status.",
    ["reason"],
)
DLR_UNMATCHED = Counter(
    f"{PREFIX}_dlr_unmatched_total",
    "Provider events dead-lettered because no dispatch record arrived in time.",
    ["provider"],
)
