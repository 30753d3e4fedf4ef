"""The reporter's own metrics. Counts are in messages unless they say requests: an incoming-message
request carrying five replies moves ``smsbridge_reports_total{kind="incoming"}`` by five and
``smsbridge_report_attempt_failures_total`` by one."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import PREFIX, look_labels_up_once

REPORTS = Counter(
    f"{PREFIX}_reports_total",
    "Messages reported to Optimove, by the report's status (sent, delivered, failed; reply for "
    "incoming messages) and result: accepted, dead_lettered, or parked (each time a message's "
    "report was parked for a later attempt).",
    ["tenant", "kind", "status", "result"],
)
ATTEMPT_FAILURES = Counter(
    f"{PREFIX}_report_attempt_failures_total",
    "Requests to Optimove that were not accepted, by answer: the HTTP status code, timeout or "
    "network.",
    ["tenant", "kind", "code"],
)
# Apart from REPORTS, whose rates the success-rate alert divides: a replay is not a failure.
REPORTS_ALREADY_ACKNOWLEDGED = Counter(
    f"{PREFIX}_reports_already_acknowledged_total",
    "Messages read again (a replay of the reporter's group, or the same report written twice) "
    "whose report Optimove had accepted already: not posted again.",
    ["tenant", "kind"],
)
REPORT_REQUEST_DURATION = Histogram(
    f"{PREFIX}_report_request_duration_seconds",
    "Duration of one HTTP request to Optimove, whatever its answer (each tenant has an Optimove "
    "of its own).",
    ["tenant", "kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
OPTIMOVE_UNAUTHORIZED = Counter(
    f"{PREFIX}_optimove_unauthorized_total",
    "Requests Optimove answered 401: the tenant's api_token or secret_key is wrong.",
    ["tenant"],
)
REPORTS_PARKED = Gauge(
    f"{PREFIX}_reports_parked",
    "Messages whose report waits in sms.reporter-state for a later attempt (partitions held by "
    "this instance).",
    ["tenant", "kind"],
)
CIRCUIT_OPEN = Gauge(
    f"{PREFIX}_optimove_circuit_open",
    "1 while a tenant's Optimove is failing: probed one request at a time, its reports parked.",
    ["tenant"],
)

look_labels_up_once(
    REPORTS,
    ATTEMPT_FAILURES,
    REPORTS_ALREADY_ACKNOWLEDGED,
    REPORT_REQUEST_DURATION,
    OPTIMOVE_UNAUTHORIZED,
    REPORTS_PARKED,
    CIRCUIT_OPEN,
)

KIND_DELIVERY: Final = "delivery"
KIND_INCOMING: Final = "incoming"
KINDS = (KIND_DELIVERY, KIND_INCOMING)
STATUS_REPLY = "reply"
RESULT_ACCEPTED = "accepted"
RESULT_DEAD_LETTERED = "dead_lettered"
RESULT_PARKED = "parked"
