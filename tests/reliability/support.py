"""What the reliability tests share: the stack they run against and how they count Kafka records."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import load
from bench.stack import OPTIMOVE_SIMULATOR, PROVIDER, Stack
from shared.config import Settings
from shared.contract.topics import Topic
from shared.kafka.broker import free_port
from shared.kafka.clients import bootstrap

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
        # A 503 past Octopush's 0.8 s may still store the event late, and the fuzzing tests
        # count stored events exactly: a first write to a new partition can take longer here.
        "callbacks": {"deadline_by_kind_s": {"octopush": 10.0}},
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


# -- a campaign posted as Optimove does, and what the Optimove simulator recorded of it ------------


@dataclass(frozen=True)
class FinalReport:
    message_id: str
    status: str
    sub_status: str
    body: str
    at: float


async def post_campaign(stack: Stack, batches: Sequence[load.Batch], span_s: float) -> None:
    """Post the batches spread over ``span_s``; a 503 (or a refused connection) is retried."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        began = time.monotonic()
        for number, batch in enumerate(batches):
            await asyncio.sleep(max(0.0, began + number * span_s / len(batches) - time.monotonic()))
            for _ in range(60):
                posted = await load.post(session, stack.campaign_url, batch)
                if posted.status == 202:
                    break
                assert posted.status in (0, 503), f"{posted.status}: {posted.detail}"
                await asyncio.sleep(1.0)
            else:
                raise AssertionError(f"batch {batch.batch_id} not accepted in 60 attempts")


def final_reports(
    record: Path, campaign: str, final_statuses: set[str]
) -> dict[str, list[FinalReport]]:
    """Final delivery reports of ``campaign`` per message id, in arrival order."""
    finals: dict[str, list[FinalReport]] = defaultdict(list)
    for line in record.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            entry = orjson.loads(line)
            if entry["endpoint"] != "delivery-report":
                continue
            body = orjson.loads(entry["body"])
            status = body["type"]["status"]
            if body["metadata"].get("campaignId") != campaign or status not in final_statuses:
                continue
            finals[body["messageId"]].append(
                FinalReport(
                    body["messageId"], status, body["type"]["subStatus"], entry["body"], entry["at"]
                )
            )
    return dict(finals)


async def start_optimove_with_record(stack: Stack, record: Path) -> None:
    listen = stack.optimove_url.removeprefix("http://")
    argv = [sys.executable, "-m", "tools.cli", "--config", str(stack.config_path)]
    argv += ["simulate", "optimove", f"--listen={listen}", f"--record={record}"]
    await stack.start_child(OPTIMOVE_SIMULATOR, argv, f"{stack.optimove_url}/_simulator/mode")
