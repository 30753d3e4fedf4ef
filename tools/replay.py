"""``smsbridge replay``: move a stopped consumer group's committed offsets, as Kafka's tool does.

Like ``kafka-consumer-groups --reset-offsets``, it plans by default (prints the move per
partition, commits nothing) and commits only with ``--execute``; each target means what the
option of the same name means there (``tools/replay_targets.py``). ``--export FILE`` saves the
offsets before the move in the tool's CSV, which ``--from-file FILE --execute`` puts back: the
undo. The operator's runbook is docs/replay.md.

The group must have no live member (they would commit over us, and Kafka refuses a commit from
outside a group with members): checked before planning and again right before committing.
Every partition moves in one OffsetCommit.

Committed offsets are read and written by a consumer that carries the group id but never joins
(manual assignment + ``committed``/``commit``): the admin client's
``list_consumer_group_offsets`` cannot decode Tansu's answer (``--all-topics`` needs it, so it
works on Apache Kafka only). A partition's end comes from ListOffsets, on Tansu from a fetch
response's high watermark. ``offsets_for_times`` answers a time past the last record with no
offset on Apache Kafka but offset 0 on Tansu: an answer whose timestamp is before the time asked
for means "no such record" here too. ``--group`` and ``--topic`` are the names sms-bridge uses;
``[kafka]`` prefixes are added here. Offsets files hold the topics' names on the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from shared.config import KafkaSettings, Settings, load_settings
from shared.contract.topics import partition_numbers
from shared.kafka.clients import (
    client_id,
    connection_kwargs,
    group_name,
    is_tansu,
    make_admin,
)
from tools.replay_targets import (
    ByDuration,
    FromBeginning,
    FromFile,
    ReplayError,
    ShiftBy,
    Target,
    ToLatest,
    ToOffset,
    ToTime,
    parse_duration,
    parse_time,
    read_offsets_file,
    target_offset,
    write_offsets_file,
)

__all__ = [
    "ByDuration",
    "FromBeginning",
    "FromFile",
    "GroupHasLiveMembers",
    "PartitionMove",
    "ReplayError",
    "ReplayPlan",
    "ShiftBy",
    "Target",
    "ToLatest",
    "ToOffset",
    "ToTime",
    "add_arguments",
    "cli",
    "committed_offsets",
    "live_members",
    "offsets_consumer",
    "plan_replay",
    "replay",
]

# How long to wait for a fetch response that tells each partition's end.
END_OFFSETS_TIMEOUT_S = 15.0


class GroupHasLiveMembers(ReplayError):
    def __init__(self, group: str, state: str, members: Sequence[str]) -> None:
        super().__init__(
            f"consumer group {group} has {len(members)} live member(s) (state {state}: "
            f"{', '.join(members)}); stop every instance of the service first (docs/replay.md)"
        )
        self.members = list(members)


@dataclass(frozen=True)
class PartitionMove:
    topic: str
    partition: int
    before: int | None  # committed offset, None when the group never committed one
    after: int
    earliest: int
    end: int

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def to_read(self) -> int:
        """Records the group will read from this partition once restarted."""
        return max(0, self.end - self.after)

    @property
    def undo(self) -> int:
        """Where ``--from-file`` of the export puts this partition back: its committed offset,
        or without one the earliest, where the group (auto.offset.reset=earliest) would start."""
        return self.earliest if self.before is None else self.before


@dataclass(frozen=True)
class ReplayPlan:
    group: str
    target: Target
    moves: tuple[PartitionMove, ...]
    since: ToTime | None = None  # what a ByDuration meant when the plan was made

    def describe(self) -> str:
        when = f", since {self.since.at.isoformat()}" if self.since is not None else ""
        return self.target.describe() + when

    def offsets(self) -> dict[TopicPartition, int]:
        return {move.tp: move.after for move in self.moves}

    def topics(self) -> list[str]:
        return list(dict.fromkeys(move.topic for move in self.moves))


# -- Kafka ----------------------------------------------------------------------------------------


async def live_members(admin: AIOKafkaAdminClient, group: str) -> tuple[str, list[str]]:
    """The group's state and a description of each live member (client id and host)."""
    [response] = await admin.describe_consumer_groups([group])
    described: dict[str, Any] = response.to_object()
    for entry in described["groups"]:
        if entry["group"] != group:
            continue
        if entry["error_code"]:
            raise ReplayError(f"describing group {group} failed: error {entry['error_code']}")
        members = [
            f"{m['client_id'] or m['member_id']}@{m['client_host'] or '?'}"
            for m in entry["members"]
        ]
        return str(entry["state"]), members
    return "Dead", []


