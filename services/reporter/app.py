"""The reporter service: ``sms.statuses`` and ``sms.inbound`` to each tenant's Optimove.

Reports that Optimove does not take within a few seconds are parked in ``sms.reporter-state``
(compacted, co-partitioned with both inputs) and retried by a timer; see ``handler.py`` for when
an offset is committed and why nothing is lost.
"""

from __future__ import annotations

from services.reporter.handler import INPUT_TOPICS, STAGE, ReporterHandler
from shared.config import Settings
from shared.kafka.service import ConsumerService, Service, run_service


def build(settings: Settings) -> Service:
    return ConsumerService(
        name=STAGE,
        settings=settings,
        runner_settings=settings.reporter.runner,
        topics=[topic.name for topic in INPUT_TOPICS],
        handler=ReporterHandler(settings),
        group_id=settings.reporter.group_id or None,
    )


async def main(settings: Settings) -> None:
    await run_service(build(settings), settings.reporter.metrics_listen)
