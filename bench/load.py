"""Campaign load for benchmarks: signed Optimove batches, built fast, posted and timed.

Numbers are valid GB mobiles from blocks where every number is valid (07400, 07500, 07800,
07900: up to 4,000,000 distinct ones), written in the rotating formats Optimove's tenants use,
so ingress normalises as it would in production; building a million of them takes seconds
(``simulators.campaign_load.sample_numbers`` checks each with phonenumbers, about 75 µs).
Each batch knows the message ids ingress will give its recipients
(``shared.contract.ids.message_id``), so a report at the Optimove simulator can be traced back
to the batch that carried it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import orjson

from bench.stack import AGGREGATOR_API_KEY, SENDER_ID, TENANT, TENANT_SECRET
from shared.contract.ids import message_id, request_key
from simulators.campaign_load import NUMBER_FORMATS, campaign_metadata, signed_headers

_BLOCKS = ("7400", "7500", "7800", "7900")
MAX_NUMBERS = len(_BLOCKS) * 1_000_000


def number(index: int) -> str:
    """The ``index``-th benchmark number (distinct for every index below ``MAX_NUMBERS``)."""
    if not 0 <= index < MAX_NUMBERS:
        raise ValueError(f"benchmark numbers run from 0 to {MAX_NUMBERS - 1}")
    block, line = divmod(index, 1_000_000)
    national = f"{_BLOCKS[block]}{line:06d}"
    return NUMBER_FORMATS[index % len(NUMBER_FORMATS)](national)


def text(index: int) -> str:
    return f"Hello customer {index}, your offer code is C{index:07d}. Reply STOP to opt out"


@dataclass(frozen=True)
class Batch:
    batch_id: str
    body: bytes  # exactly what is signed and posted
    headers: dict[str, str]
    message_ids: list[str]  # what ingress will call each recipient, in order

    @property
    def recipients(self) -> int:
        return len(self.message_ids)


def build_batches(
    campaign_id: str,
    recipients: int,
    batch_size: int,
    *,
    first_index: int = 0,
    first_batch: int = 0,
    scheduled_ms: int = 0,
) -> list[Batch]:
    """The campaign as signed batches of ``batch_size`` (numbers from ``first_index`` on, batch
    ids from ``first_batch`` on: a campaign built a part at a time)."""
    metadata = campaign_metadata(TENANT, campaign_id, scheduled_ms)
    batches: list[Batch] = []
    starts = range(first_index, first_index + recipients, batch_size)
    for batch_number, start in enumerate(starts, start=first_batch):
        indexes = range(start, min(start + batch_size, first_index + recipients))
        entries = [
            {"message": text(i), "mobileNumber": number(i), "customerId": f"cust-{i}"}
            for i in indexes
        ]
        request_id = str(uuid.uuid4())
        body = orjson.dumps(
            {
                "batchId": f"{campaign_id}-b{batch_number:05d}",
                "metadata": metadata,
                "recipients": entries,
                "requestId": request_id,
                "senderId": SENDER_ID,
            }
        )
        key = request_key(f"{campaign_id}-b{batch_number:05d}", request_id)
        assert key is not None  # both ids are set: ingress keys the request on the two
        batches.append(
            Batch(
                batch_id=f"{campaign_id}-b{batch_number:05d}",
                body=body,
                headers=signed_headers(body, TENANT_SECRET, AGGREGATOR_API_KEY),
                message_ids=[
                    message_id(TENANT, key, position, entry["mobileNumber"])
                    for position, entry in enumerate(entries)
                ],
            )
        )
    return batches


@dataclass(frozen=True)
class Posted:
    batch: Batch
    status: int
    started: float  # time.time() when the request was sent
    answered: float  # time.time() when the answer was read
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.answered - self.started

    @property
    def accepted(self) -> bool:
        return self.status == 202


async def post(session: aiohttp.ClientSession, url: str, batch: Batch) -> Posted:
    """POST one batch once; the answer and when it came (a failure is status 0 with the reason)."""
    started = time.time()
    try:
        async with session.post(url, data=batch.body, headers=batch.headers) as response:
            body = await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Posted(batch, 0, started, time.time(), f"{type(exc).__name__}: {exc}")
    detail = "" if status == 202 else body[:200].decode("utf-8", "replace")
    return Posted(batch, status, started, time.time(), detail)


async def post_paced(
    session: aiohttp.ClientSession, url: str, batches: Sequence[Batch], rate_per_s: float
) -> list[Posted]:
    """Post batches so that recipients go in at ``rate_per_s``: batch n leaves at (recipients
    before it) / rate, whether or not earlier answers came back (a slow answer delays nothing)."""
    began = time.monotonic()
    tasks: list[asyncio.Task[Posted]] = []
    sent = 0
    for batch in batches:
        delay = began + sent / rate_per_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(post(session, url, batch)))
        sent += batch.recipients
    return list(await asyncio.gather(*tasks))
