"""Every campaigns instance's copy of ``sms.campaign-counts``, with a read-your-writes barrier.

The table follows the topic within about one poll. ``sync`` makes sure it holds every write that
Kafka acknowledged before the call (by anyone): it writes a marker tombstone to every partition
and waits until the table has read all of them. A new owner of an input partition calls it before
it resumes from the counters the previous owner wrote.

``totals`` adds each campaign's counters up for the admin API, kept current through the table's
``on_change`` so that a status call reads the campaigns it asks for, never the whole table.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from services.campaigns.counts import (
    Campaign,
    Counts,
    campaign_prefix,
    campaigns_of_key,
    read_counts,
    summarize,
)
from shared.config import KafkaSettings
from shared.contract.topics import CAMPAIGN_COUNTS
from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher
from shared.kafka.store import GlobalTable

SYNC_PREFIX = "~sync|"
# Campaigns changed and not read since: past this many, they are added up at once, so that an
# instance nobody asks does not collect them for ever.
MAX_STALE = 4096


class CampaignTotals:
    """Per campaign, its counters of every input partition added up, as the mirror holds them.

    Kept per campaign, not per call: a changed counts key (``changed``, from the table's
    ``on_change``, the catch-up included) marks the campaigns it may belong to stale, and a stale
    campaign is added up again, from its own keys only, when it is next read. So a status call
    reads the campaigns it asks for (those changed since their last read, once), a list reads the
    campaigns it lists; neither reads the whole table. A campaign adds up the keys under its
    ``campaign_prefix`` whose value names it.
    """

    def __init__(self, values: Callable[[str], list[dict[str, Any]]]) -> None:
        self._values = values  # the mirrored values whose key starts with a prefix
        self._totals: dict[str, dict[str, Counts]] = {}  # tenant -> campaign -> totals
        self._stale: dict[str, set[str]] = {}  # tenant -> campaigns to add up again
        self._stale_count = 0

    def changed(self, keys: Iterable[str]) -> None:
        for key in keys:
            for tenant, campaign in campaigns_of_key(key):
                stale = self._stale.setdefault(tenant, set())
                if campaign not in stale:
                    stale.add(campaign)
                    self._stale_count += 1
        if self._stale_count > MAX_STALE:
            self._refresh(list(self._stale))

    def get(self, tenant: str, campaign: str) -> Counts | None:
        """The campaign's totals, None if nothing is counted of it (the caller must not change
        them)."""
        if campaign in self._stale.get(tenant, ()):
            self._add_up(tenant, campaign)
        return self._totals.get(tenant, {}).get(campaign)

    def campaigns(self, tenant: str | None = None) -> list[tuple[Campaign, Counts]]:
        """Every campaign with counters (of ``tenant`` only, if given), by tenant and campaign
        (the caller must not change them)."""
        self._refresh(list(self._stale) if tenant is None else [tenant])
        tenants = sorted(self._totals) if tenant is None else [tenant]
        return [
            ((slug, campaign), counts)
            for slug in tenants
            for campaign, counts in sorted(self._totals.get(slug, {}).items())
        ]

    def _refresh(self, tenants: Iterable[str]) -> None:
        for tenant in tenants:
            for campaign in list(self._stale.get(tenant, ())):
                self._add_up(tenant, campaign)

    def _add_up(self, tenant: str, campaign: str) -> None:
        totals = summarize(
            stored
            for stored in read_counts(self._values(campaign_prefix(tenant, campaign)))
            if (stored.tenant, stored.campaign) == (tenant, campaign)
        ).get((tenant, campaign))
        campaigns = self._totals.setdefault(tenant, {})
        if totals is None:
            campaigns.pop(campaign, None)
            if not campaigns:
                del self._totals[tenant]
        else:
            campaigns[campaign] = totals
        # Unmarked only once added up: a failure leaves the campaign stale, to retry.
        stale = self._stale[tenant]
        stale.discard(campaign)
        self._stale_count -= 1
        if not stale:
            del self._stale[tenant]


class CountsMirror(GlobalTable):
    def __init__(self, kafka: KafkaSettings, *, name: str) -> None:
        super().__init__(kafka, CAMPAIGN_COUNTS, name=name, on_change=self._changed_keys)
        self._markers: dict[str, asyncio.Future[None]] = {}
        self.totals = CampaignTotals(self.values)

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
        self.totals.changed(key for key in keys if not key.startswith(SYNC_PREFIX))
