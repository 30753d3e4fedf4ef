"""The reporter's own metrics. Counts are in messages: an incoming-message request carrying five
replies moves ``smsbridge_reports_total{kind="incoming"}`` by five."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from shared.metrics import PREFIX

REPORTS = Counter(
    f"{PREFIX}_reports_total",
    "Messages reported to Optimove, by outcome: accepted, retried (once per failed attempt) or "
    "dead_lettered.",
    ["tenant", "kind", "result"],
)
REPORT_REQUEST_DURATION = Histogram(
    f"{PREFIX}_report_request_duration_seconds",
    "Duration of one HTTP request to Optimove, whatever its answer.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
OPTIMOVE_UNAUTHORIZED = Counter(
    f"{PREFIX}_optimove_unauthorized_total",
    "Requests Optimove answered 401: the tenant's api_token or secret_key is wrong.",
    ["tenant"],
)

KIND_DELIVERY = "delivery"
KIND_INCOMING = "incoming"
RESULT_ACCEPTED = "accepted"
RESULT_RETRIED = "retried"
RESULT_DEAD_LETTERED = "dead_lettered"
