"""What the reliability tests share: the stack they run against and how they count Kafka records."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.stack import PROVIDER
from shared.broker import free_port
from shared.config import Settings
from shared.kafka import bootstrap
from shared.topics import Topic

OPENSMS_ACCOUNT = "opensms-rel"
OPENSMS_CALLBACK_TOKEN = "rel-opensms-callback-token"
OCTOPUSH_ACCOUNT = "octopush-rel"
OCTOPUSH_CALLBACK_TOKEN = "rel-octopush-callback-token"
ADMIN_TOKEN = "rel-admin-token"
# Small limits, so that "too large" is quick to send.
INGRESS_MAX_BODY_BYTES = 256 * 1024
INGRESS_MAX_RECIPIENTS = 500


def bad_input_overrides(providers_url: str = "http://127.0.0.1:9") -> dict[str, Any]:
    """``bench.stack`` configuration overrides: an OpenSMS and an Octopush account beside the
    stack's OTPIQ one (so that every callback kind has an endpoint), and small ingress limits."""
    return {
        **own_ports(),
        "campaigns": {**own_ports()["campaigns"], "admin_token": ADMIN_TOKEN},
        "ingress": {
            "max_body_bytes": INGRESS_MAX_BODY_BYTES,
            "max_recipients": INGRESS_MAX_RECIPIENTS,
        },
        "providers": {
            OPENSMS_ACCOUNT: {
                "kind": "opensms",
                "base_url": f"{providers_url}/opensms/api/v3",
                "api_key": "rel-opensms-key",
                "callback_token": OPENSMS_CALLBACK_TOKEN,
            },
            OCTOPUSH_ACCOUNT: {
                "kind": "octopush",
                "base_url": f"{providers_url}/octopush/v1/public",
                "api_key": "rel-octopush-key",
                "api_login": "ops@example.com",
                "callback_token": OCTOPUSH_CALLBACK_TOKEN,
            },
        },
    }


def own_ports() -> dict[str, Any]:
    """A free port for every service listener ``bench.stack`` leaves at its default (the
    campaigns service's): tests running side by side must not share one."""
    return {"campaigns": {"listen": f"127.0.0.1:{free_port()}"}}


CALLBACK_ACCOUNTS: Mapping[str, str] = {
    "otpiq": PROVIDER,
    "opensms": OPENSMS_ACCOUNT,
    "octopush": OCTOPUSH_ACCOUNT,
}


async def topic_sizes(
    settings: Settings, topics: Iterable[Topic], timeout_s: float = 60.0
) -> dict[str, int]:
    """How many records each topic holds now, counted by reading them all: the embedded broker
    answers ``end_offsets`` wrongly after multi-record batches (tansu-notes.md), while the
    high-water mark of its fetch answers is right."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap(settings.kafka),
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic.name, p) for topic in topics for p in range(topic.partitions)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        sizes = {topic.name: 0 for topic in topics}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pending = set(partitions)
        while pending:
            if loop.time() > deadline:
                raise AssertionError(f"could not read {sorted(map(str, pending))} to their end")
            batches = await consumer.getmany(*pending, timeout_ms=200)
            for tp, records in batches.items():
                sizes[tp.topic] += len(records)
            for tp in list(pending):
                highwater = consumer.highwater(tp)
                if highwater is not None and await consumer.position(tp) >= highwater:
                    pending.discard(tp)
        return sizes
    finally:
        await consumer.stop()
