"""The garbage collector policy (shared/gcpolicy.py): cyclic garbage that holds many bytes in
few objects goes when the process grows, not only when enough objects were allocated."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from shared import gcpolicy

MIB = 1024 * 1024


class Holder:
    """A cycle holding a large buffer, as a stopped Kafka client holds its fetched responses."""

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.me = self


def test_the_resident_size_is_read() -> None:
    size = gcpolicy.resident_bytes()
    assert size is not None and size > 1024 * 1024


def test_cyclic_garbage_holding_memory_is_collected_when_the_process_grew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The size is injected: whether 64 MiB of new garbage grows the resident size depends on
    how much freed memory the allocator holds already (after a long test run, none)."""
    resident = [100 * MIB]
    monkeypatch.setattr(gcpolicy, "resident_bytes", lambda: resident[0])

    async def scenario() -> tuple[bool, bool]:
        collector = asyncio.create_task(
            gcpolicy.collect_when_grown(step_bytes=32 * MIB, interval_s=0.01)
        )
        await asyncio.sleep(0.03)  # the baseline is taken before the growth
        holders = [Holder(16 * MIB) for _ in range(4)]
        refs = [weakref.ref(holder) for holder in holders]
        del holders  # garbage now, but only the cyclic collector can free it
        await asyncio.sleep(0.05)
        alive_before = all(ref() is not None for ref in refs)  # no growth: no collection
        resident[0] += 64 * MIB
        for _ in range(50):
            await asyncio.sleep(0.01)
            if all(ref() is None for ref in refs):
                break
        collector.cancel()
        return alive_before, all(ref() is None for ref in refs)

    gc.disable()  # only the policy's own collection may free it
    try:
        alive_before, freed = asyncio.run(scenario())
    finally:
        gc.enable()
    assert alive_before
    assert freed


def test_live_growth_moves_the_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory that stays (live data) costs one collection per step, not one per check."""
    sizes = iter([100, 200, 200, 200, 200, 300, 300])
    monkeypatch.setattr(gcpolicy, "resident_bytes", lambda: next(sizes, 300))
    collections: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda: collections.append(1) or 0)

    async def scenario() -> None:
        task = asyncio.create_task(gcpolicy.collect_when_grown(step_bytes=100, interval_s=0))
        for _ in range(10):
            await asyncio.sleep(0)
        task.cancel()

    asyncio.run(scenario())
    assert len(collections) == 2  # 100 -> 200 (stays: the new baseline), 200 -> 300