async def refuse_if_live(admin: AIOKafkaAdminClient, group: str) -> None:
    state, members = await live_members(admin, group)
    if members:
        raise GroupHasLiveMembers(group, state, members)


def offsets_consumer(settings: KafkaSettings, group: str) -> AIOKafkaConsumer:
    """Carries the group id to read and commit its offsets; never subscribes, so never joins."""
    return AIOKafkaConsumer(
        **connection_kwargs(settings),
        client_id=client_id(settings, "replay"),
        group_id=group_name(settings, group),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=settings.request_timeout_ms,
        # Only the fetch response's high watermark is wanted, not the records.
        max_partition_fetch_bytes=1024,
    )


async def committed_offsets(
    consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, int | None]:
    result: dict[TopicPartition, int | None] = {}
    for tp in partitions:
        offset = await consumer.committed(tp)
        result[tp] = offset if isinstance(offset, int) and offset >= 0 else None
    return result


async def fetched_end_offsets(
    consumer: AIOKafkaConsumer, earliest: dict[TopicPartition, int], timeout_s: float
) -> dict[TopicPartition, int]:
    """Each partition's high watermark, from fetch responses (read from the earliest offset)."""
    for tp, offset in earliest.items():
        consumer.seek(tp, offset)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        ends = {tp: consumer.highwater(tp) for tp in earliest}
        if all(end is not None for end in ends.values()):
            return {tp: int(end) for tp, end in ends.items() if end is not None}
        if loop.time() > deadline:
            missing = sorted(
                f"{tp.topic}:{tp.partition}" for tp, end in ends.items() if end is None
            )
            raise ReplayError(f"no fetch response for partitions {missing} in {timeout_s}s")
        await consumer.getmany(timeout_ms=200)


async def group_topics(admin: AIOKafkaAdminClient, group: str) -> list[str]:
    """``--all-topics``: every topic the group (its name on the broker) has offsets for."""
    try:
        found = await admin.list_consumer_group_offsets(group)
    except KafkaError as exc:
        raise ReplayError(
            f"cannot list the offsets of group {group} ({exc!r}): name --topic"
        ) from exc
    topics = sorted({tp.topic for tp, meta in found.items() if meta.offset >= 0})
    if not topics:
        raise ReplayError(f"group {group} has no committed offsets: nothing to move")
    return topics


async def partitions_to_move(
    admin: AIOKafkaAdminClient, group: str, topics: Sequence[str] | None, target: Target
) -> list[TopicPartition]:
    """The partitions of ``topics`` (None: the group's), or those ``--from-file`` names."""
    if isinstance(target, FromFile):
        wanted = sorted({tp.topic for tp in target.offsets})
    elif topics is None:
        wanted = await group_topics(admin, group)
    else:
        wanted = list(dict.fromkeys(topics))
    partitions: list[TopicPartition] = []
    for topic in wanted:
        numbers = await partition_numbers(admin, topic)
        if not numbers:
            raise ReplayError(f"topic {topic} does not exist")
        if isinstance(target, FromFile):
            named = sorted(tp.partition for tp in target.offsets if tp.topic == topic)
            unknown = sorted(set(named) - set(numbers))
            if unknown:
                raise ReplayError(f"{target.path}: topic {topic} has no partitions {unknown}")
            numbers = named
        partitions.extend(TopicPartition(topic, n) for n in sorted(numbers))
    return partitions


async def plan_replay(
    settings: Settings,
    group: str,
    topics: Sequence[str] | None,
    target: Target,
    now: datetime | None = None,
) -> ReplayPlan:
    """Read the group's offsets on ``topics`` (broker names; None: every topic it committed
    on) and compute where ``target`` moves them. ``group`` as sms-bridge names it."""
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        partitions = await partitions_to_move(
            admin, group_name(settings.kafka, group), topics, target
        )
    finally:
        await admin.close()
    since = target.since(now or datetime.now(UTC)) if isinstance(target, ByDuration) else None
    consumer = offsets_consumer(settings.kafka, group)
    await consumer.start()
    try:
        moves = await _moves(consumer, partitions, since or target, tansu=is_tansu(settings.kafka))
    finally:
        await consumer.stop()
    return ReplayPlan(group, target, moves, since)


