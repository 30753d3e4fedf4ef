"""Parking a message: it waits in ``sms.sender-state`` for its time, a retry, a circuit, or its
campaign's resume, and its input offset is committed meanwhile (``state.py`` for the phases,
``timers.py`` for what wakes it, docs/sending.md for why nothing blocks a partition)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from services.sender import metrics
from services.sender.controls import released_by
from services.sender.state import (
    PARK_REASONS,
    PARKED_PREFIX,
    STAGE,
    ParkedMarker,
    ParkReason,
    SendState,
    StateWriter,
    message_of,
    parked_key,
    parse_parked_key,
)
from shared.config import Settings
from shared.kafka.store import ChangelogStore, KeyLocks, PartitionNotReady
from shared.kafka.timers import run_timer_passes
from shared.logs import mask_number

if TYPE_CHECKING:  # parking is below attempts (a retry parks): types only
    from services.sender.attempts import Attempts
    from services.sender.lookups import Lookups

log = logging.getLogger(__name__)

# Parked entries looked at per partition per timer pass.
_TIMER_BATCH = 500
# Parked markers read at a time when the campaign controls change.
_SCAN_PAGE = 1000
# The key prefix of each reason's parked markers, whose counts the PARKED gauge shows.
PARKED_PREFIXES = {reason: parked_key(reason, "") for reason in PARK_REASONS}
# How often the timer loop refreshes the gauges.
_GAUGE_INTERVAL_S = 5.0
_HELD = metrics.CAMPAIGN_CONTROL.labels("held")

# Work on a due (or released) parked entry: (partition, key, now, released).
OnDue = Callable[[int, str, float, bool], Coroutine[Any, Any, None]]


async def park(
    writer: StateWriter, partition: int, state: SendState, due: float, reason: ParkReason
) -> None:
    """Store ``state`` as parked until ``due`` (a held message: until its validity ends, then it
    is reported expired, resumed or not)."""
    stored_reason = state.park_reason
    if reason == "held" and stored_reason != "held":
        _HELD.inc()
        message = message_of(state)
        log.debug(
            "held %s: campaign paused",
            mask_number(message.destination),
            extra={"message_id": message.context.message_id},
        )
    state.phase, state.park_reason, state.call = "parked", reason, []
    await writer.publish_persistently(writer.put(partition, state, due, stored_reason))
    if reason == "scheduled":
        log.debug(
            "parked until %s",
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(due)),
            extra={"message_id": state.message_id},
        )


class Timers:
    """Wakes parked messages: a task that, every ``timer_interval_s``, starts work on the entries
    due (``on_due``, at most ``max_in_flight`` at a time), and on those the campaign controls
    released (after a change, or when partitions are assigned, their markers are scanned)."""

    def __init__(
        self,
        settings: Settings,
        store: ChangelogStore,
        locks: KeyLocks,
        attempts: Attempts,
        lookups: Lookups,
        on_due: OnDue,
        *,
        closing: set[int],
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.store = store
        self.locks = locks
        self.attempts = attempts
        self.lookups = lookups
        self._on_due = on_due
        self._closing = closing  # the handler's: partitions being revoked
        self.clock = clock
        self.monotonic = monotonic
        # Partitions whose parked messages must be looked at again (the controls changed, or
        # they were assigned), the scan doing it, and the messages it released.
        self._rescan: set[int] = set()
        self._scan_task: asyncio.Task[None] | None = None
        self._releases: dict[tuple[int, str], None] = {}
        self._work: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._max_work = max(1, settings.sender.runner.max_in_flight)
        self._gauges_refreshed_at = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{STAGE}-timers")

    async def stop(self) -> None:
        for task in (self._task, self._scan_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._scan_task = None

    def settle(self, mine: Callable[[int], bool]) -> list[asyncio.Task[Any]]:
        """Cancel the work of the partitions ``mine`` names; returns its tasks."""
        for (partition, _), task in list(self._work.items()):
            if mine(partition):
                task.cancel()
        return [task for (partition, _), task in self._work.items() if mine(partition)]

    # -- due entries -----------------------------------------------------------------------

    def fire(self, now: float) -> list[asyncio.Task[None]]:
        """Start work on every parked entry due at ``now``, then on the messages the campaign
        controls released; returns the tasks started."""
        started: list[asyncio.Task[None]] = []
        for partition in self.store.partitions():
            if partition in self._closing:
                continue
            for key, _ in self.store.due(partition, now, limit=_TIMER_BATCH):
                if len(self._work) >= self._max_work:
                    return started
                task = self._start_work(partition, key, now, released=False)
                if task is not None:
                    started.append(task)
        for slot in list(self._releases):
            if len(self._work) >= self._max_work:
                break
            partition, key = slot
            if partition in self._closing or not self.store.is_ready(partition):
                del self._releases[slot]  # revoked: its new owner looks at it
                continue
            task = self._start_work(partition, key, now, released=True)
            if task is not None:
                del self._releases[slot]
                started.append(task)
        return started

    def _start_work(
        self, partition: int, key: str, now: float, *, released: bool
    ) -> asyncio.Task[None] | None:
        slot = (partition, key)
        if slot in self._work or self.attempts.in_flight(key):
            return None
        if self.locks.is_held(partition, key):
            return None  # a record of this message is being handled; next pass
        task = asyncio.create_task(self._on_due(partition, key, now, released))
        self._work[slot] = task

        def forget(finished: asyncio.Task[None]) -> None:
            if self._work.get(slot) is finished:
                del self._work[slot]

        task.add_done_callback(forget)
        return task

    async def _run(self) -> None:
        interval = self.settings.sender.timer_interval_s
        await run_timer_passes(self._run_pass, lambda: asyncio.sleep(interval), name=STAGE)

    async def _run_pass(self) -> None:
        """One pass of the timer loop: it only starts work (each piece handles its own errors)."""
        if self._rescan and (self._scan_task is None or self._scan_task.done()):
            self._scan_task = asyncio.create_task(
                self._rescan_and_fire(), name=f"{STAGE}-control-scan"
            )
        self.fire(self.clock())
        if self.monotonic() - self._gauges_refreshed_at >= _GAUGE_INTERVAL_S:
            self._gauges_refreshed_at = self.monotonic()
            self.refresh_gauges()

    # -- released by the campaign controls -------------------------------------------------

    def look_again(self, partitions: Iterable[int]) -> None:
        """The parked messages of ``partitions`` are to be scanned on the next pass."""
        self._rescan |= set(partitions)

    async def _rescan_and_fire(self) -> None:
        try:
            if await self.rescan():
                self.fire(self.clock())
        except Exception:
            log.exception("%s: looking at parked messages after a control change failed", STAGE)

    async def rescan(self) -> int:
        """Queue for the timer every parked message the controls now release (a resumed hold,
        any wait of a cancelled campaign) on the partitions due for a look; returns how many."""
        partitions, self._rescan = self._rescan, set()
        queued = 0
        for partition in sorted(partitions):
            try:
                queued += await self._scan_parked(partition)
            except PartitionNotReady:
                continue  # revoked meanwhile
        if queued:
            log.info("%s: %d parked message(s) released by campaign controls", STAGE, queued)
        return queued

    async def _scan_parked(self, partition: int) -> int:
        queued = 0
        after = ""
        while True:
            if partition in self._closing:
                return queued
            page = self.store.scan_prefix(partition, PARKED_PREFIX, after=after, limit=_SCAN_PAGE)
            for key, value in page:
                reason, message_id = parse_parked_key(key)
                marker: ParkedMarker | None = ParkedMarker.model_validate(value)
                if marker is not None and not marker.tenant:
                    marker = self._marker_of(partition, message_id)
                if marker is None:
                    continue
                effect = self.lookups.effect(marker.tenant, marker.campaign_id)
                if released_by(effect, reason) and (partition, message_id) not in self._releases:
                    self._releases[(partition, message_id)] = None
                    queued += 1
            if len(page) < _SCAN_PAGE:
                return queued
            after = page[-1][0]
            await asyncio.sleep(0)  # a long scan must not hold up the sends of others

    def _marker_of(self, partition: int, message_id: str) -> ParkedMarker | None:
        """Whose message it is, read from its state (a marker written without it)."""
        value = self.store.get(partition, message_id)
        if value is None:
            return None
        state = SendState.from_value(value)
        return ParkedMarker.of(state.message) if state.message is not None else None

    def refresh_gauges(self) -> None:
        """Set the gauges from the store's running counts (no query)."""
        partitions = self.store.partitions()
        for reason, prefix in PARKED_PREFIXES.items():
            metrics.PARKED.labels(reason).set(
                sum(self.store.count_prefix(p, prefix) for p in partitions)
            )
        metrics.STATE_ENTRIES.set(sum(self.store.count(p) for p in partitions))
        self.attempts.limits.export()
