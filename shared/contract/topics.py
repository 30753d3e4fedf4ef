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

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

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
PRIORITY_RECIPIENTS = Topic(
    "sms.recipients-priority",
    purpose="auto replies and priority campaigns, read beside recipients (co-partitioned)",
)
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
    purpose=(
        "reports parked for a later retry and those Optimove acknowledged (so a replay posts "
        "nothing twice), co-partitioned with statuses and inbound"
    ),
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
SENDER_STATUS = Topic(
    "sms.sender-status",
    partitions=1,
    compacted=True,
    purpose="each sender instance's live share and window waits per campaign, keyed by instance",
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
    PRIORITY_RECIPIENTS,
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
    SENDER_STATUS,
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
    """Create every topic that does not exist yet; returns {name: "created" | "exists"}. What an
    existing topic differs in is ``topic_drift``'s answer."""
    existing = set(await admin.list_topics())
    missing = [t for t in ALL_TOPICS if t.name not in existing]
    if missing:
        # Another process may win the race; the end state is the same.
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([new_topic(t, replication_factor) for t in missing])
        await wait_for_leaders(admin, [topic.name for topic in missing])
    return {topic.name: "exists" if topic.name in existing else "created" for topic in ALL_TOPICS}


# Topics whose partition N belongs together: the same key lands on the same partition number of
# each (the normalizer's join, the changelogs of the sender's and the reporter's state).
CO_PARTITIONED: tuple[tuple[Topic, ...], ...] = (
    (RECIPIENTS, PRIORITY_RECIPIENTS, SENDER_STATE),
    (DISPATCHES, PROVIDER_EVENTS, NORMALIZER_STATE),
    (STATUSES, INBOUND, REPORTER_STATE),
)
# Kafka's DescribeConfigs source of a value set on the topic itself (not a broker default).
_DYNAMIC_TOPIC_CONFIG = 1


@dataclass(frozen=True)
class Drift:
    """One way an existing topic differs from what the pipeline needs. ``refused``: why
    ``topics ensure --fix`` leaves it as it is (None: ``--fix`` changes it)."""

    topic: str
    setting: str  # "partitions" or a topic config's name
    found: str
    wanted: str
    refused: str | None = None

    def __str__(self) -> str:
        line = f"{self.topic}: {self.setting} is {self.found}, want {self.wanted}"
        return f"{line}; not fixed: {self.refused}" if self.refused else line


def co_partitioned_with(topic: Topic) -> list[Topic]:
    for group in CO_PARTITIONED:
        if any(member.base == topic.base for member in group):
            return [member for member in group if member.base != topic.base]
    return []


def partition_refusal(topic: Topic, found: int) -> str | None:
    """Why the partition count ``found`` of ``topic`` must not be changed to ours; None when
    raising it is safe. Raising moves keys (partition = hash(key) mod count): only a topic no
    reader needs a key's records on one partition for may be raised."""
    if found > topic.partitions:
        return "Kafka never lowers a partition count: recreate the topic (it loses its records)"
    if topic.compacted:
        return (
            "compacted: a key's older value would stay on its old partition beside the newer "
            "one; recreate the topic"
        )
    partners = co_partitioned_with(topic)
    if partners:
        names = ", ".join(partner.name for partner in partners)
        return (
            f"co-partitioned with {names}: its keys would leave the partition their state is "
            "on; drain the pipeline and recreate them together"
        )
    return None


def config_drift(topic: Topic, found: dict[str, str], replication_factor: int) -> list[Drift]:
    """Each of our configs (``topic_configs``) that ``found`` (the topic's) lacks or differs in."""
    drift = []
    for name, wanted in topic_configs(topic, replication_factor).items():
        have = found.get(name)
        if have is None or not _same_config(name, have, wanted):
            drift.append(Drift(topic.name, name, have or "(unset)", wanted))
    return drift


def _same_config(name: str, found: str, wanted: str) -> bool:
    if name == "cleanup.policy":  # a list: "compact,delete" is "delete,compact"
        return {p.strip() for p in found.split(",")} == {p.strip() for p in wanted.split(",")}
    return found.strip() == wanted


async def topic_drift(admin: AIOKafkaAdminClient, topics: list[Topic]) -> list[Drift]:
    """How the existing ``topics`` differ from ours: partition count, cleanup.policy,
    min.insync.replicas (for the topic's actual replication factor) and our other configs."""
    if not topics:
        return []
    described = {
        entry["topic"]: entry for entry in await admin.describe_topics([t.name for t in topics])
    }
    configs = await _topic_configs(admin, [topic.name for topic in topics])
    drift: list[Drift] = []
    for topic in topics:
        partitions = described[topic.name]["partitions"]
        if len(partitions) != topic.partitions:
            drift.append(
                Drift(
                    topic.name,
                    "partitions",
                    str(len(partitions)),
                    str(topic.partitions),
                    partition_refusal(topic, len(partitions)),
                )
            )
        replication_factor = min((len(p["replicas"]) for p in partitions), default=1)
        found = {name: value for name, (value, _) in configs[topic.name].items()}
        drift.extend(config_drift(topic, found, replication_factor))
    return drift


async def fix_drift(admin: AIOKafkaAdminClient, drift: list[Drift]) -> None:
    """Change what ``drift`` allows (``refused`` is None): raise partition counts, set configs.

    Kafka's AlterConfigs replaces every config set on a topic, so the ones the operator set
    (retention.ms, ...) are sent again beside ours.
    """
    raises = {
        d.topic: NewPartitions(int(d.wanted))
        for d in drift
        if d.setting == "partitions" and d.refused is None
    }
    if raises:
        response = await admin.create_partitions(raises)
        _raise_errors("create partitions", response.topic_errors)
        await wait_for_leaders(admin, list(raises))
    changes: dict[str, dict[str, str]] = {}
    for d in drift:
        if d.setting != "partitions" and d.refused is None:
            changes.setdefault(d.topic, {})[d.setting] = d.wanted
    if not changes:
        return
    current = await _topic_configs(admin, list(changes))
    resources = []
    for name, wanted in changes.items():
        kept = {key: value for key, (value, source) in current[name].items() if source}
        resources.append(ConfigResource(ConfigResourceType.TOPIC, name, {**kept, **wanted}))
    for response in await admin.alter_configs(resources):
        _raise_errors("alter configs", [(r[3], r[0], r[1]) for r in response.resources])
    await _wait_for_configs(admin, changes)


async def _wait_for_configs(
    admin: AIOKafkaAdminClient, changes: dict[str, dict[str, str]], timeout_s: float = 15.0
) -> None:
    """Kafka answers AlterConfigs before its brokers apply the change: wait until DescribeConfigs
    shows it, so the report that follows says what is true."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        current = await _topic_configs(admin, list(changes))
        if all(
            _same_config(key, current[name].get(key, ("", False))[0], value)
            for name, wanted in changes.items()
            for key, value in wanted.items()
        ):
            return
        if asyncio.get_running_loop().time() > deadline:
            return  # the report will show what still differs
        await asyncio.sleep(0.2)


async def _topic_configs(
    admin: AIOKafkaAdminClient, names: list[str]
) -> dict[str, dict[str, tuple[str, bool]]]:
    """{topic: {config: (value, set on the topic itself)}}."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    found: dict[str, dict[str, tuple[str, bool]]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.to_object()["resources"]:
            if resource["error_code"]:
                raise KafkaError(
                    f"describe configs of {resource['resource_name']}: {resource['error_message']}"
                )
            entries = found.setdefault(resource["resource_name"], {})
            for entry in resource["config_entries"]:
                if "config_source" in entry:
                    own = entry["config_source"] == _DYNAMIC_TOPIC_CONFIG
                else:  # DescribeConfigs v0
                    own = not entry["is_default"]
                entries[entry["config_names"]] = (entry["config_value"] or "", own)
    return found


def _raise_errors(what: str, errors: list[tuple[str, int, str | None]]) -> None:
    failed = [f"{topic}: {message or code}" for topic, code, message in errors if code]
    if failed:
        raise KafkaError(f"{what}: {'; '.join(failed)}")


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
