"""Test support for operations tests: config files for service subprocesses, topic tails, groups.

Used by the shutdown, replay and scale-out tests; nothing here mocks Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Generic

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from bench.stack import to_toml
from shared.config import Settings, load_settings
from shared.contract.events import (
    DispatchRecord,
    E,
    MessageContext,
    ProviderEvent,
    RecipientMessage,
    StatusEvent,
    decode,
    utcnow,
)
from shared.contract.topics import DISPATCHES, PROVIDER_EVENTS, STATUSES, Topic
from shared.kafka.clients import (
    OutRecord,
    Publisher,
    bootstrap,
    group_name,
    make_admin,
    make_producer,
)
from shared.providers.otpiq import FIXTURES, Otpiq
from tests.support import TENANT, settings_data, wait_for
from tools.replay import committed_offsets, live_members, offsets_consumer

REPO = Path(__file__).resolve().parents[2]
ACCOUNT = "otpiq-main"
# Short sessions: a member that vanished without leaving is replaced quickly.
QUICK_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


def config_data(
    *, optimove_url: str = "http://127.0.0.1:9", overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The configuration of tests.support.make_settings as TOML-ready data (inline secrets)."""
    return {"log_level": "INFO", **settings_data(optimove_url=optimove_url, overrides=overrides)}


def write_config(path: Path, data: Mapping[str, Any]) -> Settings:
    """Write ``data`` as a TOML file and load it the way ``smsbridge --config`` does."""
    path.write_text(to_toml(data), encoding="utf-8")
    return load_settings(path)


async def smsbridge(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the command line in its own process; (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tools.cli",
        *argv,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# -- records ---------------------------------------------------------------------------------------


def recipient(
    index: int,
    number: str,
    text: str = "Your order has shipped",
    *,
    tenant: str = TENANT,
    sender_id: str = "ACME",
    scheduled_at: datetime | None = None,
    accepted_at: datetime | None = None,
) -> RecipientMessage:
    return RecipientMessage(
        context=MessageContext(
            tenant=tenant,
            message_id=f"m-test-{index}",
            batch_id="batch-1",
            request_id="request-1",
            mobile_number=number.lstrip("+"),
            metadata_json='{"campaign": 1}',
        ),
        destination=number,
        text=text,
        sender_id=sender_id,
        scheduled_at=scheduled_at,
        accepted_at=accepted_at or utcnow(),
    )


def context(message_id: str, campaign: str = "spring") -> MessageContext:
    return MessageContext(
        tenant=TENANT,
        message_id=message_id,
        batch_id="batch-1",
        campaign_id=campaign,
        customer_id=f"cust-{message_id}",
        mobile_number="447700900123",
        metadata_json=orjson.dumps({"campaignId": campaign}).decode(),
    )


def accepted_dispatch(message_id: str, sms_id: str) -> DispatchRecord:
    return DispatchRecord(
        context=context(message_id),
        correlation_key=Otpiq.correlation_key(ACCOUNT, sms_id, ""),
        outcome="accepted",
        sub_status="Sent",
        provider_kind="otpiq",
        provider_account=ACCOUNT,
        provider_message_id=sms_id,
        destination="+447700900123",
    )


def delivered_callback(sms_id: str) -> ProviderEvent:
    """The event the callbacks service stores for OTPIQ's delivered callback."""
    from services.callbacks.app import provider_events

    body = orjson.dumps({**FIXTURES["callback_delivered"], "smsId": sms_id})
    [event] = provider_events(
        Otpiq, ACCOUNT, body, Otpiq.parse_callback(body, "application/json"), utcnow()
    )
    return event


def status_event(message_id: str, status: str, sub_status: str) -> StatusEvent:
    return StatusEvent(
        event_id=f"e-{message_id}-{status}",
        context=context(message_id),
        status=status,  # type: ignore[arg-type]
        sub_status=sub_status,
        provider_message_id=f"p-{message_id}",
    )


def dispatch_records(items: Iterable[DispatchRecord | ProviderEvent]) -> list[OutRecord]:
    return [
        OutRecord(
            DISPATCHES if isinstance(item, DispatchRecord) else PROVIDER_EVENTS,
            item.correlation_key,
            item,
        )
        for item in items
    ]


def status_records(events: Iterable[StatusEvent]) -> list[OutRecord]:
    return [OutRecord(STATUSES, e.context.message_id, e) for e in events]


@contextlib.asynccontextmanager
async def publisher(settings: Settings) -> AsyncIterator[Publisher]:
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    try:
        yield Publisher(producer, 10.0)
    finally:
        await producer.stop()


# -- reading ---------------------------------------------------------------------------------------


class TopicTail(Generic[E]):
    """Reads a whole topic from the beginning in the background while the test goes on."""

    def __init__(self, settings: Settings, topic: Topic, model: type[E]) -> None:
        self.settings = settings
        self.topic = topic
        self.model = model
        self.records: list[tuple[str | None, E]] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> TopicTail[E]:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap(self.settings.kafka), enable_auto_commit=False
        )
        await self._consumer.start()
        partitions = [TopicPartition(self.topic.name, p) for p in range(self.topic.partitions)]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        self._task = asyncio.create_task(self._read(self._consumer))
        return self

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    key = record.key.decode() if record.key is not None else None
                    self.records.append((key, decode(self.model, record.value)))

    async def wait_count(self, count: int, timeout_s: float = 60.0) -> None:
        await wait_for(
            lambda: len(self.records) >= count,
            timeout_s,
            lambda: f"{count} records on {self.topic.name} (have {len(self.records)})",
        )

    async def settle(self, quiet_s: float = 1.0, timeout_s: float = 30.0) -> None:
        """Wait until nothing new arrived for ``quiet_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        seen, since = len(self.records), loop.time()
        while loop.time() - since < quiet_s:
            if loop.time() > deadline:
                raise AssertionError(f"{self.topic.name} still growing after {timeout_s}s")
            await asyncio.sleep(0.1)
            if len(self.records) != seen:
                seen, since = len(self.records), loop.time()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


# -- service processes -----------------------------------------------------------------------------


async def start_service(
    config: Path, service: str, *, log: Path | None = None, tmp_dir: Path | None = None
) -> asyncio.subprocess.Process:
    """``smsbridge --config CONFIG run SERVICE`` in a process of its own (the environment carries
    the embedded broker's address), its output appended to ``log`` or dropped. ``tmp_dir`` takes
    the private temporary files of a process that may be killed, out of the machine's /tmp."""
    env = {**os.environ, **({"TMPDIR": str(tmp_dir)} if tmp_dir is not None else {})}
    with contextlib.ExitStack() as files:
        output = files.enter_context(log.open("ab")) if log else asyncio.subprocess.DEVNULL
        return await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "tools.cli", "--config", str(config), "run", service),
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=output,
        )


