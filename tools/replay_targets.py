"""Where ``smsbridge replay`` moves each partition, and its offsets files: plain functions.

Each target means what the ``kafka-consumer-groups --reset-offsets`` option of the same name
means (``tests/integration/test_kafka_tools.py`` compares them on a real broker): every offset is
clamped to the partition's earliest and end offsets, ``--shift-by`` needs a committed offset,
``--by-duration`` is a time ``now - duration`` away. The offsets file is the tool's CSV
(``topic,partition,offset``, topic names as the broker has them), so either tool reads the
other's files.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from aiokafka import TopicPartition

from shared.times import parse_iso


class ReplayError(Exception):
    """The replay cannot be done; the message says why."""


@dataclass(frozen=True)
class FromBeginning:
    def describe(self) -> str:
        return "to the earliest offsets"


@dataclass(frozen=True)
class ToLatest:
    def describe(self) -> str:
        return "to the end offsets (nothing left to read)"


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


@dataclass(frozen=True)
class ByDuration:
    """The records of the last ``duration``: resolved to a ``ToTime`` when the plan is made."""

    text: str  # as the operator wrote it, for the plan's header
    duration: timedelta

    def since(self, now: datetime) -> ToTime:
        return ToTime(now - self.duration)

    def describe(self) -> str:
        return f"to the first record of the last {self.text} ({self.duration})"


@dataclass(frozen=True)
class ShiftBy:
    shift: int

    def describe(self) -> str:
        return f"shifted by {self.shift:+d} from the committed offsets"


@dataclass(frozen=True)
class FromFile:
    path: str
    offsets: Mapping[TopicPartition, int]

    def describe(self) -> str:
        return f"to the offsets in {self.path}"


Target = FromBeginning | ToLatest | ToOffset | ToTime | ByDuration | ShiftBy | FromFile


def clamp(offset: int, earliest: int, end: int) -> int:
    """Kafka's ``checkOffsetsRange``: below the log start is the start, past the end the end."""
    return min(max(offset, earliest), end)


def target_offset(
    target: Target,
    tp: TopicPartition,
    earliest: int,
    end: int,
    committed: int | None,
    found_at_time: tuple[int, int] | None = None,
) -> int:
    """Where ``target`` puts partition ``tp``, which holds ``earliest`` .. ``end`` - 1.

    ``found_at_time`` is ``offsets_for_times``' answer (offset, record timestamp) for a time
    target (a ``ByDuration`` must be resolved to one first); None is "no record at or after it".
    """
    if isinstance(target, FromBeginning):
        return earliest
    if isinstance(target, ToLatest):
        return end
    if isinstance(target, ToOffset):
        return clamp(target.offset, earliest, end)
    if isinstance(target, ShiftBy):
        if committed is None:
            raise ReplayError(
                f"cannot shift {tp.topic} partition {tp.partition}: the group has no committed "
                "offset there (as kafka-consumer-groups --shift-by)"
            )
        return clamp(committed + target.shift, earliest, end)
    if isinstance(target, FromFile):
        return clamp(target.offsets[tp], earliest, end)
    if isinstance(target, ByDuration):
        raise TypeError("resolve a ByDuration to a ToTime (ByDuration.since) first")
    if found_at_time is None:
        return end
    offset, timestamp_ms = found_at_time
    if timestamp_ms < target.timestamp_ms:  # Tansu's way of saying "no such record"
        return end
    return clamp(offset, earliest, end)


def parse_time(text: str) -> datetime:
    """ISO 8601; a time without an offset is taken as UTC."""
    moment = parse_iso(text)
    if moment is None:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}")
    return moment


# Java's Duration.parse, which kafka-consumer-groups --by-duration uses: PnDTnHnMn.nS, each part
# optional but at least one, any case, signs allowed on each number.
_DURATION = re.compile(
    r"([-+]?)P(?:([-+]?\d+)D)?"
    r"(?:T(?:([-+]?\d+)H)?(?:([-+]?\d+)M)?(?:([-+]?\d+)(?:[.,](\d{0,9}))?S)?)?",
    re.IGNORECASE,
)


def parse_duration(text: str) -> ByDuration:
    """``--by-duration``: an ISO 8601 duration as Kafka's tool reads it (PT2H, P1DT12H, PT90M).

    A negative duration would point into the future (every partition at its end): refused, it is
    surely a typo.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None or text.strip().upper().endswith("T") or not any(match.group(2, 3, 4, 5)):
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 duration such as PT2H, PT90M or P1DT12H: {text!r}"
        )
    sign, days, hours, minutes, seconds, fraction = match.groups()
    duration = timedelta(
        days=int(days or 0),
        hours=int(hours or 0),
        minutes=int(minutes or 0),
        seconds=float(f"{seconds or 0}.{fraction or 0}"),  # "-1.5S" is minus 1.5 s, as in Java
    )
    if sign == "-":
        duration = -duration
    if duration < timedelta(0):
        raise argparse.ArgumentTypeError(
            f"--by-duration counts back from now and must not be negative: {text!r}"
        )
    return ByDuration(text.strip(), duration)


# -- offsets files --------------------------------------------------------------------------------


def offsets_csv(offsets: Iterable[tuple[TopicPartition, int]]) -> str:
    """kafka-consumer-groups' CSV for one group: ``topic,partition,offset`` a line, no header."""
    return "".join(f"{tp.topic},{tp.partition},{offset}\n" for tp, offset in offsets)


def parse_offsets_csv(text: str, group: str, source: str) -> dict[TopicPartition, int]:
    """Read an offsets file: ``topic,partition,offset`` lines, or kafka-consumer-groups'
    several-group form ``group,topic,partition,offset``, of which the lines of ``group`` (its
    name on the broker) are kept."""
    offsets: dict[TopicPartition, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 4:
            if fields[0] != group:
                continue
            fields = fields[1:]
        if len(fields) != 3 or not fields[0]:
            raise ReplayError(f"{source} line {number}: expected topic,partition,offset")
        topic, partition, offset = fields
        if not (partition.isdigit() and offset.isdigit()):
            raise ReplayError(f"{source} line {number}: partition and offset must be numbers >= 0")
        tp = TopicPartition(topic, int(partition))
        if tp in offsets:
            raise ReplayError(f"{source} line {number}: {topic} partition {partition} again")
        offsets[tp] = int(offset)
    if not offsets:
        raise ReplayError(f"{source} holds no offsets for group {group}")
    return offsets


def read_offsets_file(path: str, group: str) -> FromFile:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ReplayError(f"cannot read {path}: {exc.strerror}") from None
    return FromFile(path, parse_offsets_csv(text, group, path))


def write_offsets_file(path: str, offsets: Iterable[tuple[TopicPartition, int]]) -> None:
    """Never overwrites: an existing file may be the undo of an earlier move."""
    try:
        with Path(path).open("x", encoding="utf-8") as out:
            out.write(offsets_csv(offsets))
    except FileExistsError:
        raise ReplayError(
            f"{path} exists and is kept (it may be the undo of an earlier move): "
            "export to another file"
        ) from None
    except OSError as exc:
        raise ReplayError(f"cannot write {path}: {exc.strerror}") from None
