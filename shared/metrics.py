"""Prometheus metrics shared by every service. Prefix ``smsbridge_``; no numbers or ids in labels.

Service-specific metrics live beside the code that moves them, with the same prefix.
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

PREFIX = "smsbridge"


def look_labels_up_once(*metrics: MetricWrapperBase) -> None:
    """Each of ``metrics`` remembers its ``labels()`` per label set.

    prometheus_client's ``labels()`` takes a lock and checks its arguments on every call, and the
    runner and the handlers call it several times per record. Label sets are bounded (no ids in
    labels), so is the memory. Not for metrics whose children are removed (the lag gauges).
    """
    for metric in metrics:
        metric.labels = functools.cache(metric.labels)  # type: ignore[method-assign]


RECORDS_PROCESSED = Counter(
    f"{PREFIX}_records_processed_total",
    "Records a consumer finished (outputs acknowledged by Kafka).",
    ["consumer", "topic"],
)
LAST_PROCESSED = Gauge(
    f"{PREFIX}_last_record_processed_timestamp_seconds",
    "Unix time at which a consumer last finished a record.",
    ["consumer", "topic"],
)
# ``consumergroup``: the group's name on the broker, as kafka-exporter labels its own lag.
CONSUMER_LAG = Gauge(
    f"{PREFIX}_consumer_lag_messages",
    "Records behind the partition's high watermark, from the consumer's own position.",
    ["consumer", "consumergroup", "topic", "partition"],
)
CONSUMER_LAG_SECONDS = Gauge(
    f"{PREFIX}_consumer_lag_seconds",
    "Age of the oldest record taken but not yet finished.",
    ["consumer", "consumergroup", "topic", "partition"],
)
BACKLOG_RECORDS = Gauge(
    f"{PREFIX}_consumer_backlog_records",
    "Records read but left waiting in the log because their lane was full (shared/kafka/"
    "backlog.py): the sender's campaigns beyond their fair part of an account.",
    ["consumer"],
)
DEAD_LETTERS = Counter(
    f"{PREFIX}_dead_letters_total",
    "Records sent to the dead-letter topic.",
    ["stage", "source_topic"],
)
SIGNATURE_FAILURES = Counter(
    f"{PREFIX}_signature_failures_total",
    "Requests refused for a bad API key or signature.",
    ["endpoint", "tenant", "reason"],
)
HTTP_REQUESTS = Counter(
    f"{PREFIX}_http_requests_total",
    "HTTP requests answered by our servers.",
    ["service", "route", "status"],
)
HTTP_DURATION = Histogram(
    f"{PREFIX}_http_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["service", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

look_labels_up_once(
    RECORDS_PROCESSED,
    LAST_PROCESSED,
    DEAD_LETTERS,
    SIGNATURE_FAILURES,
    HTTP_REQUESTS,
    HTTP_DURATION,
)
