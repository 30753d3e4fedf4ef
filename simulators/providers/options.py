"""The provider simulator's options: faults, latency, callbacks; checked when changed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any


class OptionsError(ValueError):
    """A simulator option has a value it cannot use."""


def updated_callback_urls(
    current: Mapping[str, str], changes: Mapping[str, str | None]
) -> dict[str, str]:
    """``current`` with ``changes`` merged in (a None URL removes the key), or OptionsError."""
    if not isinstance(changes, Mapping):
        raise OptionsError("callback_urls must map an API key (or login) to a URL")
    merged = dict(current)
    for key, url in changes.items():
        if not isinstance(key, str) or not key:
            raise OptionsError("callback_urls keys must be non-empty strings")
        if url is None:
            merged.pop(key, None)
        elif isinstance(url, str) and url.startswith(("http://", "https://")):
            merged[key] = url
        else:
            raise OptionsError("callback_urls values must be http(s) URLs or null")
    return merged


@dataclass(frozen=True)
class SimulatorOptions:
    latency_ms: float = 0.0
    fail_rate: float = 0.0  # fraction of accepted sends whose final status is failed
    http_error_rate: float = 0.0  # fraction of sends answered 500 without sending
    # Fraction of sends answered 429 without sending, in the provider's shape, asking for a wait
    # of ``rate_limited_wait_s`` (OTPIQ's waitMinutes, a fraction of a minute here; Retry-After).
    rate_limited_rate: float = 0.0
    rate_limited_wait_s: float = 1.0
    # Fraction of sends accepted (recorded, callbacks planned) whose answer is lost: a 200 with an
    # HTML body, as a proxy in between might give. The sender cannot know it was sent.
    garbled_rate: float = 0.0
    callback_delay_ms: float = 50.0  # before each callback of a message
    callback_attempts: int = 4  # per callback, when the receiver answers 5xx or is unreachable
    callback_retry_delay_ms: float = 200.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("fail_rate", "http_error_rate", "rate_limited_rate", "garbled_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise OptionsError(f"{name} must be between 0 and 1, got {value}")
        for name in (
            "latency_ms",
            "callback_delay_ms",
            "callback_retry_delay_ms",
            "rate_limited_wait_s",
        ):
            if getattr(self, name) < 0:
                raise OptionsError(f"{name} must not be negative")
        if self.callback_attempts < 1:
            raise OptionsError("callback_attempts must be at least 1")

    def updated(self, changes: Mapping[str, Any]) -> SimulatorOptions:
        """A copy with ``changes`` applied; unknown names and wrong types are OptionsError."""
        known = {option.name for option in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise OptionsError(f"unknown option(s): {', '.join(unknown)}")
        coerced: dict[str, Any] = {}
        for name, value in changes.items():
            if isinstance(value, bool):
                raise OptionsError(f"{name} must be a number")
            if name == "seed":
                if value is not None and not isinstance(value, int):
                    raise OptionsError("seed must be an integer or null")
                coerced[name] = value
            elif name == "callback_attempts":
                if not isinstance(value, int):
                    raise OptionsError("callback_attempts must be an integer")
                coerced[name] = value
            else:
                if not isinstance(value, int | float):
                    raise OptionsError(f"{name} must be a number")
                coerced[name] = float(value)
        return replace(self, **coerced)
