"""Log lines never carry a whole phone number, whoever wrote the text."""

from __future__ import annotations

import logging
import sys

import orjson

from shared.logs import JsonFormatter


def test_numbers_in_messages_and_tracebacks_are_masked() -> None:
    try:
        raise ValueError("provider refused +447700900123")
    except ValueError:
        record = logging.LogRecord(
            "sender", logging.ERROR, __file__, 1, "send to %s failed", ("447700900123",), None
        )
        record.exc_info = sys.exc_info()
    line = JsonFormatter("sender").format(record)
    entry = orjson.loads(line)
    assert "447700900123" not in line
    assert entry["msg"] == "send to 4477******23 failed"
    assert "+4477******23" in entry["exc"]
    assert entry["service"] == "sender"


def formatted(msg: str, *args: object, **extra: object) -> dict[str, object]:
    record = logging.LogRecord("sender", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    entry: dict[str, object] = orjson.loads(JsonFormatter("sender").format(record))
    return entry


def test_numbers_written_with_spaces_or_hyphens_are_masked_in_text_fields() -> None:
    entry = formatted(
        "refused: %s", "invalid number 07911 123456", detail="to 33-6-12-34-56-78 failed"
    )
    assert entry["msg"] == "refused: invalid number 0791*****56"
    assert entry["detail"] == "to 3361*****78 failed"


def test_ids_survive_whole_so_that_a_message_can_be_found_by_them() -> None:
    message_id = "m-aa065161008e66c8292fd337"  # seven digits in a row, inside the id
    entry = formatted(
        "parked message %s failed",
        message_id,
        message_id=message_id,
        provider_message_id="98765432101",
        partition=3,
    )
    assert entry["msg"] == f"parked message {message_id} failed"
    assert entry["message_id"] == message_id
    assert entry["provider_message_id"] == "98765432101"
    assert entry["partition"] == 3
    # Short numbers, dates and addresses are not phone numbers.
    text = "12 of 345 sent at 2026-12-02T13:25:00Z from 127.0.0.1:8080, retry in 1500 ms"
    assert formatted(text)["msg"] == text