async def _moves(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], target: Target, *, tansu: bool
) -> tuple[PartitionMove, ...]:
    consumer.assign(partitions)
    before = await committed_offsets(consumer, partitions)
    beginnings = await consumer.beginning_offsets(partitions)
    earliest = {tp: int(offset) for tp, offset in beginnings.items()}
    if tansu:
        ends = await fetched_end_offsets(consumer, earliest, END_OFFSETS_TIMEOUT_S)
    else:
        ends = {tp: int(end) for tp, end in (await consumer.end_offsets(partitions)).items()}
    at_time: dict[TopicPartition, tuple[int, int]] = {}
    if isinstance(target, ToTime):
        found = await consumer.offsets_for_times({tp: target.timestamp_ms for tp in partitions})
        at_time = {tp: (hit.offset, hit.timestamp) for tp, hit in found.items() if hit is not None}
    return tuple(
        PartitionMove(
            topic=tp.topic,
            partition=tp.partition,
            before=before[tp],
            after=target_offset(target, tp, earliest[tp], ends[tp], before[tp], at_time.get(tp)),
            earliest=earliest[tp],
            end=ends[tp],
        )
        for tp in partitions
    )


async def apply_plan(settings: Settings, plan: ReplayPlan) -> dict[TopicPartition, int | None]:
    """Commit the plan's offsets for its group, all in one commit; returns them read back."""
    consumer = offsets_consumer(settings.kafka, plan.group)
    await consumer.start()
    try:
        offsets = plan.offsets()
        consumer.assign(list(offsets))
        await consumer.commit({tp: OffsetAndMetadata(offset, "") for tp, offset in offsets.items()})
        return await committed_offsets(consumer, offsets)
    finally:
        await consumer.stop()


async def replay(
    settings: Settings,
    group: str,
    topics: str | Sequence[str] | None,
    target: Target,
    *,
    execute: bool,
    export: str | None = None,
    out: TextIO = sys.stdout,
) -> ReplayPlan:
    """Check the group is stopped, plan, print, export the offsets before the move if asked, and
    with ``execute`` commit the move.

    ``execute`` has no default, as the command line's ``--execute``: a call that forgets it must
    not quietly plan only (or quietly commit). ``group`` is the name sms-bridge gives it,
    ``topics`` the topics' names on the broker (None: every topic the group committed on;
    ignored for ``FromFile``). Raises ``GroupHasLiveMembers`` (nothing changed) or
    ``ReplayError``.
    """
    names = [topics] if isinstance(topics, str) else topics
    on_broker = group_name(settings.kafka, group)
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        await refuse_if_live(admin, on_broker)
        plan = await plan_replay(settings, group, names, target)
        if export is not None:
            write_offsets_file(export, ((move.tp, move.undo) for move in plan.moves))
        if not execute:
            print_plan(plan, out)
            if export is not None:
                print(f"offsets before the move saved to {export}", file=out)
            print("plan only, nothing committed: add --execute to commit it", file=out)
            return plan
        # A member may have started while we planned; Kafka would refuse the commit anyway.
        await refuse_if_live(admin, on_broker)
        read_back = await apply_plan(settings, plan)
    finally:
        await admin.close()
    print_plan(plan, out, read_back)
    wrong = [
        f"{tp.topic}:{tp.partition}"
        for tp, offset in read_back.items()
        if offset != plan.offsets()[tp]
    ]
    if wrong:
        raise ReplayError(f"committed offsets read back differ on partitions {wrong}")
    if export is not None:
        print(
            f"offsets before the move saved to {export}; to undo: smsbridge replay --group "
            f"{group} --from-file {export} --execute",
            file=out,
        )
    print(f"committed: {sum(m.to_read for m in plan.moves)} records to read again", file=out)
    return plan


def print_plan(
    plan: ReplayPlan, out: TextIO, read_back: dict[TopicPartition, int | None] | None = None
) -> None:
    """Per topic, its header and each partition before and after (read back when committed)."""
    for topic in plan.topics():
        print(f"group {plan.group}, topic {topic}: {plan.describe()}", file=out)
        print_moves([move for move in plan.moves if move.topic == topic], out, read_back)


