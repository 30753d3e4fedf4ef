"""``smsbridge replay``: move a stopped consumer group's committed offsets on one topic.

The group must have no live member (they would commit over us, and Kafka refuses a commit from
outside a group with members): checked before planning and again right before committing.
Replaying is safe by design of the stages (docs/architecture.md, Guarantees).

Committed offsets are read and written by a consumer that carries the group id but never joins
(manual assignment + ``committed``/``commit``): the admin client's
``list_consumer_group_offsets`` cannot decode Tansu's answer. A partition's end comes from
ListOffsets, on Tansu from a fetch response's high watermark. ``offsets_for_times`` answers a time
past the last record with no offset on Apache Kafka but offset 0 on Tansu: an answer whose
timestamp is before the time asked for means "no such record" here too. ``--group`` and
``--topic`` are the names sms-bridge uses; ``[kafka]`` prefixes are added here.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from shared.config import KafkaSettings, Settings, load_settings
from shared.contract.topics import partition_numbers
from shared.kafka.clients import bootstrap, client_id, group_name, is_tansu, make_admin
from shared.times import parse_iso

# How long to wait for a fetch response that tells each partition's end.
END_OFFSETS_TIMEOUT_S = 15.0


class ReplayError(Exception):
    """The replay cannot be done; the message says why."""


class GroupHasLiveMembers(ReplayError):
    def __init__(self, group: str, state: str, members: Sequence[str]) -> None:
        super().__init__(
            f"consumer group {group} has {len(members)} live member(s) (state {state}: "
            f"{', '.join(members)}); stop every instance of the service first"
        )
        self.members = list(members)


@dataclass(frozen=True)
class FromBeginning:
    def describe(self) -> str:
        return "from the beginning"


@dataclass(frozen=True)
class ToOffset:
    offset: int

    def describe(self) -> str:
        return f"to offset {self.offset} of every partition"


@dataclass(frozen=True)
class ToTime:
    at: datetime

    @property
    def timestamp_ms(self) -> int:
        return int(self.at.timestamp() * 1000)

    def describe(self) -> str:
        return f"to the first record at or after {self.at.isoformat()}"


Target = FromBeginning | ToOffset | ToTime


@dataclass(frozen=True)
class PartitionMove:
    partition: int
    before: int | None  # committed offset, None when the group never committed one
    after: int
    earliest: int
    end: int

    @property
    def to_read(self) -> int:
        """Records the group will read from this partition once restarted."""
        return max(0, self.end - self.after)


@dataclass(frozen=True)
class ReplayPlan:
    group: str
    topic: str
    target: Target
    moves: tuple[PartitionMove, ...]

    def offsets(self) -> dict[TopicPartition, int]:
        return {TopicPartition(self.topic, move.partition): move.after for move in self.moves}


def parse_time(text: str) -> datetime:
    """ISO 8601; a time without an offset is taken as UTC."""
    moment = parse_iso(text)
    if moment is None:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}")
    return moment


def target_offset(
    target: Target, earliest: int, end: int, found_at_time: tuple[int, int] | None = None
) -> int:
    """Where ``target`` puts a partition holding ``earliest`` .. ``end`` - 1.

    ``found_at_time`` is ``offsets_for_times``' answer (offset, record timestamp) for a ``ToTime``.
    """
    if isinstance(target, FromBeginning):
        return earliest
    if isinstance(target, ToOffset):
        return min(max(target.offset, earliest), end)
    if found_at_time is None:
        return end
    offset, timestamp_ms = found_at_time
    if timestamp_ms < target.timestamp_ms:  # Tansu's way of saying "no such record"
        return end
    return min(max(offset, earliest), end)


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
        bootstrap_servers=bootstrap(settings),
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
            missing = sorted(tp.partition for tp, end in ends.items() if end is None)
            raise ReplayError(f"no fetch response for partitions {missing} in {timeout_s}s")
        await consumer.getmany(timeout_ms=200)


async def plan_replay(settings: Settings, group: str, topic: str, target: Target) -> ReplayPlan:
    """Read the group's offsets on ``topic`` and compute where ``target`` moves them."""
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        numbers = await partition_numbers(admin, topic)
    finally:
        await admin.close()
    if not numbers:
        raise ReplayError(f"topic {topic} does not exist")
    consumer = offsets_consumer(settings.kafka, group)
    await consumer.start()
    try:
        return await _plan(consumer, group, topic, numbers, target, tansu=is_tansu(settings.kafka))
    finally:
        await consumer.stop()


