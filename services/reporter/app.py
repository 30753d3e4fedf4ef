"""The reporter service: ``sms.statuses`` and ``sms.inbound`` to each tenant's Optimove."""

from __future__ import annotations

from services.reporter.handler import STAGE, ReporterHandler
from shared import topics
from shared.config import Settings
from shared.service import ConsumerService, Service, run_service


def build(settings: Settings) -> Service:
    return ConsumerService(
        name=STAGE,
        settings=settings,
        runner_settings=settings.reporter.runner,
        topics=[topics.STATUSES.name, topics.INBOUND.name],
        handler=ReporterHandler(settings),
    )


async def main(settings: Settings) -> None:
    await run_service(build(settings), settings.reporter.metrics_listen)