def print_moves(
    moves: Sequence[PartitionMove],
    out: TextIO,
    read_back: dict[TopicPartition, int | None] | None = None,
) -> None:
    print(f"{'partition':>9} {'before':>10} {'after':>10} {'end':>10} {'to read':>10}", file=out)
    for move in moves:
        before = "-" if move.before is None else str(move.before)
        after = move.after
        if read_back is not None:
            found = read_back.get(move.tp)
            after = -1 if found is None else found
        print(
            f"{move.partition:>9} {before:>10} {after:>10} {move.end:>10} {move.to_read:>10}",
            file=out,
        )
    print(f"{'total':>9} {'':>10} {'':>10} {'':>10} {sum(m.to_read for m in moves):>10}", file=out)


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Move a stopped consumer group's committed offsets, as kafka-consumer-groups "
        "--reset-offsets does: prints the move per partition (before and after) and commits it "
        "only with --execute. Refuses while the group has live members. See docs/replay.md."
    )
    parser.add_argument("--group", required=True, help="consumer group, e.g. smsbridge-normalizer")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--topic",
        action="append",
        metavar="TOPIC",
        help="a topic whose offsets move, without [kafka] topic_prefix; repeat for several",
    )
    scope.add_argument(
        "--all-topics",
        action="store_true",
        help="every topic the group has committed offsets for",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--to-time",
        "--to-datetime",
        type=parse_time,
        metavar="ISO",
        help="first record at or after this time (ISO 8601; UTC if no offset is given)",
    )
    where.add_argument(
        "--by-duration",
        type=parse_duration,
        metavar="DURATION",
        help="first record of the last DURATION (ISO 8601: PT2H, PT90M, P1DT12H): an outage window",
    )
    where.add_argument("--to-offset", type=int, metavar="N", help="offset N of every partition")
    where.add_argument(
        "--shift-by", type=int, metavar="N", help="committed offset + N (N may be negative)"
    )
    where.add_argument(
        "--from-beginning", "--to-earliest", action="store_true", help="earliest offsets"
    )
    where.add_argument(
        "--to-latest", action="store_true", help="end offsets: skip what is not read yet"
    )
    where.add_argument(
        "--from-file",
        metavar="FILE",
        help="the offsets in FILE (topic,partition,offset lines, as --export writes and "
        "kafka-consumer-groups --export prints); names its own topics",
    )
    parser.add_argument(
        "--export",
        metavar="FILE",
        help="save the offsets before the move to FILE (a new file), the undo for --from-file",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--execute", action="store_true", help="commit the move (else: plan only)")
    mode.add_argument(
        "--dry-run", action="store_true", help="plan only, the default (as in Kafka's tool)"
    )


def target_from(args: argparse.Namespace, group_on_broker: str) -> Target:
    if args.to_time is not None:
        return ToTime(args.to_time)
    if args.by_duration is not None:
        duration: ByDuration = args.by_duration
        return duration
    if args.to_offset is not None:
        return ToOffset(args.to_offset)
    if args.shift_by is not None:
        return ShiftBy(args.shift_by)
    if args.to_latest:
        return ToLatest()
    if args.from_file is not None:
        return read_offsets_file(args.from_file, group_on_broker)
    return FromBeginning()


def topics_from(args: argparse.Namespace, topic_prefix: str) -> list[str] | None:
    """The topics' names on the broker, or None for ``--all-topics`` and ``--from-file``."""
    if args.from_file is not None:
        if args.topic or args.all_topics:
            raise ReplayError("--from-file names its own topics: drop --topic and --all-topics")
        return None
    if args.all_topics:
        return None
    if not args.topic:
        raise ReplayError("say which topics: --topic (repeatable) or --all-topics")
    return [topic_prefix + topic for topic in args.topic]


def cli(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    try:
        topics = topics_from(args, settings.kafka.topic_prefix)
        target = target_from(args, group_name(settings.kafka, args.group))
        asyncio.run(
            replay(settings, args.group, topics, target, execute=args.execute, export=args.export)
        )
    except ReplayError as exc:
        print(f"replay refused: {exc}", file=sys.stderr)
        return 1
    except KafkaError as exc:
        print(f"replay failed, nothing or not everything committed: {exc!r}", file=sys.stderr)
        return 1
    return 0
