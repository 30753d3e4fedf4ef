"""How much the reliability suite does: a short form inside ``make test``, the full form in
``make reliability`` (``pytest --reliability-full`` or ``SMSBRIDGE_RELIABILITY_FULL=1``).

The figures of the full form are the ones issue 7 names (50 clients for 60 s, a 20,000-recipient
campaign, provider failures for a minute); the short form keeps every check and shrinks only the
amounts, so that ``make test`` stays within its budget on a 2-core machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FULL_ENV = "SMSBRIDGE_RELIABILITY_FULL"
FULL_OPTION = "--reliability-full"


@dataclass(frozen=True)
class Profile:
    name: str
    # hypothesis examples per property of the pure parsers and validators
    property_examples: int
    # schemathesis examples per API operation (and per signed-body property)
    api_examples: int
    load_clients: int
    load_seconds: float
    load_batch: int  # recipients per posted batch
    chaos_recipients: int
    chaos_batch: int
    chaos_post_seconds: float  # the campaign's batches are spread over this long
    provider_failure_rate: float
    provider_failure_seconds: float


SHORT = Profile(
    name="short",
    property_examples=300,
    api_examples=60,
    load_clients=10,
    load_seconds=5.0,
    load_batch=20,
    chaos_recipients=2_000,
    chaos_batch=100,
    chaos_post_seconds=25.0,
    provider_failure_rate=0.3,
    provider_failure_seconds=10.0,
)

FULL = Profile(
    name="full",
    property_examples=5_000,
    api_examples=600,
    load_clients=50,
    load_seconds=60.0,
    load_batch=20,
    chaos_recipients=20_000,
    chaos_batch=1_000,
    chaos_post_seconds=120.0,
    provider_failure_rate=0.3,
    provider_failure_seconds=60.0,
)


def is_full() -> bool:
    return os.environ.get(FULL_ENV, "").strip().lower() not in ("", "0", "false", "no")


def current() -> Profile:
    return FULL if is_full() else SHORT
