"""Structured JSON logs. Phone numbers are masked; secrets never reach a log call."""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def mask_number(number: str) -> str:
    """Keep the country code's neighbourhood and the last two digits: ``+4479******89``."""
    digits = [c for c in number if c.isdigit()]
    if len(digits) <= 4:
        return "*" * len(digits)
    prefix = "+" if number.strip().startswith("+") else ""
    return prefix + "".join(digits[:4]) + "*" * (len(digits) - 6) + "".join(digits[-2:])


# Text we did not write (a provider's error, an exception's message) may echo a number: every
# run of seven or more digits, single spaces or hyphens between them allowed ("07911 123456"), is
# masked in each log line's message, traceback and text fields, and by the call sites that keep
# such text outside the logs (the sender's last error in its state). A run inside a word is left
# alone: our ids are hex digests ("m-aa065161008e...") that often hold seven digits in a row.
_NUMBER = re.compile(r"(?<![\w+])\+?\d(?:[ -]?\d){6,}(?!\w)")


def scrub(text: str) -> str:
    return _NUMBER.sub(lambda match: mask_number(match.group()), text)


def _is_identifier(key: str) -> bool:
    """Fields that name a record (``message_id``, ``provider_message_id``): kept whole, for
    finding it; a provider's numeric ids would otherwise look like phone numbers."""
    return key.endswith("_id") or key == "id"


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                scrubbed = isinstance(value, str) and not _is_identifier(key)
                entry[key] = scrub(value) if scrubbed else value
        if record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
