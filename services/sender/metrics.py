"""The sender's own metrics. ``provider`` is the configured account name (bounded by config)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.metrics import PREFIX, look_labels_up_once

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
TURN_WAIT = Histogram(
    f"{PREFIX}_sender_turn_wait_seconds",
    "Time a send waited for its turn on its account (fair share), by class: priority (auto "
    "replies, priority campaigns) or bulk.",
    ["class"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
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

# -- saturation: what the account's in-flight slots are doing ---------------------------------
#
# The autoscaler's input (deploy/k8s/sender.yaml). A call holds one of the account's
# ``max_in_flight`` slots from before its rate-limit booking until its outcomes are recorded.
# While it waits for rate-limit budget the slot is ``rate_limited``; otherwise (intent, provider
# call, outcome) it is ``busy``. ``rate(slot_seconds{state="busy"}) / call_slots`` is the share of
# the instance's capacity doing work: near 1, calls queue for slots and another replica (with
# slots of its own) adds throughput; slots spent ``rate_limited`` add nothing, since replicas
# only split the account's rate limit between them.

SLOT_BUSY = "busy"
SLOT_RATE_LIMITED = "rate_limited"
SLOT_STATES = (SLOT_BUSY, SLOT_RATE_LIMITED)

CALL_SLOTS = Gauge(
    f"{PREFIX}_sender_call_slots",
    "The account's in-flight call slots on this instance (its max_in_flight).",
    ["provider"],
)

look_labels_up_once(
    PROVIDER_SENDS,
    PROVIDER_SEND_DURATION,
    PROVIDER_BATCH_SIZE,
    THROTTLED,
    THROTTLE_WAIT,
    LATE,
    TURN_WAIT,
    RATE_LIMIT,
    CIRCUIT_OPEN,
    SEGMENTS,
    DISPATCHES,
    RETRIES,
    FAILOVERS,
    UNKNOWN_OUTCOMES,
    DUPLICATE_RECORDS,
    PARKED,
    STATE_ENTRIES,
    CAMPAIGN_CONTROL,
    CALL_SLOTS,
)


class SlotTime:
    """Slot-seconds held per state, integrated whenever a slot changes state and read at scrape
    time: a scrape also counts calls still going on, so a hung provider shows at once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since = clock()
        self._holding = dict.fromkeys(SLOT_STATES, 0)
        self._seconds = dict.fromkeys(SLOT_STATES, 0.0)

    def move(self, leaving: str | None, entering: str | None) -> None:
        """One slot leaves state ``leaving`` (None: it was free) for ``entering`` (None: freed)."""
        self._advance()
        if leaving is not None:
            self._holding[leaving] -= 1
        if entering is not None:
            self._holding[entering] += 1

    def seconds(self) -> dict[str, float]:
        self._advance()
        return dict(self._seconds)

    def _advance(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._since)
        self._since = now
        for state, holding in self._holding.items():
            self._seconds[state] += holding * elapsed


_SLOT_TIMES: dict[str, SlotTime] = {}


def slot_time(account: str) -> SlotTime:
    """The account's slot clock, one per process (as a labelled counter's child would be)."""
    return _SLOT_TIMES.setdefault(account, SlotTime())


class _SlotSecondsCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            f"{PREFIX}_sender_slot_seconds",
            "Seconds the account's in-flight call slots were held, by state: busy (intent, "
            "provider call, outcome) or rate_limited (waiting for rate-limit budget).",
            labels=["provider", "state"],
        )
        for account, times in list(_SLOT_TIMES.items()):
            for state, seconds in times.seconds().items():
                family.add_metric([account, state], seconds)
        yield family


REGISTRY.register(_SlotSecondsCollector())
