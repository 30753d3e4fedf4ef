"""The normalizer's own metrics (the runner's are in ``shared/metrics.py``)."""

from __future__ import annotations

from prometheus_client import Counter

from shared.metrics import PREFIX, look_labels_up_once

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
INBOUND_MESSAGES = Counter(
    f"{PREFIX}_inbound_messages_total",
    "Replies and STOP callbacks forwarded to Optimove, by provider kind and event kind.",
    ["provider", "kind"],
)
INBOUND_HELD = Counter(
    f"{PREFIX}_inbound_held_total",
    "Replies naming a message whose dispatch record is needed to find their tenant, held for it.",
    ["provider"],
)
INBOUND_DUPLICATES = Counter(
    f"{PREFIX}_inbound_duplicates_total",
    "Replies and STOP callbacks not forwarded again: the same provider event was seen before.",
    ["provider"],
)
INBOUND_UNROUTABLE = Counter(
    f"{PREFIX}_inbound_unroutable_total",
    "Replies and STOP callbacks dead-lettered: no tenant, or no usable number, for them.",
    ["provider"],
)
OPT_OUTS = Counter(
    f"{PREFIX}_optout_total",
    "Opt-outs recorded, by source: 'keyword' (a reply) or 'provider' (a provider STOP callback).",
    ["source"],
)
OPT_INS = Counter(f"{PREFIX}_optin_total", "Opt-ins recorded (a reply with an opt-in keyword).")
NUMBER_FORMATS_WRITTEN = Counter(
    f"{PREFIX}_number_formats_written_total",
    "Records written to the number directory (how Optimove wrote a number, for replies' from).",
)

look_labels_up_once(
    DLR_RECEIVED,
    STATUS_CHANGES,
    STATUS_DROPPED,
    DLR_UNMATCHED,
    INBOUND_MESSAGES,
    INBOUND_HELD,
    INBOUND_DUPLICATES,
    INBOUND_UNROUTABLE,
    OPT_OUTS,
    OPT_INS,
    NUMBER_FORMATS_WRITTEN,
)
