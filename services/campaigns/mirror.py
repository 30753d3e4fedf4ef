"""Every campaigns instance's copy of ``sms.campaign-counts``, with a read-your-writes barrier.

The table follows the topic within about one poll. ``sync`` makes sure it holds every write that
Kafka acknowledged before the call (by anyone): it writes a marker tombstone to every partition
and waits until the table has read all of them. A new owner of an input partition calls it before
it resumes from the counters the previous owner wrote.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from shared.config import KafkaSettings
from shared.kafka import KafkaUnavailable, OutRecord, Publisher
from shared.store import GlobalTable
from shared.topics import CAMPAIGN_COUNTS

SYNC_PREFIX = "~sync|"


class CountsMirror(GlobalTable):
    def __init__(self, kafka: KafkaSettings, *, name: str) -> None:
        super().__init__(kafka, CAMPAIGN_COUNTS, name=name, on_change=self._changed_keys)
        self._markers: dict[str, asyncio.Future[None]] = {}

    def values(self, prefix: str = "") -> list[dict[str, Any]]:
        """Every stored value whose key starts with ``prefix``, in key order."""
        if prefix:
            upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            rows = self._connection.execute(
                "SELECT value FROM entries WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, upper),
            ).fetchall()
        else:
            rows = self._connection.execute("SELECT value FROM entries ORDER BY key").fetchall()
        found = []
        for (raw,) in rows:
            value = orjson.loads(raw)
            if isinstance(value, dict):
                found.append(value)
        return found

    async def sync(self, publisher: Publisher, timeout_s: float = 30.0) -> None:
        """Return once the table holds every write acknowledged before this call."""
        try:
            partitions = sorted(await publisher.producer.partitions_for(self.topic.name))
        except Exception as exc:
            raise KafkaUnavailable(f"{self.topic.name}: no metadata ({exc})") from exc
        loop = asyncio.get_running_loop()
        token = uuid.uuid4().hex
        waiting = {f"{SYNC_PREFIX}{token}|{p}": (p, loop.create_future()) for p in partitions}
        self._markers.update({key: future for key, (_, future) in waiting.items()})
        try:
            # A tombstone of a key never written: nothing is stored, the table only sees it.
            await publisher.publish(
                [OutRecord(self.topic, key, None, partition=p) for key, (p, _) in waiting.items()]
            )
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(future for _, future in waiting.values())), timeout_s
                )
            except TimeoutError:
                raise KafkaUnavailable(
                    f"{self.topic.name}: the table did not catch up within {timeout_s:g}s"
                ) from None
        finally:
            for key, (_, future) in waiting.items():
                self._markers.pop(key, None)
                future.cancel()

    def _changed_keys(self, keys: Sequence[str]) -> None:
        for key in keys:
            if key.startswith(SYNC_PREFIX):
                future = self._markers.get(key)
                if future is not None and not future.done():
                    future.set_result(None)
