"""One way to Kafka for many concurrent writers: the records of every caller in one turn of the
event loop go out together, and each caller waits for the acknowledgement of its own.

The sender writes three times per message (intent, outcome, dispatch record), the normalizer
once per input record (statuses and changelog) and the runner once per finished record (its
outputs: the reporter's acknowledgement counts, dead letters), from hundreds of concurrent tasks.
One ``Publisher.publish`` per write would wait on hundreds of small gathers (each with its timeout
timer) a second; coalescing them costs one future per caller instead. Records keep their order
(callers in the order they asked, each caller's records in its order), so a key's changelog
records keep theirs. A flush that Kafka does not acknowledge fails every caller in it
(``KafkaUnavailable``): each retries, as with a publisher of its own.

A caller cancelled while it waits has handed its records over already: they still go out.
``merge`` may combine a flush's records (counts of one key, say) before they go out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher

Merge = Callable[[list[OutRecord]], list[OutRecord]]


class Outbox:
    def __init__(
        self, publisher: Publisher, *, name: str = "outbox", merge: Merge | None = None
    ) -> None:
        self.publisher = publisher
        self.name = name
        self.merge = merge
        self._waiting: list[tuple[Sequence[OutRecord], asyncio.Future[None]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

    async def publish(self, records: Sequence[OutRecord]) -> None:
        if not records:
            return
        for record in records:
            # Here, not in the flush: a record that cannot be encoded fails its own caller (who
            # may dead-letter it), not a whole flush as if Kafka were down.
            record.encoded  # noqa: B018 (computed once, kept on the record)
        loop = asyncio.get_running_loop()
        acknowledged: asyncio.Future[None] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.append((records, acknowledged))
        await acknowledged

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        task = asyncio.create_task(self._send(waiting), name=f"{self.name}-outbox")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _send(self, waiting: list[tuple[Sequence[OutRecord], asyncio.Future[None]]]) -> None:
        flushed = [record for records, _ in waiting for record in records]
        try:
            await self.publisher.publish(self.merge(flushed) if self.merge else flushed)
        except BaseException as exc:
            failure = (
                exc
                if isinstance(exc, KafkaUnavailable)
                else KafkaUnavailable(f"{type(exc).__name__}: {exc}")
            )
            for _, acknowledged in waiting:
                if not acknowledged.done():
                    acknowledged.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for _, acknowledged in waiting:
            if not acknowledged.done():
                acknowledged.set_result(None)
