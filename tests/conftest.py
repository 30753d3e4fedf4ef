from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from shared.broker import EmbeddedBroker
from shared.config import Settings
from shared.kafka import make_admin
from shared.topics import ensure_topics
from tests.reliability.profile import FULL_ENV, FULL_OPTION


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        FULL_OPTION,
        action="store_true",
        help="run tests/reliability in its full form (make reliability); default: the short form",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Before collection: hypothesis settings in the reliability modules read it at import time.
    if config.getoption(FULL_OPTION):
        os.environ[FULL_ENV] = "1"


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A fresh embedded broker per test: it starts in milliseconds and isolates every test."""
    with EmbeddedBroker() as started:
        previous = os.environ.get("SMSBRIDGE_EMBEDDED_BOOTSTRAP")
        os.environ["SMSBRIDGE_EMBEDDED_BOOTSTRAP"] = started.bootstrap_servers
        try:
            yield started
        finally:
            if previous is None:
                os.environ.pop("SMSBRIDGE_EMBEDDED_BOOTSTRAP", None)
            else:
                os.environ["SMSBRIDGE_EMBEDDED_BOOTSTRAP"] = previous


@pytest.fixture
async def kafka(broker: EmbeddedBroker) -> AsyncIterator[EmbeddedBroker]:
    """The broker with every pipeline topic created."""
    admin = make_admin(Settings().kafka)
    await admin.start()
    try:
        await ensure_topics(admin)
    finally:
        await admin.close()
    yield broker
