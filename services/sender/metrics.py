"""The sender's own metrics. ``provider`` is the configured account name (bounded by config)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import PREFIX

PROVIDER_SENDS = Counter(
    f"{PREFIX}_provider_send_total",
    "Send calls made to a provider, by their result: accepted, rejected (terminal) or retryable.",
    ["provider", "result"],
)
PROVIDER_SEND_DURATION = Histogram(
    f"{PREFIX}_provider_send_duration_seconds",
    "Time one send call to a provider took, including network failures and timeouts.",
    ["provider"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
SEGMENTS = Counter(
    f"{PREFIX}_segments_total",
    "SMS segments of the messages providers accepted, by encoding (gsm7, ucs2).",
    ["encoding"],
)
DISPATCHES = Counter(
    f"{PREFIX}_sender_dispatches_total",
    "Dispatch records the sender wrote, by outcome and sub-status.",
    ["outcome", "sub_status"],
)
SCHEDULED_WAITING = Gauge(
    f"{PREFIX}_sender_scheduled_messages",
    "Messages held until their scheduled time.",
)
