from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import AsyncIterator, Iterator

import pytest

from shared.config import Settings
from shared.contract.topics import ALL_TOPICS, ensure_topics, use_prefix
from shared.kafka.broker import EmbeddedBroker, embedded_broker
from shared.kafka.clients import EMBEDDED_BOOTSTRAP_ENV, make_admin
from tests.reliability.profile import FULL_ENV, FULL_OPTION

OWN_BROKER = "own_broker"
TOPIC_PREFIX_ENV = "SMSBRIDGE_KAFKA__TOPIC_PREFIX"
GROUP_PREFIX_ENV = "SMSBRIDGE_KAFKA__GROUP_PREFIX"
_test_numbers = itertools.count(1)


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
    config.addinivalue_line(
        "markers", f"{OWN_BROKER}: the test stops or kills the broker, so it gets one of its own"
    )


@pytest.fixture(scope="session")
def session_broker() -> Iterator[EmbeddedBroker]:
    """One broker for the whole run (Apache Kafka takes seconds to start); tests are kept apart
    by topic and group prefixes (``kafka``)."""
    with embedded_broker() as started:
        yield started


@pytest.fixture
def broker(
    request: pytest.FixtureRequest, kafka_names: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[EmbeddedBroker]:
    """The session's broker, or a fresh one for a test marked ``own_broker``; its address is
    exported for every ``Settings`` and child process the test makes."""
    if request.node.get_closest_marker(OWN_BROKER) is None:
        started: EmbeddedBroker = request.getfixturevalue("session_broker")
        monkeypatch.setenv(EMBEDDED_BOOTSTRAP_ENV, started.bootstrap_servers)
        yield started
        return
    with embedded_broker() as own:
        monkeypatch.setenv(EMBEDDED_BOOTSTRAP_ENV, own.bootstrap_servers)
        yield own


@pytest.fixture
def kafka_names(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test's topics and consumer groups carry a prefix of their own, so tests sharing a
    broker never see each other's records or group members."""
    prefix = f"t{next(_test_numbers)}-"
    monkeypatch.setenv(TOPIC_PREFIX_ENV, prefix)
    monkeypatch.setenv(GROUP_PREFIX_ENV, prefix)
    use_prefix(prefix)
    try:
        yield prefix
    finally:
        use_prefix("")


@pytest.fixture
async def kafka(broker: EmbeddedBroker) -> AsyncIterator[EmbeddedBroker]:
    """The broker with every pipeline topic created; removed after the test, so that a shared
    broker does not pile up thousands of partitions."""
    admin = make_admin(Settings().kafka)
    await admin.start()
    try:
        await ensure_topics(admin)
    finally:
        await admin.close()
    yield broker
    if not broker.running:
        return
    admin = make_admin(Settings().kafka)
    try:
        await admin.start()
        await admin.delete_topics([topic.name for topic in ALL_TOPICS])
    except Exception as exc:  # the test's outcome stands; the next test has its own topics
        warnings.warn(f"topics of the test not deleted: {exc!r}", stacklevel=1)
    finally:
        await admin.close()
