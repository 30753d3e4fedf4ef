"""The campaigns service: live counts per campaign and the admin API (pause, resume, cancel).

``tracker.py`` keeps the counts (``docs/campaigns.md`` says how they stay exact and bounded),
``api.py`` serves them and publishes the operator's controls; this module only wires them: a
consumer group on the pipeline's topics, a copy of ``sms.campaign-control`` for the controls in
force, and one HTTP server on ``[campaigns] listen`` with ``/metrics``, ``/healthz``, ``/readyz``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp import web

from services.campaigns.api import CampaignsApi
from services.campaigns.counts import INPUT_TOPICS
from services.campaigns.tracker import NAME, CountsTracker
from shared.config import Settings
from shared.contract.topics import CAMPAIGN_CONTROL, SENDER_STATUS
from shared.kafka.service import ConsumerService, add_ops_routes, run_service, serve
from shared.kafka.store import GlobalTable

log = logging.getLogger(__name__)


class CampaignsService:
    name = NAME

    def __init__(
        self,
        settings: Settings,
        *,
        group_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``group_id``: tests' own group; else ``[campaigns] group_id``, else the default."""
        self.settings = settings
        self.tracker = CountsTracker(settings, clock=clock)
        self.consumer = ConsumerService(
            name=NAME,
            settings=settings,
            runner_settings=settings.campaigns.runner,
            topics=[topic.name for topic in INPUT_TOPICS],
            handler=self.tracker,
            group_id=group_id or settings.campaigns.group_id or None,
        )
        self.controls = GlobalTable(settings.kafka, CAMPAIGN_CONTROL, name=f"{NAME}-controls")
        # Each sender instance's share and window waits per campaign (services/sender/status.py).
        self.senders = GlobalTable(settings.kafka, SENDER_STATUS, name=f"{NAME}-senders")
        self.api = CampaignsApi(
            settings,
            counts=self.tracker.mirror,
            controls=self.controls.get,
            publisher=self.consumer.publisher,
            sender_status=self.senders.values,
            clock=clock,
        )
        self.app = web.Application(middlewares=self.api.middlewares)
        self.api.add_routes(self.app)
        add_ops_routes(self.app, self.ready)
        self._http: web.AppRunner | None = None
        self._started: list[str] = []

    async def start(self) -> None:
        try:
            await self.controls.start()
            self._started.append("controls")
            await self.senders.start()
            self._started.append("senders")
            # Starts the producer, the tracker (its counts mirror caught up) and the runner.
            await self.consumer.start()
            self._started.append("consumer")
            self._http = await serve(self.app, self.settings.campaigns.listen)
        except BaseException:
            await self.stop()
            raise
        log.info("campaigns admin API on %s", self.settings.campaigns.listen)

    async def wait(self) -> None:
        await self.consumer.wait()

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.cleanup()  # no control accepted once the producer is going
            self._http = None
        if "consumer" in self._started:
            await self.consumer.stop()
        else:
            await self.consumer.close()  # its clients exist from __init__ on
        if "controls" in self._started:
            await self.controls.stop()
        if "senders" in self._started:
            await self.senders.stop()
        self._started.clear()

    def ready(self) -> bool:
        return self.consumer.ready() and self.tracker.ready and self.controls.ready


def build(settings: Settings, *, group_id: str | None = None) -> CampaignsService:
    return CampaignsService(settings, group_id=group_id)


async def main(settings: Settings) -> None:
    await run_service(build(settings))