async def stop_service(process: asyncio.subprocess.Process, timeout_s: float = 40.0) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within ``timeout_s``."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()


async def wait_ready(url: str, process: asyncio.subprocess.Process, timeout_s: float) -> None:
    """Poll ``/readyz`` until 200 (partitions assigned), failing early if the process died."""
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            if process.returncode is not None:
                raise AssertionError(f"service exited early with code {process.returncode}")
            try:
                async with session.get(url) as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(ready, timeout_s, f"{url} to be ready", every_s=0.2)


# -- consumer groups -------------------------------------------------------------------------------


async def group_members(settings: Settings, group: str) -> list[str]:
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        _, members = await live_members(admin, group_name(settings.kafka, group))
        return members
    finally:
        await admin.close()


async def committed(settings: Settings, group: str, topic: Topic) -> dict[int, int | None]:
    """The group's committed offset per partition of ``topic`` (the group must not be running)."""
    consumer = offsets_consumer(settings.kafka, group)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        consumer.assign(partitions)
        found = await committed_offsets(consumer, partitions)
        return {tp.partition: offset for tp, offset in found.items()}
    finally:
        await consumer.stop()


async def commit(settings: Settings, group: str, offsets: Mapping[TopicPartition, int]) -> None:
    """Commit ``offsets`` for ``group`` as if it had read that far (it must not be running)."""
    consumer = offsets_consumer(settings.kafka, group)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
    finally:
        await consumer.stop()


def total(offsets: Mapping[int, int | None]) -> int:
    return sum(offset or 0 for offset in offsets.values())


__all__ = [
    "ACCOUNT",
    "QUICK_GROUP",
    "TopicTail",
    "accepted_dispatch",
    "commit",
    "committed",
    "config_data",
    "delivered_callback",
    "dispatch_records",
    "group_members",
    "publisher",
    "start_service",
    "status_event",
    "status_records",
    "stop_service",
    "to_toml",
    "total",
    "wait_ready",
    "write_config",
]
