"""Secrets in the configuration: where a value comes from, and rotation with an overlap.

A secret is written inline, as ``env:NAME`` or as ``file:/path``, and is resolved when the
configuration is loaded (a missing variable or file names its key). To rotate it without a
refused request, it may also be a table::

    secret_key = { current = "file:/run/secrets/new", previous = [
        { value = "file:/run/secrets/old", expires = "2026-12-31T00:00:00Z" } ] }

Outbound calls sign and send with ``current``; inbound checks accept ``current`` and every
previous value not yet expired, and count which one matched (``SECRET_MATCHES``), so that an
operator sees when the old value stops being used. docs/rotation.md is the runbook.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from prometheus_client import Counter
from pydantic import PlainSerializer, PlainValidator, SecretStr

SECRET_MATCHES = Counter(
    "smsbridge_secret_matches_total",
    "Inbound checks passed, by secret and by the value that matched (current or previous): "
    "once previous stays flat, the old value can go.",
    ["secret", "value"],
)


def resolve_secret(reference: str) -> str:
    """Turn ``env:NAME`` / ``file:/path`` / an inline value into the secret itself."""
    if reference.startswith("env:"):
        name = reference[4:]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return os.environ[name]
    if reference.startswith("file:"):
        path = Path(reference[5:])
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
    return reference


class RotatingSecret(SecretStr):
    """The current value (``get_secret_value``) and the earlier ones still accepted."""

    previous: tuple[tuple[SecretStr, datetime | None], ...] = ()

    def accepted(self, now: datetime | None = None) -> Iterator[tuple[str, str]]:
        """(which, value) of every value an inbound check accepts at ``now``."""
        yield "current", self.get_secret_value()
        moment = now or datetime.now(UTC)
        for value, expires in self.previous:
            if expires is None or moment < expires:
                yield "previous", value.get_secret_value()

    def expiries(self) -> list[datetime]:
        return [expires for _, expires in self.previous if expires is not None]

    def matches(self, passes: Callable[[str], bool], name: str) -> bool:
        """Whether an accepted value ``passes`` the check, counted under ``name`` (a key path,
        never a value). Every accepted value is tried, so the time taken does not tell which
        one matched."""
        matched = ""
        for which, value in self.accepted():
            if passes(value) and not matched:
                matched = which
        if matched:
            SECRET_MATCHES.labels(name, matched).inc()
        return bool(matched)


def _resolved(value: Any, key: str) -> SecretStr:
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    if not isinstance(raw, str):
        raise ValueError(f"{key}expected a string, env:NAME or file:/path")
    resolved = resolve_secret(raw)
    if not resolved:
        raise ValueError(f"{key}secret is empty")
    return SecretStr(resolved)


def _expiry(value: Any, index: int) -> datetime | None:
    if value is None:
        return None
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"previous.{index}.expires: not an ISO 8601 time: {value!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _rotating(value: Any) -> RotatingSecret:
    if isinstance(value, RotatingSecret):
        return value
    if not isinstance(value, dict):
        secret = RotatingSecret(_resolved(value, "").get_secret_value())
        return secret
    unknown = set(value) - {"current", "previous"}
    if unknown or "current" not in value:
        raise ValueError("a rotating secret is { current = ..., previous = [...] }")
    secret = RotatingSecret(_resolved(value["current"], "current: ").get_secret_value())
    previous = []
    for index, item in enumerate(value.get("previous") or []):
        entry = item if isinstance(item, dict) else {"value": item}
        if set(entry) - {"value", "expires"} or "value" not in entry:
            raise ValueError(f"previous.{index}: expected {{ value = ..., expires = ... }}")
        previous.append(
            (
                _resolved(entry["value"], f"previous.{index}.value: "),
                _expiry(entry.get("expires"), index),
            )
        )
    secret.previous = tuple(previous)
    return secret


# A secret setting: one value, or a current value and previous ones (module docstring).
Secret = Annotated[
    RotatingSecret,
    PlainValidator(_rotating),
    PlainSerializer(lambda secret: str(secret), return_type=str),
]
