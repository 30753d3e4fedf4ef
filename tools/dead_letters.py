"""``smsbridge dlq``: list dead letters and send them back to the topic they came from.

Dead letters re-driven are remembered on the compacted topic ``sms.dead-letters-redriven``, one
record per dead letter keyed by its partition and offset in ``sms.dead-letters`` (and holding its
time, so that a recreated dead-letter topic is not mistaken for the old one). A redrive publishes
a chunk of records to their topics, waits for Kafka's acknowledgement, then writes the chunk's
markers: a crash in between re-sends at most that chunk on the next redrive (every stage is
idempotent on replay), and never loses one.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from shared.config import Settings
from shared.contract.events import DeadLetter, RedriveMarker, SchemaError, decode
from shared.contract.topics import DEAD_LETTERS, DEAD_LETTERS_REDRIVEN, Topic
from shared.kafka.clients import KafkaUnavailable, make_consumer, make_producer
from shared.kafka.runner import Record
from shared.logs import mask_number
from shared.text_table import text_table
from shared.times import parse_iso


@dataclass(frozen=True)
class StoredDeadLetter:
    partition: int
    offset: int
    letter: DeadLetter
    redriven: bool = False

    @property
    def ident(self) -> str:
        """Where it sits in ``sms.dead-letters``: what a redrive remembers it by (the key of
        its ``RedriveMarker``)."""
        return f"{self.partition}:{self.offset}"


# A key segment that is a phone number: optional "+", then 7 to 15 digits.
_NUMBER_SEGMENT = re.compile(r"\+?\d{7,15}")


def mask_key(key: str | None) -> str:
    """A record key fit to print: segments (``:``-separated) that are numbers are masked."""
    if key is None:
        return "-"
    return ":".join(
        mask_number(part) if _NUMBER_SEGMENT.fullmatch(part) else part for part in key.split(":")
    )


def parse_since(text: str) -> datetime:
    """An ISO 8601 date or time; without a zone it is UTC."""
    moment = parse_iso(text)
    if moment is None:
        raise ValueError(f"not an ISO 8601 time: {text!r}")
    return moment


async def read_dead_letters(
    settings: Settings,
    *,
    source_topic: str | None = None,
    since: datetime | None = None,
) -> list[StoredDeadLetter]:
    """Every dead letter (oldest first), filtered, each marked when it was re-driven already."""
    markers = await read_redrive_markers(settings)
    found: list[StoredDeadLetter] = []
    for tp, record in await _read_to_end(settings, DEAD_LETTERS):
        try:
            letter = decode(DeadLetter, record.value)
        except SchemaError:
            continue  # not ours to show: something else wrote to the topic
        if source_topic is not None and letter.source_topic != source_topic:
            continue
        if since is not None and letter.at < since:
            continue
        marker = markers.get(f"{tp.partition}:{record.offset}")
        redriven = marker is not None and marker.dead_letter_at == letter.at
        found.append(StoredDeadLetter(tp.partition, record.offset, letter, redriven=redriven))
    found.sort(key=lambda stored: (stored.letter.at, stored.partition, stored.offset))
    return found


async def read_redrive_markers(settings: Settings) -> dict[str, RedriveMarker]:
    markers: dict[str, RedriveMarker] = {}
    for _, record in await _read_to_end(settings, DEAD_LETTERS_REDRIVEN):
        if record.key is None:
            continue
        ident = record.key.decode("utf-8", "replace")
        if record.value is None:
            markers.pop(ident, None)
            continue
        try:
            markers[ident] = decode(RedriveMarker, record.value)
        except SchemaError:
            continue
    return markers


_COLUMNS = (
    "ID",
    "TIME",
    "STAGE",
    "SOURCE TOPIC",
    "REASON",
    "ATTEMPTS",
    "STATUS",
    "KEY",
    "REDRIVEN",
)
_REASON_WIDTH = 60


def dead_letter_rows(letters: Iterable[StoredDeadLetter]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for stored in letters:
        letter = stored.letter
        reason = " ".join(letter.reason.split())
        if len(reason) > _REASON_WIDTH:
            reason = reason[: _REASON_WIDTH - 1] + "…"
        rows.append(
            (
                stored.ident,
                letter.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                letter.stage,
                letter.source_topic,
                reason,
                str(letter.attempts),
                str(letter.status_code) if letter.status_code is not None else "-",
                mask_key(letter.key),
                "yes" if stored.redriven else "-",
            )
        )
    return rows


async def dlq_list_command(
    settings: Settings,
    *,
    source_topic: str | None,
    since: datetime | None,
    limit: int,
    out: TextIO = sys.stdout,
) -> int:
    letters = await read_dead_letters(settings, source_topic=source_topic, since=since)
    shown = list(deque(letters, maxlen=max(0, limit)))
    if not shown:
        print("no dead letters", file=out)
        return 0
    print(text_table(_COLUMNS, dead_letter_rows(shown)), file=out)
    if len(shown) < len(letters):
        print(f"(the newest {len(shown)} of {len(letters)}; see --limit)", file=out)
    return 0


@dataclass(frozen=True)
class RedriveSummary:
    redriven: int
    already_redriven: int
    not_redrivable: int


ProgressCallback = Callable[[int, int], None]


async def redrive(
    settings: Settings,
    *,
    source_topic: str,
    since: datetime | None = None,
    dry_run: bool = False,
    chunk_size: int = 500,
    progress: ProgressCallback | None = None,
) -> RedriveSummary:
    """Send the dead letters of ``source_topic`` back to their ``redrive_topic``, each once.

    The original key and payload are published as they were; dead letters without a redrive
    topic are counted and left alone. ``progress(done, total)`` follows the publishing.
    """
    letters = await read_dead_letters(settings, source_topic=source_topic, since=since)
    pending = [s for s in letters if not s.redriven and s.letter.redrive_topic]
    summary = RedriveSummary(
        redriven=len(pending),
        already_redriven=sum(1 for s in letters if s.redriven),
        not_redrivable=sum(1 for s in letters if not s.redriven and not s.letter.redrive_topic),
    )
    if dry_run or not pending:
        return summary
    producer = make_producer(settings.kafka, "redrive")
    await _start_client(producer)
    try:
        done = 0
        if progress is not None:
            progress(done, len(pending))
        for start in range(0, len(pending), max(1, chunk_size)):
            chunk = pending[start : start + chunk_size]
            await _send_and_wait(
                producer,
                settings.kafka.produce_timeout_s,
                [
                    (
                        s.letter.redrive_topic,
                        s.letter.key.encode("utf-8") if s.letter.key is not None else None,
                        s.letter.payload.encode("utf-8"),
                    )
                    for s in chunk
                ],
            )
            await _send_and_wait(
                producer,
                settings.kafka.produce_timeout_s,
                [
                    (
                        DEAD_LETTERS_REDRIVEN.name,
                        s.ident.encode("utf-8"),
                        RedriveMarker(
                            dead_letter_at=s.letter.at, redrive_topic=s.letter.redrive_topic
                        ).to_bytes(),
                    )
                    for s in chunk
                ],
            )
            done += len(chunk)
            if progress is not None:
                progress(done, len(pending))
    finally:
        await producer.stop()
    return summary


async def dlq_redrive_command(
    settings: Settings,
    *,
    source_topic: str,
    since: datetime | None,
    dry_run: bool,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    bar = ProgressBar(err, label=f"redrive {source_topic}")
    summary = await redrive(
        settings, source_topic=source_topic, since=since, dry_run=dry_run, progress=bar.update
    )
    bar.finish()
    verb = "would re-drive" if dry_run else "re-drove"
    print(
        f"{verb} {summary.redriven}; already re-driven {summary.already_redriven}; "
        f"without a redrive topic {summary.not_redrivable}",
        file=out,
    )
    return 0


class ProgressBar:
    """``label [#####.....] done/total``, redrawn in place on a terminal, in lines otherwise."""

    def __init__(self, stream: TextIO, *, label: str, width: int = 30) -> None:
        self.stream = stream
        self.label = label
        self.width = width
        self._drawn = False
        self._last_line = 0.0

    def update(self, done: int, total: int) -> None:
        filled = self.width if total == 0 else self.width * done // total
        text = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}"
        if self.stream.isatty():
            self.stream.write("\r" + text)
        elif done in (0, total) or time.monotonic() - self._last_line >= 1.0:
            self.stream.write(text + "\n")
            self._last_line = time.monotonic()
        else:
            return
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self._drawn and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


