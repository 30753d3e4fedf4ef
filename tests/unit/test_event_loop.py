"""Every long-running process runs on the event loop its configuration names, with the garbage
collector tuned for throughput."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Iterator

import pytest
import uvloop

from shared import gcpolicy
from shared.config import Settings
from shared.kafka.service import run


@pytest.fixture(autouse=True)
def gc_restored() -> Iterator[None]:
    """``run`` tunes this (the test) process's collector: put it back for the other tests."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


async def loop_in_use() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_processes_run_on_uvloop_by_default() -> None:
    assert isinstance(run(loop_in_use(), Settings().event_loop), uvloop.Loop)


def test_asyncio_loop_is_one_setting_away(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMSBRIDGE_EVENT_LOOP", "asyncio")
    loop = run(loop_in_use(), Settings().event_loop)
    assert not isinstance(loop, uvloop.Loop)
    assert isinstance(loop, asyncio.BaseEventLoop)


def test_unknown_loop_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMSBRIDGE_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match="event_loop"):
        Settings()


def test_without_uvloop_the_process_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    loop = run(loop_in_use(), "uvloop")
    assert type(loop).__module__.startswith("asyncio")


async def young_threshold() -> int:
    return gc.get_threshold()[0]


def test_processes_collect_garbage_by_the_throughput_policy() -> None:
    assert gc.get_threshold()[0] != gcpolicy.YOUNG_THRESHOLD
    assert run(young_threshold(), "asyncio") == gcpolicy.YOUNG_THRESHOLD
    assert gc.get_freeze_count() > 0  # start-up's objects are out of every collection
