"""The timer loop of a service whose timers live in a ``ChangelogStore``, written once.

A service runs ``run_timer_passes`` in a task of its own and says what one pass does; a pass over
the store's partitions goes through ``fire_partitions``, under the service's timer-pass lock.
What firing a partition means stays in the service.

Errors: a partition whose timers fail is logged and the other partitions still fire, for one bad
entry must not stop everybody's timers. ``KafkaUnavailable`` ends the pass instead (the other
partitions could not publish either); the loop logs it as a warning, and the next pass retries.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from shared.kafka.clients import KafkaUnavailable

log = logging.getLogger(__name__)


async def fire_partitions(
    partitions: Iterable[int], fire: Callable[[int], Awaitable[int]], *, name: str
) -> int:
    """Await ``fire(partition)`` for each of ``partitions``; returns the sum of what they returned.

    The caller holds its timer-pass lock around this: a revocation takes that lock before it drops
    partitions, so that no pass writes a partition this instance no longer owns.
    """
    total = 0
    for partition in partitions:
        try:
            total += await fire(partition)
        except KafkaUnavailable:
            raise
        except Exception:
            log.exception("%s: timers of partition %d failed", name, partition)
    return total


async def run_timer_passes(
    timer_pass: Callable[[], Awaitable[object]],
    wait: Callable[[], Awaitable[object]],
    *,
    name: str,
) -> None:
    """Forever: ``await wait()``, then ``await timer_pass()``. A failed pass is logged (Kafka
    being unavailable as a warning) and the loop goes on: the next pass retries."""
    while True:
        await wait()
        try:
            await timer_pass()
        except KafkaUnavailable as exc:
            log.warning("%s: timer pass not published (%s); next pass retries", name, exc)
        except Exception:
            log.exception("%s: timer pass failed", name)
