"""Ingress metrics (HTTP durations and signature failures are the shared ones in shared.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from shared.metrics import PREFIX, look_labels_up_once

REQUESTS = Counter(
    f"{PREFIX}_ingress_requests_total",
    "Campaign Transmission requests answered, by outcome (accepted, duplicate, unauthorized, "
    "invalid_json, invalid_schema, too_large, unknown_tenant, unavailable, busy).",
    ["tenant", "result"],
)
AMBIGUOUS_NUMBERS = Counter(
    f"{PREFIX}_ingress_ambiguous_numbers_total",
    "Recipients sent to whose bare-digit number was valid both as international and as national, "
    "by the reading the tenant's bare_digits chose.",
    ["tenant", "read_as"],
)
RECIPIENTS = Counter(
    f"{PREFIX}_ingress_recipients_total",
    "Recipients of accepted requests, by outcome (accepted or the rejection's sub-status).",
    ["tenant", "result"],
)
LEDGER_ENTRIES = Gauge(
    f"{PREFIX}_ingress_ledger_entries",
    "Accepted requests remembered for deduplication.",
)

look_labels_up_once(REQUESTS, AMBIGUOUS_NUMBERS, RECIPIENTS, LEDGER_ENTRIES)
