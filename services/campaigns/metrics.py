"""The campaigns service's own metrics (the runner's and HTTP ones are in ``shared/metrics.py``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from shared.metrics import PREFIX, look_labels_up_once

CAMPAIGNS_TRACKED = Gauge(
    f"{PREFIX}_campaigns_tracked",
    "Campaigns (tenant and campaign id, auto replies and replies apart) with counters in "
    "sms.campaign-counts, as this instance's copy of it holds them.",
)
CONTROLS_PUBLISHED = Counter(
    f"{PREFIX}_campaign_controls_published_total",
    "Pause, resume and cancel controls written to sms.campaign-control (acknowledged by Kafka), "
    "by action and scope (tenant or campaign).",
    ["action", "scope"],
)
ADMIN_UNAUTHORIZED = Counter(
    f"{PREFIX}_admin_unauthorized_total",
    "Admin API calls refused with 401, by reason: no token configured, no bearer token, wrong "
    "token.",
    ["reason"],
)
INPUTS_ALREADY_COUNTED = Counter(
    f"{PREFIX}_campaign_inputs_already_counted_total",
    "Input records read again (after a restart or a rebalance) that the counters already "
    "included: skipped.",
    ["topic"],
)
INPUTS_TOO_OLD = Counter(
    f"{PREFIX}_campaign_inputs_too_old_total",
    "Input records older than campaigns.expire_after_s: not counted (their campaign would be "
    "expired at once).",
    ["topic"],
)
COUNTS_FLUSHES = Counter(
    f"{PREFIX}_campaign_counts_flushes_total",
    "Batches of changed counters written to sms.campaign-counts, by result (ok, failed).",
    ["result"],
)

look_labels_up_once(
    CAMPAIGNS_TRACKED,
    CONTROLS_PUBLISHED,
    ADMIN_UNAUTHORIZED,
    INPUTS_ALREADY_COUNTED,
    INPUTS_TOO_OLD,
    COUNTS_FLUSHES,
)
