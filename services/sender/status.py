"""What this sender instance tells the campaign status: each campaign's share of its account and
how many of its messages wait for their send window (``SenderStatus`` on ``sms.sender-status``).

Window waits are counted as messages park and leave (``WindowWaits``), per partition, and counted
again from the parked markers when a partition is assigned, so the figure follows rebalances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence

from services.sender.fairness import FairQueue
from services.sender.state import ParkedMarker, parked_key
from shared.contract.events import CampaignPace, RecipientMessage, SenderStatus
from shared.contract.topics import SENDER_STATUS
from shared.kafka.clients import KafkaUnavailable, OutRecord
from shared.kafka.store import ChangelogStore

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[OutRecord]], Awaitable[None]]

# How often an instance publishes its status; the campaigns service ignores one older than
# STALE_AFTER_S (an instance that died without its tombstone).
STATUS_INTERVAL_S = 5.0

Campaign = tuple[str, str]  # (tenant, campaign id)


def instance_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WindowWaits:
    """Messages parked for their send window, per partition and campaign."""

    def __init__(self) -> None:
        self._counts: dict[int, Counter[Campaign]] = {}

    def parked(self, partition: int, message: RecipientMessage) -> None:
        self._counts.setdefault(partition, Counter())[_campaign(message)] += 1

    def left(self, partition: int, message: RecipientMessage) -> None:
        counts = self._counts.get(partition)
        if counts is not None:
            counts[_campaign(message)] -= 1
            if counts[_campaign(message)] <= 0:
                del counts[_campaign(message)]

    def track(self, partition: int, message: RecipientMessage, *, was: bool, will: bool) -> None:
        """A decision about ``message``: it ``was`` waiting for its window, it ``will``."""
        if will and not was:
            self.parked(partition, message)
        elif was and not will:
            self.left(partition, message)

    def recount(self, partition: int, markers: Iterable[ParkedMarker]) -> None:
        self._counts[partition] = Counter((m.tenant, m.campaign_id) for m in markers)

    def drop(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._counts.pop(partition, None)

    def totals(self) -> Counter[Campaign]:
        total: Counter[Campaign] = Counter()
        for counts in self._counts.values():
            total.update(counts)
        return total


def status_of(instance: str, accounts: Mapping[str, FairQueue], waits: WindowWaits) -> SenderStatus:
    """This instance's status now: every campaign that sent lately or waits for its window."""
    paces: dict[tuple[str, str, str], CampaignPace] = {}
    for account, queue in accounts.items():
        rates = queue.rates()
        everything = sum(rates.values())
        for flow, rate in rates.items():
            paces[flow.tenant, flow.campaign, account] = CampaignPace(
                tenant=flow.tenant,
                campaign=flow.campaign,
                account=account,
                share=rate / everything if everything else 0.0,
                sends_per_s=rate,
            )
    for (tenant, campaign), waiting in waits.totals().items():
        pace = next((p for (t, c, _), p in paces.items() if (t, c) == (tenant, campaign)), None)
        if pace is None:
            pace = paces[tenant, campaign, ""] = CampaignPace(tenant=tenant, campaign=campaign)
        pace.waiting_for_window = waiting
    return SenderStatus(instance=instance, campaigns=list(paces.values()))


def _campaign(message: RecipientMessage) -> Campaign:
    return message.context.tenant, message.context.campaign_id


def window_markers(store: ChangelogStore, partition: int) -> Iterator[ParkedMarker]:
    """The markers of ``partition``'s messages parked for their window, page by page."""
    prefix = parked_key("window", "")
    after = ""
    while True:
        page = store.scan_prefix(partition, prefix, after=after, limit=1000)
        for _, value in page:
            yield ParkedMarker.model_validate(value)
        if len(page) < 1000:
            return
        after = page[-1][0]


class StatusPublisher:
    """Publishes ``status()`` every ``STATUS_INTERVAL_S`` and a tombstone on stop."""

    def __init__(self, instance: str, status: Callable[[], SenderStatus], publish: Publish) -> None:
        self.instance = instance
        self.status = status
        self.publish = publish
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sender-status")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        with contextlib.suppress(KafkaUnavailable):
            await self.publish([OutRecord(SENDER_STATUS, self.instance, None)])

    async def _run(self) -> None:
        while True:
            try:
                await self.publish([OutRecord(SENDER_STATUS, self.instance, self.status())])
            except KafkaUnavailable as exc:
                log.warning("sender status not published (%s); next time", exc)
            except Exception:
                log.exception("sender status failed")
            await asyncio.sleep(STATUS_INTERVAL_S)
