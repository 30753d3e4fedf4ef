"""The sender service: consumes ``sms.recipients``, sends through providers, writes dispatches."""

from __future__ import annotations

from services.sender.dispatcher import Dispatcher
from shared import topics
from shared.config import Settings
from shared.service import ConsumerService, Service, run_service

NAME = "sender"


def build(settings: Settings) -> Service:
    return ConsumerService(
        name=NAME,
        settings=settings,
        runner_settings=settings.sender.runner,
        topics=[topics.RECIPIENTS.name],
        handler=Dispatcher(settings),
    )


async def main(settings: Settings) -> None:
    await run_service(build(settings), settings.sender.metrics_listen)
