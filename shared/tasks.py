"""Work in flight at a shutdown or a rebalance: finished within a deadline, or cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

CANCEL_WAIT_S = 1.0  # for the cancelled ones to unwind


async def finish_or_cancel(tasks: Collection[asyncio.Future[Any]], deadline_s: float) -> int:
    """Wait up to ``deadline_s`` for ``tasks``; cancel those still running and return how many
    (the caller says what that means for their records)."""
    if not tasks:
        return 0
    _, unfinished = await asyncio.wait(tasks, timeout=deadline_s)
    for task in unfinished:
        task.cancel()
    if unfinished:
        await asyncio.wait(unfinished, timeout=CANCEL_WAIT_S)
    return len(unfinished)