async def _start_client(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    try:
        await client.start()
    except KafkaError as exc:
        await client.stop()
        raise KafkaUnavailable(f"{type(exc).__name__}: {exc}") from exc


async def _send_and_wait(
    producer: AIOKafkaProducer, timeout_s: float, records: Sequence[tuple[str, bytes | None, bytes]]
) -> None:
    futures: list[asyncio.Future[object]] = []
    try:
        for topic, key, value in records:
            futures.append(await producer.send(topic, value, key=key))
        await asyncio.wait_for(asyncio.gather(*futures), max(timeout_s, 1.0) * 3)
    except (KafkaError, TimeoutError) as exc:
        for future in futures:
            future.cancel()
        raise KafkaUnavailable(f"{type(exc).__name__}: {exc}") from exc


async def _read_to_end(
    settings: Settings, topic: Topic, stall_timeout_s: float = 30.0
) -> list[tuple[TopicPartition, Record]]:
    """Every record of ``topic`` up to its high watermark (no consumer group, nothing committed).

    The end comes from the fetch responses' high watermark: Tansu cannot list the latest offsets.
    """
    consumer = make_consumer(settings.kafka, None, role="admin-read")
    await _start_client(consumer)
    found: list[tuple[TopicPartition, Record]] = []
    try:
        numbers = consumer.partitions_for_topic(topic.name) or set(range(topic.partitions))
        remaining = {TopicPartition(topic.name, p) for p in numbers}
        consumer.assign(sorted(remaining, key=lambda tp: tp.partition))
        await consumer.seek_to_beginning(*remaining)
        last_progress = time.monotonic()
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=200, max_records=10_000)
            for tp, records in batches.items():
                found.extend((tp, record) for record in records)
                last_progress = time.monotonic()
            for tp in list(remaining):
                highwater = consumer.highwater(tp)
                if highwater is not None and await consumer.position(tp) >= highwater:
                    remaining.discard(tp)
            if time.monotonic() - last_progress > stall_timeout_s:
                raise KafkaUnavailable(f"{topic.name}: no progress reading for {stall_timeout_s}s")
    except KafkaError as exc:
        raise KafkaUnavailable(f"{type(exc).__name__}: {exc}") from exc
    finally:
        await consumer.stop()
    return found
