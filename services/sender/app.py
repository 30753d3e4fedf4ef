"""The sender service: consumes ``sms.recipients``, sends through providers, writes dispatches.

The logic and its guarantees are in ``dispatcher.py``; this module only wires it to Kafka.
"""

from __future__ import annotations

import gc

from services.sender.dispatcher import NAME, Dispatcher
from shared import topics
from shared.config import Settings
from shared.service import ConsumerService, Service, run_service


def build(settings: Settings, *, group_id: str | None = None) -> Service:
    """``group_id`` other than the default only for replays and tests."""
    return ConsumerService(
        name=NAME,
        settings=settings,
        runner_settings=settings.sender.runner,
        topics=[topics.RECIPIENTS.name],
        handler=Dispatcher(settings),
        group_id=group_id,
    )


def tune_garbage_collector() -> None:
    """Fewer, cheaper collections for a process that churns through short-lived objects.

    Every message in flight holds a few hundred small objects for a fraction of a second; with
    the default thresholds they get promoted and Python runs full collections of the whole heap
    several times a second (about a third of the sender's CPU in ``make bench``). What start-up
    allocated (modules, schemas) is frozen out of collections, and the young generation is
    collected less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def main(settings: Settings) -> None:
    tune_garbage_collector()
    await run_service(build(settings), settings.sender.metrics_listen)
