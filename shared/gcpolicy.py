"""Garbage collector settings for a service process that handles many records per second.

CPython's cyclic collector runs its youngest generation every 700 net allocations of container
objects, and now and then a full collection over everything the process holds: the modules,
schemas and clients of start-up (tens of thousands of objects) and the records in flight. Almost
nothing the record path allocates is cyclic garbage (reference counting frees it), so those
collections free nothing, yet in the normalizer they took a third of its CPU (timed with
``gc.callbacks`` during ``python -m bench stages``: 6.3 of 18.7 CPU s for 20,000 messages).

``tune_for_throughput`` moves what exists at start-up out of every later collection
(``gc.freeze``) and lets the youngest generation grow to ``YOUNG_THRESHOLD`` objects before it
is collected (then 0.15 of 12.7 CPU s). Cyclic garbage still goes, a little later. The collector
counts objects, not bytes: a few cyclic objects holding megabytes (a stopped Kafka client and
its fetched responses) could wait for the next full collection while the process grows by
gigabytes, so ``collect_when_grown`` also collects whenever the resident size grew by
``GROWTH_STEP_BYTES``. Every long-running process gets both from ``shared.kafka.service.run``.
"""

from __future__ import annotations

import asyncio
import gc
import os

YOUNG_THRESHOLD = 50_000
GROWTH_STEP_BYTES = 32 * 1024 * 1024
GROWTH_CHECK_S = 0.5
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def tune_for_throughput() -> None:
    """Call once at start-up, after the imports, before the records flow."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def resident_bytes() -> int | None:
    """This process's resident set size now (Linux), None where /proc is not there."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


async def collect_when_grown(
    step_bytes: int = GROWTH_STEP_BYTES, interval_s: float = GROWTH_CHECK_S
) -> None:
    """For ever: a full collection whenever the resident size grew by ``step_bytes`` since the
    last one; what it leaves (live data) is the next baseline, so live growth costs one
    collection per step."""
    baseline = resident_bytes()
    if baseline is None:
        return
    while True:
        await asyncio.sleep(interval_s)
        now = resident_bytes() or 0
        if now - baseline >= step_bytes:
            gc.collect()
            baseline = resident_bytes() or now
        elif now < baseline:
            baseline = now
