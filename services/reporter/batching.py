"""Replies to Optimove go several per request: ``InboundBatcher`` collects them per tenant."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.reporter.delivery import DeliveryOutcome
from shared.contract.events import InboundMessage

DeliverBatch = Callable[[str, list[InboundMessage]], Awaitable[DeliveryOutcome]]


@dataclass
class _OpenBatch:
    result: asyncio.Future[DeliveryOutcome]
    messages: list[InboundMessage] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class InboundBatcher:
    """Collects one tenant's replies into one request; every caller waits for its batch's fate.

    A batch is sealed when it holds ``max_size`` messages or ``max_delay_s`` after its first one,
    whichever comes first. Sealed batches of one tenant are delivered one at a time, oldest
    first, so replies reach Optimove in the order they were read.
    """

    def __init__(self, deliver: DeliverBatch, *, max_size: int, max_delay_s: float) -> None:
        self._deliver = deliver
        self.max_size = max(1, max_size)
        self.max_delay_s = max(0.0, max_delay_s)
        self._open: dict[str, _OpenBatch] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def submit(self, tenant: str, message: InboundMessage) -> DeliveryOutcome:
        loop = asyncio.get_running_loop()
        batch = self._open.get(tenant)
        if batch is None:
            batch = _OpenBatch(result=loop.create_future())
            batch.result.add_done_callback(_consume_exception)
            batch.timer = loop.call_later(self.max_delay_s, self._seal, tenant, batch)
            self._open[tenant] = batch
        batch.messages.append(message)
        if len(batch.messages) >= self.max_size:
            self._seal(tenant, batch)
        # Shielded: one caller being cancelled must not cancel the batch of the others.
        return await asyncio.shield(batch.result)

    def _seal(self, tenant: str, batch: _OpenBatch) -> None:
        if self._open.get(tenant) is not batch:
            return
        del self._open[tenant]
        if batch.timer is not None:
            batch.timer.cancel()
        # Taking the lock's place in line now (not when the task first runs) keeps batch order.
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        task = asyncio.create_task(self._send(tenant, batch, lock), name=f"inbound-{tenant}")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, tenant: str, batch: _OpenBatch, lock: asyncio.Lock) -> None:
        try:
            async with lock:
                outcome = await self._deliver(tenant, batch.messages)
        except asyncio.CancelledError:
            batch.result.cancel()
            raise
        except Exception as exc:
            # A bug, not Optimove's answer: every waiting record fails and the runner retries it.
            batch.result.set_exception(exc)
        else:
            batch.result.set_result(outcome)

    async def close(self) -> None:
        """Abandon what is not delivered yet; its records are not committed and come back."""
        for batch in self._open.values():
            if batch.timer is not None:
                batch.timer.cancel()
            batch.result.cancel()
        self._open.clear()
        sending = list(self._sending)
        for task in sending:
            task.cancel()
        for task in sending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _consume_exception(future: asyncio.Future[DeliveryOutcome]) -> None:
    # Every waiter may have been cancelled already; the exception is not lost, only unawaited.
    if not future.cancelled():
        future.exception()
