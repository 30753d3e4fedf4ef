"""A consumed record as a handler receives it, for unit tests that call handlers directly."""

from __future__ import annotations

from aiokafka.structs import ConsumerRecord

from shared.kafka.runner import Record


def consumer_record(
    topic: str,
    value: bytes | None,
    *,
    key: bytes | None = b"k",
    partition: int = 0,
    offset: int = 0,
) -> Record:
    return ConsumerRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value or b""),
        headers=[],
    )
