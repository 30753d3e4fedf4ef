"""GlobalTable: a compacted topic mirrored on every instance, caught up before it serves."""

from __future__ import annotations

import pytest

from shared.config import Settings
from shared.contract.events import OptOutChange
from shared.contract.topics import OPT_OUTS
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import OutRecord, Publisher, make_producer
from shared.kafka.store import GlobalTable
from tests.support import wait_for

pytestmark = pytest.mark.integration


async def test_table_catches_up_then_follows_later_writes_and_tombstones(
    kafka: EmbeddedBroker,
) -> None:
    settings = Settings()
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    publisher = Publisher(producer, 5)
    try:
        await publisher.publish(
            [
                OutRecord(
                    OPT_OUTS,
                    "acme:+447700900001",
                    OptOutChange(tenant="acme", number="+447700900001", opted_out=True, source="t"),
                ),
                OutRecord(
                    OPT_OUTS,
                    "acme:+447700900002",
                    OptOutChange(tenant="acme", number="+447700900002", opted_out=True, source="t"),
                ),
                OutRecord(
                    OPT_OUTS,
                    "acme:+447700900001",
                    OptOutChange(
                        tenant="acme", number="+447700900001", opted_out=False, source="t"
                    ),
                ),
            ]
        )
        changes: list[list[str]] = []
        table = GlobalTable(
            settings.kafka,
            OPT_OUTS,
            name="opt-outs",
            on_change=lambda keys: changes.append(list(keys)),
        )
        await table.start()
        try:
            assert table.ready
            first = table.get("acme:+447700900001")
            assert first is not None and first["opted_out"] is False  # the latest word wins
            second = table.get("acme:+447700900002")
            assert second is not None and second["opted_out"] is True
            assert table.get("acme:+447700900003") is None

            await publisher.publish([OutRecord(OPT_OUTS, "acme:+447700900002", None)])
            await publisher.publish(
                [
                    OutRecord(
                        OPT_OUTS,
                        "other:+447700900003",
                        OptOutChange(
                            tenant="other", number="+447700900003", opted_out=True, source="t"
                        ),
                    )
                ]
            )
            await wait_for(lambda: table.get("other:+447700900003") is not None, 10, "follow")
            assert table.get("acme:+447700900002") is None
            assert len(table) == 2
            # The owner heard of every key changed, in order, the catch-up included.
            seen = [key for batch in changes for key in batch]
            assert seen == [
                "acme:+447700900001",
                "acme:+447700900002",
                "acme:+447700900001",
                "acme:+447700900002",
                "other:+447700900003",
            ]
        finally:
            await table.stop()
    finally:
        await producer.stop()