async def _plan(
    consumer: AIOKafkaConsumer,
    group: str,
    topic: str,
    numbers: list[int],
    target: Target,
    *,
    tansu: bool,
) -> ReplayPlan:
    partitions = sorted((TopicPartition(topic, n) for n in numbers), key=lambda tp: tp.partition)
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
    moves = tuple(
        PartitionMove(
            partition=tp.partition,
            before=before[tp],
            after=target_offset(target, earliest[tp], ends[tp], at_time.get(tp)),
            earliest=earliest[tp],
            end=ends[tp],
        )
        for tp in partitions
    )
    return ReplayPlan(group, topic, target, moves)


async def apply_plan(settings: Settings, plan: ReplayPlan) -> dict[TopicPartition, int | None]:
    """Commit the plan's offsets for its group; returns the offsets read back afterwards."""
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
    topic: str,
    target: Target,
    *,
    dry_run: bool = False,
    out: TextIO = sys.stdout,
) -> ReplayPlan:
    """Check the group is stopped, plan, print, and (unless ``dry_run``) commit the move.

    Raises ``GroupHasLiveMembers`` (nothing changed) or ``ReplayError``. ``group`` is the name
    sms-bridge gives it, ``topic`` the topic's name on the broker.
    """
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        await refuse_if_live(admin, group_name(settings.kafka, group))
        plan = await plan_replay(settings, group, topic, target)
        print(f"group {group}, topic {topic}: {target.describe()}", file=out)
        if dry_run:
            print_moves(plan.moves, out)
            print("dry run: nothing committed", file=out)
            return plan
        # A member may have started while we planned; Kafka would refuse the commit anyway.
        await refuse_if_live(admin, group_name(settings.kafka, group))
        read_back = await apply_plan(settings, plan)
    finally:
        await admin.close()
    print_moves(plan.moves, out, read_back)
    wrong = [tp.partition for tp, offset in read_back.items() if offset != plan.offsets()[tp]]
    if wrong:
        raise ReplayError(f"committed offsets read back differ on partitions {wrong}")
    print(f"committed: {sum(m.to_read for m in plan.moves)} records to read again", file=out)
    return plan


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
            found = next((o for tp, o in read_back.items() if tp.partition == move.partition), None)
            after = -1 if found is None else found
        print(
            f"{move.partition:>9} {before:>10} {after:>10} {move.end:>10} {move.to_read:>10}",
            file=out,
        )
    print(f"{'total':>9} {'':>10} {'':>10} {'':>10} {sum(m.to_read for m in moves):>10}", file=out)


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Move a stopped consumer group's committed offsets on one topic, printing them before "
        "and after per partition. Refuses while the group has live members."
    )
    parser.add_argument("--group", required=True, help="consumer group, e.g. smsbridge-normalizer")
    parser.add_argument("--topic", required=True, help="topic whose offsets move")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--to-time",
        type=parse_time,
        metavar="ISO",
        help="first record at or after this time (ISO 8601; UTC if no offset is given)",
    )
    where.add_argument("--to-offset", type=int, metavar="N", help="offset N of every partition")
    where.add_argument("--from-beginning", action="store_true", help="earliest offsets")
    parser.add_argument("--dry-run", action="store_true", help="print the move, commit nothing")


def target_from(args: argparse.Namespace) -> Target:
    if args.to_time is not None:
        return ToTime(args.to_time)
    if args.to_offset is not None:
        return ToOffset(args.to_offset)
    return FromBeginning()


def cli(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    try:
        asyncio.run(
            replay(
                settings,
                args.group,
                settings.kafka.topic_prefix + args.topic,
                target_from(args),
                dry_run=args.dry_run,
            )
        )
    except ReplayError as exc:
        print(f"replay refused: {exc}", file=sys.stderr)
        return 1
    except KafkaError as exc:
        print(f"replay failed, nothing or not everything committed: {exc!r}", file=sys.stderr)
        return 1
    return 0
