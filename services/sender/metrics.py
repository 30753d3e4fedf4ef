"""The sender's own metrics. ``provider`` is the configured account name (bounded by config)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import PREFIX

PROVIDER_SENDS = Counter(
    f"{PREFIX}_provider_send_total",
    "Messages handed to a provider, by result: accepted, rejected (terminal), retryable, or "
    "unknown (the provider may have taken it before the call failed).",
    ["provider", "result"],
)
PROVIDER_SEND_DURATION = Histogram(
    f"{PREFIX}_provider_send_duration_seconds",
    "Time one send call to a provider took, including network failures and timeouts.",
    ["provider"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
PROVIDER_BATCH_SIZE = Histogram(
    f"{PREFIX}_provider_send_batch_messages",
    "Messages carried by one send call (bulk providers gather several).",
    ["provider"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
)
THROTTLED = Counter(
    f"{PREFIX}_sender_throttled_total",
    "Send calls that waited for the account's rate limit.",
    ["provider"],
)
THROTTLE_WAIT = Counter(
    f"{PREFIX}_sender_throttle_wait_seconds_total",
    "Time send calls spent waiting for the account's rate limit.",
    ["provider"],
)
LATE = Counter(
    f"{PREFIX}_sender_rate_limit_late_total",
    "Send calls that went later than their rate-limit time (a stalled process, slow Kafka).",
    ["provider"],
)
RATE_LIMIT = Gauge(
    f"{PREFIX}_sender_rate_limit_per_second",
    "This instance's share of the account's rate limit (units per second; 0 = none owned).",
    ["provider"],
)
CIRCUIT_OPEN = Gauge(
    f"{PREFIX}_provider_circuit_open",
    "1 while the account's circuit breaker keeps calls away (open or half-open), else 0.",
    ["provider"],
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
RETRIES = Counter(
    f"{PREFIX}_sender_retries_total",
    "Messages parked for another attempt on the same route after a retryable error.",
    ["provider"],
)
FAILOVERS = Counter(
    f"{PREFIX}_sender_failovers_total",
    "Messages moved on from an account (attempts used up) to the tenant's next route.",
    ["provider"],
)
UNKNOWN_OUTCOMES = Counter(
    f"{PREFIX}_sender_unknown_outcomes_total",
    "Sends whose outcome is unknown (crash, timeout) and that are reported failed, not resent.",
    ["provider", "cause"],
)
DUPLICATE_RECORDS = Counter(
    f"{PREFIX}_sender_duplicate_records_total",
    "Records of messages already settled (redelivery, replay): nothing sent, dispatch republished.",
)
PARKED = Gauge(
    f"{PREFIX}_sender_parked_messages",
    "Messages parked in sms.sender-state on this instance's partitions, by reason.",
    ["reason"],
)
STATE_ENTRIES = Gauge(
    f"{PREFIX}_sender_state_entries",
    "Entries of sms.sender-state held by this instance (parked, in flight, remembered outcomes).",
)
CAMPAIGN_CONTROL = Counter(
    f"{PREFIX}_sender_campaign_control_total",
    "Messages the operator's campaign controls acted on: held (paused), released (resumed), "
    "cancelled (reported Failed/Cancelled, never sent).",
    ["effect"],
)
