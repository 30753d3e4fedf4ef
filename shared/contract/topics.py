"""Every Kafka topic of the pipeline, in one place (the diagram: docs/architecture.md).

Co-partitioning matters: ``dispatches`` and ``provider-events`` are keyed by the same correlation
key and have the same partition count, so the normalizer's join is local to one instance.

``[kafka] topic_prefix`` puts several environments on one cluster: ``Topic.name`` is the prefixed
name, ``Topic.base`` the one written here. One prefix per process, set by ``use_prefix`` when the
process makes its Kafka clients (``shared.kafka.clients``); read names when needed, never at import.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

DEFAULT_PARTITIONS = 12


_prefix = ""
_by_name: dict[str, Topic] = {}


def use_prefix(prefix: str) -> None:
    global _prefix
    _prefix = prefix
    _by_name.clear()


@dataclass(frozen=True)
class Topic:
    base: str
    partitions: int = DEFAULT_PARTITIONS
    compacted: bool = False
    purpose: str = ""
    config: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return _prefix + self.base

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
LAST_INBOUND = Topic(
    "sms.last-inbound",
    partitions=1,
    compacted=True,
    purpose="when each customer last wrote to each tenant, keyed by tenant+E164, for auto replies",
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
    LAST_INBOUND,
    DEAD_LETTERS,
    REPORTER_STATE,
    DEAD_LETTERS_REDRIVEN,
    CAMPAIGN_CONTROL,
    CAMPAIGN_COUNTS,
    REPORT_OUTCOMES,
)


def by_name(name: str) -> Topic | None:
    """The topic of a (prefixed) name read from a record, or None for a topic not ours."""
    if not _by_name:
        _by_name.update((topic.name, topic) for topic in ALL_TOPICS)
    return _by_name.get(name)


def topic_configs(topic: Topic, replication_factor: int) -> dict[str, str]:
    """What ``ensure_topics`` creates the topic with (``smsbridge topics ensure`` prints it)."""
    configs = {
        "cleanup.policy": "compact" if topic.compacted else "delete",
        # acks=all then means two copies (one on a single node): one broker may be down.
        "min.insync.replicas": str(max(1, min(2, replication_factor - 1))),
    }
    configs.update(topic.config)
    return configs


def new_topic(topic: Topic, replication_factor: int) -> NewTopic:
    return NewTopic(
        name=topic.name,
        num_partitions=topic.partitions,
        replication_factor=replication_factor,
        topic_configs=topic_configs(topic, replication_factor),
    )


async def ensure_topics(admin: AIOKafkaAdminClient, replication_factor: int = 1) -> dict[str, str]:
    """Create every topic that does not exist yet; returns {name: "created" | "exists"}, or
    "exists with N partitions" for a topic whose count differs from ours (a co-partitioned join
    would be wrong on it: the operator must know)."""
    existing = set(await admin.list_topics())
    result: dict[str, str] = {}
    missing = [t for t in ALL_TOPICS if t.name not in existing]
    present = [t for t in ALL_TOPICS if t.name in existing]
    if present:
        described = await admin.describe_topics([t.name for t in present])
        counts = {entry["topic"]: len(entry["partitions"]) for entry in described}
        for topic in present:
            found = counts.get(topic.name, topic.partitions)
            differs = found != topic.partitions
            result[topic.name] = f"exists with {found} partitions" if differs else "exists"
    if missing:
        # Another process may win the race; the end state is the same.
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([new_topic(t, replication_factor) for t in missing])
        for topic in missing:
            result[topic.name] = "created"
        await wait_for_leaders(admin, [topic.name for topic in missing])
    return {topic.name: result[topic.name] for topic in ALL_TOPICS}


async def partition_numbers(admin: AIOKafkaAdminClient, name: str) -> list[int] | None:
    """The partitions of topic ``name`` as the broker has them; None when it does not exist.

    A consumer knows only the topics it reads (``partitions_for_topic`` is None for the others
    on Apache Kafka), so tools that inspect any topic ask here.
    """
    [described] = await admin.describe_topics([name])
    if described.get("error_code") or not described["partitions"]:
        return None
    return sorted(partition["partition"] for partition in described["partitions"])


async def wait_for_leaders(
    admin: AIOKafkaAdminClient, names: list[str], timeout_s: float = 30.0
) -> None:
    """Return once every partition of ``names`` has a leader: Apache Kafka answers CreateTopics
    before it elects them, and a produce meanwhile fails with NotLeaderForPartition."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        described = await admin.describe_topics(names)
        leaderless = [
            topic["topic"]
            for topic in described
            if topic.get("error_code")
            or not topic["partitions"]
            or any(partition["leader"] < 0 for partition in topic["partitions"])
        ]
        if not leaderless:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no leader within {timeout_s:g}s for {sorted(leaderless)}")
        await asyncio.sleep(0.1)
