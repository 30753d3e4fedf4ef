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
