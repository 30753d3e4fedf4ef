"""Test support: settings factories, in-process services, topic readers, free ports."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic

from bench.stack import deep_merge
from shared.config import Settings
from shared.contract.events import E, decode
from shared.contract.topics import Topic, wait_for_leaders
from shared.kafka.broker import free_port
from shared.kafka.clients import bootstrap, make_admin
from shared.kafka.service import Startable

S = TypeVar("S", bound=Startable)

TENANT = "acme"
TENANT_SECRET = "acme-shared-secret"
TENANT_API_TOKEN = "acme-api-token"
AGGREGATOR_API_KEY = "acme-aggregator-key"
CALLBACK_TOKEN = "cb-token-otpiq"
OTPIQ_WEBHOOK_SECRET = "otpiq-webhook-secret"


def make_settings(
    *,
    optimove_url: str = "http://127.0.0.1:9",
    provider_url: str = "http://127.0.0.1:9",
    callbacks_url: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """A complete configuration for one tenant ``acme`` routed to OTPIQ account ``otpiq-main``.

    Every listen address is a free loopback port; ``overrides`` is deep-merged on top.
    """
    return Settings(
        **settings_data(
            optimove_url=optimove_url,
            provider_url=provider_url,
            callbacks_url=callbacks_url,
            overrides=overrides,
        )
    )


def distinct_free_ports(count: int) -> list[int]:
    """``count`` free loopback ports, no two alike."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def settings_data(
    *,
    optimove_url: str = "http://127.0.0.1:9",
    provider_url: str = "http://127.0.0.1:9",
    callbacks_url: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The data of ``make_settings`` (also what the operations tests write as a config file)."""
    # Distinct: the system may hand out a port it just handed out, and two listeners of one
    # service on one port are refused.
    ports = iter(distinct_free_ports(8))
    callbacks_listen = f"127.0.0.1:{next(ports)}"
    data: dict[str, Any] = {
        # Loopback servers and simulators speak plain HTTP.
        "allow_plain_http": True,
        "kafka": {"bootstrap_servers": "embedded"},
        "ingress": {
            "listen": f"127.0.0.1:{next(ports)}",
            "ops_listen": f"127.0.0.1:{next(ports)}",
        },
        "callbacks": {
            "listen": callbacks_listen,
            "ops_listen": f"127.0.0.1:{next(ports)}",
            "public_url": callbacks_url or f"http://{callbacks_listen}",
            # A topic created a moment ago may take seconds to take its first write on a busy
            # machine: in tests the producer's timeout decides, not a provider's deadline
            # (tests/integration/test_callback_deadline.py sets Octopush's).
            "deadline_s": 10.0,
            "deadline_by_kind_s": {"octopush": 10.0},
        },
        "sender": {"metrics_listen": f"127.0.0.1:{next(ports)}"},
        "normalizer": {"metrics_listen": f"127.0.0.1:{next(ports)}"},
        "reporter": {"metrics_listen": f"127.0.0.1:{next(ports)}"},
        "campaigns": {"listen": f"127.0.0.1:{next(ports)}"},
        "tenants": {
            TENANT: {
                "optimove_base_url": f"{optimove_url.rstrip('/')}/{TENANT}",
                "api_token": TENANT_API_TOKEN,
                "secret_key": TENANT_SECRET,
                "aggregator_api_key": AGGREGATOR_API_KEY,
                "default_sender_id": "ACME",
                "default_region": "GB",
                "routes": [{"provider": "otpiq-main"}],
            }
        },
        "providers": {
            "otpiq-main": {
                "kind": "otpiq",
                "base_url": f"{provider_url.rstrip('/')}/otpiq/api",
                "api_key": "sk_test_otpiq",
                "callback_token": CALLBACK_TOKEN,
                "webhook_secret": OTPIQ_WEBHOOK_SECRET,
            }
        },
    }
    deep_merge(data, overrides or {})
    return data


@contextlib.asynccontextmanager
async def running(server: S) -> AsyncIterator[S]:
    """Run a service (or a simulator) in this event loop for the duration of the block."""
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def create_topic(settings: Settings, topic: Topic) -> None:
    """Create a test's own ``topic`` and return once its partitions have leaders: until then
    Apache Kafka leaves it out of a consumer's assignment."""
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic.name, topic.partitions, 1)])
        await wait_for_leaders(admin, [topic.name])
    finally:
        await admin.close()


async def wait_for(
    predicate: Callable[[], bool] | Callable[[], Awaitable[bool]],
    timeout_s: float = 30.0,
    what: str | Callable[[], str] = "condition",
    *,
    every_s: float = 0.05,
) -> None:
    """Poll ``predicate`` (plain or async) every ``every_s`` until it holds; fail after
    ``timeout_s`` naming ``what`` (a callable is asked at the time, to say how far it got)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await _holds(predicate):
        if loop.time() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout_s}s waiting for {described}")
        await asyncio.sleep(every_s)


async def _holds(predicate: Callable[[], bool] | Callable[[], Awaitable[bool]]) -> bool:
    result = predicate()
    if inspect.isawaitable(result):
        return bool(await result)
    return bool(result)


async def read_topic(
    settings: Settings,
    topic: Topic,
    model: type[E],
    *,
    expect: int | None = None,
    timeout_s: float = 20.0,
    settle_s: float = 0.5,
) -> list[tuple[str | None, E]]:
    """Every record of ``topic`` from the beginning, decoded (no consumer group).

    With ``expect``, waits until that many arrived (failing after ``timeout_s``); either way it
    keeps reading for ``settle_s`` after the last record, so extra records are seen too.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap(settings.kafka), enable_auto_commit=False
    )
    await consumer.start()
    found: list[tuple[str | None, E]] = []
    try:
        partitions = [
            TopicPartition(topic.name, p)
            for p in (consumer.partitions_for_topic(topic.name) or range(topic.partitions))
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        quiet_since = loop.time()
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            now = loop.time()
            for records in batches.values():
                for record in records:
                    key = record.key.decode() if record.key is not None else None
                    found.append((key, decode(model, record.value)))
                    quiet_since = now
            enough = expect is None or len(found) >= expect
            if enough and now - quiet_since >= settle_s:
                return found
            if now > deadline:
                if expect is not None and len(found) < expect:
                    raise AssertionError(
                        f"{topic.name}: {len(found)} records after {timeout_s}s, expected {expect}"
                    )
                return found
    finally:
        await consumer.stop()
