"""The sender service: consumes ``sms.recipients``, sends through providers, writes dispatches.

The decision and its guarantees are in ``handler.py`` (and docs/sending.md); this module only
wires it to Kafka. Its garbage collector is tuned like every service's (``shared.gcpolicy``).
"""

from __future__ import annotations

from services.sender.handler import INPUTS, SenderHandler
from services.sender.state import STAGE
from shared.config import Settings
from shared.kafka.service import ConsumerService, Service, run_service


def build(settings: Settings, *, group_id: str | None = None) -> Service:
    """``group_id``: tests' own group; else ``[sender] group_id``, else smsbridge-sender."""
    return ConsumerService(
        name=STAGE,
        settings=settings,
        runner_settings=settings.sender.runner,
        topics=[topic.name for topic in INPUTS],
        handler=SenderHandler(settings),
        group_id=group_id or settings.sender.group_id or None,
    )


async def main(settings: Settings) -> None:
    await run_service(build(settings), settings.sender.metrics_listen)
