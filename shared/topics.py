"""Every Kafka topic of the pipeline, in one place.

    ingress ──recipients──▶ sender ──dispatches──▶ normalizer ──statuses──▶ reporter ──▶ Optimove
                              ▲                        ▲   │
                           opt-outs          provider-events└──inbound──▶ reporter ──▶ Optimove
                                                       ▲
                                          callbacks ───┘

Co-partitioning matters: ``dispatches`` and ``provider-events`` are keyed by the same correlation
key and have the same partition count, so the normalizer's join is local to one instance.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

DEFAULT_PARTITIONS = 12


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int = DEFAULT_PARTITIONS
    compacted: bool = False
    purpose: str = ""
    config: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


RECIPIENTS = Topic("sms.recipients", purpose="one message per recipient, keyed by tenant+number")
DISPATCHES = Topic(
    "sms.dispatches", purpose="what happened to each send attempt, keyed by correlation key"
)
PROVIDER_EVENTS = Topic(
    "sms.provider-events", purpose="raw provider callbacks, keyed by correlation key"
)
STATUSES = Topic("sms.statuses", purpose="canonical status changes, keyed by message id")
INBOUND = Topic("sms.inbound", purpose="customer replies for Optimove, keyed by tenant")
OPT_OUTS = Topic(
    "sms.opt-outs", partitions=1, compacted=True, purpose="opt-out list, keyed by tenant+number"
)
INGRESS_REQUESTS = Topic(
    "sms.ingress-requests",
    partitions=1,
    compacted=True,
    purpose="campaign requests already accepted, keyed by tenant+request key",
)
NORMALIZER_STATE = Topic(
    "sms.normalizer-state",
    compacted=True,
    purpose="changelog of the normalizer's join state, co-partitioned with dispatches",
)
SENDER_STATE = Topic(
    "sms.sender-state",
    compacted=True,
    purpose="changelog of send intents and dispatches, co-partitioned with recipients",
)
NUMBER_FORMATS = Topic(
    "sms.number-formats",
    partitions=1,
    compacted=True,
    purpose="how Optimove wrote each number, keyed by tenant+E164, for replies' `from`",
)
DEAD_LETTERS = Topic("sms.dead-letters", purpose="what no stage could handle, with the reason")
REPORTER_STATE = Topic(
    "sms.reporter-state",
    compacted=True,
    purpose="reports parked for a later retry, co-partitioned with statuses and inbound",
)
DEAD_LETTERS_REDRIVEN = Topic(
    "sms.dead-letters-redriven",
    partitions=1,
    compacted=True,
    purpose="dead letters already re-driven, keyed by their partition and offset",
)

CAMPAIGN_CONTROL = Topic(
    "sms.campaign-control",
    partitions=1,
    compacted=True,
    purpose="pause / resume / cancel, keyed by tenant or tenant+campaign: the latest word wins",
)
CAMPAIGN_COUNTS = Topic(
    "sms.campaign-counts",
    partitions=6,
    compacted=True,
    purpose="per-campaign counters of each input partition the campaigns service read",
)
REPORT_OUTCOMES = Topic(
    "sms.report-outcomes",
    purpose="reports Optimove acknowledged, counted per tenant and campaign, keyed by tenant",
)

ALL_TOPICS: tuple[Topic, ...] = (
    RECIPIENTS,
    DISPATCHES,
    PROVIDER_EVENTS,
    STATUSES,
    INBOUND,
    OPT_OUTS,
    INGRESS_REQUESTS,
    NORMALIZER_STATE,
    SENDER_STATE,
    NUMBER_FORMATS,
    DEAD_LETTERS,
    REPORTER_STATE,
    DEAD_LETTERS_REDRIVEN,
    CAMPAIGN_CONTROL,
    CAMPAIGN_COUNTS,
    REPORT_OUTCOMES,
)


def new_topic(topic: Topic, replication_factor: int) -> NewTopic:
    configs = dict(topic.config)
    if topic.compacted:
        configs.setdefault("cleanup.policy", "compact")
    return NewTopic(
        name=topic.name,
        num_partitions=topic.partitions,
        replication_factor=replication_factor,
        topic_configs=configs,
    )


async def ensure_topics(admin: AIOKafkaAdminClient, replication_factor: int = 1) -> dict[str, str]:
    """Create every topic that does not exist yet; returns {name: "created" | "exists"}."""
    existing = set(await admin.list_topics())
    result: dict[str, str] = {}
    missing = [t for t in ALL_TOPICS if t.name not in existing]
    for topic in ALL_TOPICS:
        result[topic.name] = "exists"
    if missing:
        # Another process may win the race; the end state is the same.
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([new_topic(t, replication_factor) for t in missing])
        for topic in missing:
            result[topic.name] = "created"
    return result
