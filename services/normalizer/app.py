"""The normalizer service: ``sms.dispatches`` and ``sms.provider-events`` to ``sms.statuses``.

The join, replies and STOPs are handled by ``handler.py``; see ``docs/normalizer.md``.
"""

from __future__ import annotations

from services.normalizer.handler import INPUT_TOPICS, NormalizerHandler
from services.normalizer.outputs import NAME
from shared.config import Settings
from shared.kafka.service import ConsumerService, Service, run_service


def build(settings: Settings, handler: NormalizerHandler | None = None) -> Service:
    """The normalizer service; ``handler`` lets a test give it another clock."""
    return ConsumerService(
        name=NAME,
        settings=settings,
        runner_settings=settings.normalizer.runner,
        topics=[topic.name for topic in INPUT_TOPICS],
        handler=handler or NormalizerHandler(settings),
        group_id=settings.normalizer.group_id or None,
    )


async def main(settings: Settings) -> None:
    await run_service(build(settings), settings.normalizer.metrics_listen)
