"""Changelog-backed local state: a key/value store per input partition, rebuilt from Kafka.

Each partition's entries live in their own SQLite file; every change is also a record on a
compacted changelog topic, co-partitioned with the input: ``put`` returns that record and the
caller publishes it with its other outputs (``shared/kafka/unit_of_work.py``), so an input offset is
committed only once the state change it caused is on Kafka. A partition is served only after
``restore`` has read its changelog to the end. Entries may carry ``due_at`` for timers (``due``).
Writes wait in memory for up to a second before they reach the file (``_flush_soon``).
Restore, counts and files: docs/architecture.md, "Changelog state".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from shared.config import KafkaSettings
from shared.contract.events import StateChange
from shared.contract.topics import Topic
from shared.kafka.clients import KafkaUnavailable, OutRecord, make_consumer

log = logging.getLogger(__name__)

# A rowid table: a value keeps to its leaf page up to about 4 KiB there, where a WITHOUT ROWID
# table spills anything over about 1 KiB (the normalizer's states) into an overflow page of its
# own, read and written apart: twice the file, three times the time per statement.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    due_at REAL
);
CREATE INDEX IF NOT EXISTS entries_by_due ON entries (due_at) WHERE due_at IS NOT NULL;
"""
_INSERT = "INSERT INTO entries (key, value, due_at) VALUES (?, ?, ?)"
_UPDATE = "UPDATE entries SET value = ?, due_at = ? WHERE key = ?"
_DELETE = "DELETE FROM entries WHERE key = ?"
# Keys remembered as missing from a partition's file, at most (``_Database.absent``).
_MAX_ABSENT = 4096
_STATE_CHANGE_VERSION = StateChange.model_fields["schema_version"].default


def _state_change_bytes(encoded_value: bytes, due_at: float | None) -> bytes:
    """``StateChange(value=..., due_at=...).to_bytes()``, from the value's bytes."""
    return b'{"schema_version":%d,"value":%s,"due_at":%s}' % (
        _STATE_CHANGE_VERSION,
        encoded_value,
        orjson.dumps(due_at),
    )


class PartitionNotReady(KafkaUnavailable):
    """The partition is not assigned here or its state is not restored yet; retry later."""


class Entry(NamedTuple):
    value: dict[str, Any]
    due_at: float | None


class _Pending(NamedTuple):
    """A key's newest write not yet in the file, and whether the file was believed to hold the
    key before it (the running counts were kept from that belief; the flush checks it)."""

    encoded: bytes | None  # None: deleted
    due_at: float | None
    in_file: bool


@dataclass
class _Database:
    connection: sqlite3.Connection
    path: Path
    # Running counts (see the module docstring): every entry, and those under each counted prefix.
    entries: int = 0
    by_prefix: dict[str, int] = field(default_factory=dict)
    # Writes not yet in the file, newest per key: read before it (see ``ChangelogStore.flush``).
    pending: dict[str, _Pending] = field(default_factory=dict)
    # Keys lately found missing from the file, and not written since: read again before they are
    # written (the reporter looks for an acknowledgement before its post and again under its
    # lock; the sender reads a message's state, then stores its first).
    absent: set[str] = field(default_factory=set)

    def counted(self, key: str, delta: int) -> None:
        """Count ``key`` as added (+1) or removed (-1)."""
        self.entries += delta
        for prefix in self.by_prefix:
            if key.startswith(prefix):
                self.by_prefix[prefix] += delta

    def recount(self, prefixes: Iterable[str]) -> None:
        """Count from the file (after a restore wrote it without counting)."""
        self.entries = int(self.connection.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
        self.by_prefix = {prefix: _count_prefix(self.connection, prefix) for prefix in prefixes}

    def in_file(self, key: str, hint: bool | None) -> bool:
        """Whether the file holds ``key``: the caller's ``hint`` (it read the key under its
        lock), else the keys known missing, else the file itself."""
        if hint is not None:
            return hint
        if key in self.absent:
            return False
        row = self.connection.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone()
        return row is not None

    def read(self, key: str) -> Entry | None:
        """The key's entry: a pending write, else the file."""
        pending = self.pending.get(key)
        if pending is not None:
            if pending.encoded is None:
                return None
            return Entry(orjson.loads(pending.encoded), pending.due_at)
        if key in self.absent:
            return None
        row = self.connection.execute(
            "SELECT value, due_at FROM entries WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            if len(self.absent) >= _MAX_ABSENT:
                self.absent.clear()
            self.absent.add(key)
            return None
        return Entry(orjson.loads(row[0]), row[1])

    def flush(self) -> None:
        """Write the pending writes to the file in one transaction, one statement per key.

        Each statement also tells whether the file held the key; where that differs from the
        belief the running counts were kept from (a wrong hint), the counts are mended once the
        transaction is in (a failed one keeps every write pending, to be flushed again).
        """
        if not self.pending:
            return
        self.absent.difference_update(self.pending)  # in the file from now on, or not
        mends: list[tuple[str, int]] = []
        with _transaction(self.connection):
            for key, (encoded, due_at, believed) in self.pending.items():
                held = self._write(key, encoded, due_at, believed)
                if held != believed:
                    mends.append((key, int(believed) - int(held)))
        self.pending.clear()
        for key, delta in mends:
            self.counted(key, delta)

    def _write(self, key: str, encoded: bytes | None, due_at: float | None, believed: bool) -> bool:
        """One key's write, in the statement ``believed`` (held in the file) calls for first;
        whether the file held the key."""
        execute = self.connection.execute
        if encoded is None:
            return execute(_DELETE, (key,)).rowcount > 0
        if believed:
            if execute(_UPDATE, (encoded, due_at, key)).rowcount > 0:
                return True
            execute(_INSERT, (key, encoded, due_at))
            return False
        try:
            execute(_INSERT, (key, encoded, due_at))
            return False
        except sqlite3.IntegrityError:  # the statement alone is undone
            execute(_UPDATE, (encoded, due_at, key))
            return True

    def close_and_remove(self) -> None:
        self.pending.clear()
        self.absent.clear()
        self.connection.close()
        _remove_database(self.path)


class ChangelogStore:
    """Local state per partition of one changelog topic; see the module docstring."""

    def __init__(
        self,
        kafka: KafkaSettings,
        changelog: Topic,
        *,
        state_dir: str = "",
        name: str,
        restore_stall_timeout_s: float = 30.0,
        counted_prefixes: Iterable[str] = (),
        flush_after_s: float = 1.0,
        max_pending: int = 4096,
    ) -> None:
        """``counted_prefixes``: key prefixes whose ``count_prefix`` a gauge reads often.
        ``flush_after_s``, ``max_pending``: how long, and how many per partition, writes may
        wait in memory before they go to the file (``_flush_soon``)."""
        self.kafka = kafka
        self.changelog = changelog
        self.name = name
        self.restore_stall_timeout_s = restore_stall_timeout_s
        self.counted_prefixes = tuple(dict.fromkeys(p for p in counted_prefixes if p))
        if state_dir:
            self.directory = Path(state_dir) / changelog.name
            self._private_dir: Path | None = None
            # Files of an earlier process are never trusted (see the module docstring).
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            self._private_dir = Path(tempfile.mkdtemp(prefix=f"smsbridge-{name}-"))
            self.directory = self._private_dir / changelog.name
        self.directory.mkdir(parents=True, exist_ok=True)
        self._ready: dict[int, _Database] = {}
        self._restoring: dict[int, asyncio.Task[None]] = {}
        # Bumped by ``drop``: a restore that finishes for an older epoch is thrown away.
        self._epochs: dict[int, int] = {}
        # A fresh file per restore: an abandoned restore may still be writing its own.
        self._file_numbers = count()
        self.flush_after_s = flush_after_s
        self.max_pending = max_pending
        self._flush_timer: asyncio.TimerHandle | None = None

    # -- reading and writing -------------------------------------------------------------------

    def is_ready(self, partition: int) -> bool:
        return partition in self._ready

    def partitions(self) -> list[int]:
        return sorted(self._ready)

    def get(self, partition: int, key: str) -> dict[str, Any] | None:
        entry = self.get_entry(partition, key)
        return entry.value if entry is not None else None

    def get_entry(self, partition: int, key: str) -> Entry | None:
        return self._database(partition).read(key)

    def put(
        self,
        partition: int,
        key: str,
        value: dict[str, Any] | None,
        due_at: float | None = None,
        *,
        existed: bool | None = None,
    ) -> OutRecord:
        """Store ``value`` (None deletes) and return the changelog record to publish.

        ``existed``: whether the key had a value, when the caller read it a moment ago under its
        lock (the running counts need to know, and then need not ask the file).
        """
        database = self._database(partition)
        if len(database.pending) >= self.max_pending:
            database.flush()  # first: if the file fails us, nothing is half written
        pending = database.pending.get(key)
        if pending is not None:
            in_file, holds = pending.in_file, pending.encoded is not None
        else:
            in_file = holds = database.in_file(key, existed)
        encoded = orjson.dumps(value) if value is not None else None
        database.pending[key] = _Pending(encoded, due_at, in_file)
        if holds != (encoded is not None):
            database.counted(key, +1 if encoded is not None else -1)
        self._flush_soon(database)
        if value is None or encoded is None:  # the one condition, said twice for mypy
            return OutRecord(self.changelog, key, None, partition=partition)
        # Our own JSON-shaped dict: not validated again, and its bytes reused for the changelog.
        change = StateChange.model_construct(value=value, due_at=due_at)
        return OutRecord.with_bytes(
            self.changelog, key, change, _state_change_bytes(encoded, due_at), partition=partition
        )

    def due(
        self, partition: int, now: float, limit: int = 1000
    ) -> list[tuple[str, dict[str, Any]]]:
        """Entries whose ``due_at`` is at or before ``now``, earliest first."""
        rows = (
            self._flushed(partition)
            .execute(
                "SELECT key, value FROM entries WHERE due_at IS NOT NULL AND due_at <= ? "
                "ORDER BY due_at LIMIT ?",
                (now, limit),
            )
            .fetchall()
        )
        return [(key, orjson.loads(value)) for key, value in rows]

    def count(self, partition: int) -> int:
        """How many entries the partition holds (a running count: no query)."""
        return self._database(partition).entries

    def count_prefix(self, partition: int, prefix: str) -> int:
        """How many keys start with ``prefix``: a running count for the ``counted_prefixes``,
        else a range over the key index (not a scan, but not free either)."""
        database = self._database(partition)
        if not prefix:
            return database.entries
        counted = database.by_prefix.get(prefix)
        if counted is not None:
            return counted
        return _count_prefix(self._flushed(partition), prefix)

    def scan_prefix(
        self, partition: int, prefix: str, *, after: str = "", limit: int = 1000
    ) -> list[tuple[str, dict[str, Any]]]:
        """Up to ``limit`` entries whose key starts with ``prefix`` and sorts after ``after``,
        in key order: page through them by passing the last key seen as ``after``."""
        rows = (
            self._flushed(partition)
            .execute(
                "SELECT key, value FROM entries WHERE key >= ? AND key > ? AND key < ? "
                "ORDER BY key LIMIT ?",
                (prefix, after, _prefix_end(prefix), limit),
            )
            .fetchall()
        )
        return [(key, orjson.loads(value)) for key, value in rows]

    def _flush_soon(self, database: _Database) -> None:
        """Writes wait in memory for up to ``flush_after_s`` (or ``max_pending`` of them).

        A key is often written several times within a second (the normalizer's three inputs of
        one message), and read between: those reads cost no query, and the writes one statement.
        Nothing but this store reads the file, and a file is never trusted after a restart, so
        when a write reaches it changes nothing but the cost; Kafka has it already. (A partition
        holding ``max_pending`` writes flushes before it takes the next: see ``put``.)
        """
        if self._flush_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            database.flush()  # outside an event loop: every write goes to the file at once
            return
        self._flush_timer = loop.call_later(self.flush_after_s, self.flush)

    def flush(self) -> None:
        """Write every partition's pending writes to its file."""
        self._cancel_flush_timer()
        for database in self._ready.values():
            database.flush()

    def _cancel_flush_timer(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None

    def _flushed(self, partition: int) -> sqlite3.Connection:
        """The partition's file with every write in it, for queries over many keys."""
        database = self._database(partition)
        database.flush()
        return database.connection

    def _database(self, partition: int) -> _Database:
        database = self._ready.get(partition)
        if database is None:
            raise PartitionNotReady(
                f"{self.changelog.name}[{partition}] is not assigned here or not restored yet"
            )
        return database

    # -- restoring -------------------------------------------------------------------------------

    def load(self, partition: int, records: Iterable[tuple[bytes | None, bytes | None]]) -> None:
        """Start ``partition`` afresh from changelog records (key, value), oldest first."""
        database = self._open_fresh(partition)
        try:
            _apply(self.name, database.connection, records)
            database.recount(self.counted_prefixes)
        except BaseException:
            database.close_and_remove()
            raise
        self._discard(partition)
        self._ready[partition] = database

    async def restore(self, partitions: Iterable[int]) -> None:
        """Make every partition in ``partitions`` ready, reading its changelog if need be.

        Concurrent callers share one read per partition. Raises KafkaUnavailable when the
        changelog cannot be read; nothing is served from a partly restored partition.
        """
        wanted = set(partitions)
        missing = {p for p in wanted if p not in self._ready and p not in self._restoring}
        if missing:
            task = asyncio.create_task(
                self._restore(missing), name=f"{self.name}-restore-{sorted(missing)}"
            )
            for partition in missing:
                self._restoring[partition] = task

            def _forget(finished: asyncio.Task[None]) -> None:
                for partition in missing:
                    if self._restoring.get(partition) is finished:
                        del self._restoring[partition]

            task.add_done_callback(_forget)
        waiting = {self._restoring[p] for p in wanted if p in self._restoring}
        if waiting:
            await asyncio.shield(asyncio.gather(*waiting))

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget the state of partitions no longer assigned here (and any restore under way)."""
        for partition in partitions:
            self._epochs[partition] = self._epochs.get(partition, 0) + 1
            # A restore under way finishes on its own and throws this partition away.
            self._restoring.pop(partition, None)
            self._discard(partition)

    def close(self) -> None:
        self._cancel_flush_timer()  # the files go with the partitions: nothing left to write
        for task in set(self._restoring.values()):
            task.cancel()
        self.drop(list(self._ready))
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)

    async def _restore(self, partitions: set[int]) -> None:
        started = time.monotonic()
        epochs = {p: self._epochs.get(p, 0) for p in partitions}
        databases = {p: self._open_fresh(p) for p in partitions}
        try:
            counts = await _read_changelog(
                self, {p: database.connection for p, database in databases.items()}
            )
            for database in databases.values():
                database.recount(self.counted_prefixes)
        except BaseException:
            for database in databases.values():
                database.close_and_remove()
            raise
        for partition, database in databases.items():
            if self._epochs.get(partition, 0) != epochs[partition]:
                database.close_and_remove()  # dropped while we were reading it
                continue
            self._discard(partition)
            self._ready[partition] = database
        log.info(
            "%s: restored %s from %s in %.2fs",
            self.name,
            {p: counts[p] for p in sorted(counts)},
            self.changelog.name,
            time.monotonic() - started,
        )

    # -- files -----------------------------------------------------------------------------------

    def _open_fresh(self, partition: int) -> _Database:
        path = self.directory / f"{partition}.{next(self._file_numbers)}.sqlite3"
        connection = _connect(path)
        connection.executescript(_SCHEMA)
        return _Database(connection, path)

    def _discard(self, partition: int) -> None:
        database = self._ready.pop(partition, None)
        if database is not None:
            database.close_and_remove()


# -- restoring ----------------------------------------------------------------------------------


async def _read_changelog(
    store: ChangelogStore, connections: dict[int, sqlite3.Connection]
) -> dict[int, int]:
    """Apply every changelog record of these partitions up to the high watermark."""
    counts = dict.fromkeys(connections, 0)
    try:
        async with _restore_consumer(store.kafka, store.name) as consumer:
            remaining = {TopicPartition(store.changelog.name, p) for p in connections}
            consumer.assign(list(remaining))
            await consumer.seek_to_beginning(*remaining)
            last_progress = time.monotonic()
            while remaining:
                batches = await consumer.getmany(*remaining, timeout_ms=200, max_records=10_000)
                for tp, records in batches.items():
                    _apply(
                        store.name, connections[tp.partition], ((r.key, r.value) for r in records)
                    )
                    counts[tp.partition] += len(records)
                    last_progress = time.monotonic()
                for tp in list(remaining):
                    highwater = consumer.highwater(tp)
                    if highwater is not None and await consumer.position(tp) >= highwater:
                        remaining.discard(tp)
                        last_progress = time.monotonic()
                if time.monotonic() - last_progress > store.restore_stall_timeout_s:
                    raise KafkaUnavailable(
                        f"{store.changelog.name}: no progress restoring "
                        f"{sorted(tp.partition for tp in remaining)} "
                        f"for {store.restore_stall_timeout_s:g}s"
                    )
    except KafkaError as exc:
        raise KafkaUnavailable(f"{type(exc).__name__}: {exc}") from exc
    return counts


@contextlib.asynccontextmanager
async def _restore_consumer(kafka: KafkaSettings, name: str) -> AsyncIterator[Any]:
    # No group: the changelog is read by position, and nothing is committed.
    consumer = make_consumer(kafka, None, role=f"{name}-restore")
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


def _apply(
    name: str,
    connection: sqlite3.Connection,
    records: Iterable[tuple[bytes | None, bytes | None]],
) -> None:
    with _transaction(connection):
        for raw_key, raw_value in records:
            if raw_key is None:
                log.error("%s: changelog record without a key skipped", name)
                continue
            key = raw_key.decode("utf-8")
            if raw_value is None:
                connection.execute(_DELETE, (key,))
                continue
            try:
                value, due_at = _read_state_change(raw_value)
            except ValueError as exc:
                # Losing one key's state beats serving none: the next input rebuilds it.
                log.error("%s: unreadable changelog record skipped: %s", name, exc)
                continue
            connection.execute(
                "INSERT OR REPLACE INTO entries (key, value, due_at) VALUES (?, ?, ?)",
                (key, value, due_at),
            )


def _count_prefix(connection: sqlite3.Connection, prefix: str) -> int:
    """How many keys start with ``prefix`` (not empty): a range over the key index."""
    row = connection.execute(
        "SELECT COUNT(*) FROM entries WHERE key >= ? AND key < ?", (prefix, _prefix_end(prefix))
    ).fetchone()
    return int(row[0])


def _prefix_end(prefix: str) -> str:
    """Every key starting with ``prefix`` sorts before this (``prefix`` with its last character
    bumped; SQLite compares TEXT as UTF-8 bytes, which keeps code point order)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _read_state_change(raw: bytes) -> tuple[bytes, float | None]:
    """The stored value (JSON bytes) and due time of one changelog record."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("value"), dict):
        raise ValueError("not a StateChange")
    if data.get("schema_version", 1) != _STATE_CHANGE_VERSION:
        raise ValueError(f"StateChange schema_version {data.get('schema_version')}")
    due_at = data.get("due_at")
    if due_at is not None and not isinstance(due_at, int | float):
        raise ValueError("StateChange due_at is not a number")
    return orjson.dumps(data["value"]), float(due_at) if due_at is not None else None


def _connect(path: Path) -> sqlite3.Connection:
    """A connection to a file only this process uses, and never trusts after it (Kafka is the
    durable copy): it holds the file's lock for good and keeps its rollback journal in memory,
    so a read or a write transaction costs no lock, journal or sync system call (a WAL file
    took file locks around every transaction and wrote every page twice)."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA locking_mode = EXCLUSIVE")
    connection.execute("PRAGMA journal_mode = MEMORY")
    connection.execute("PRAGMA synchronous = OFF")
    return connection


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    connection.execute("BEGIN")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _remove_database(path: Path) -> None:
    # The journal lives in memory (``_connect``): the file is all there is.
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class KeyLocks:
    """One writer per key, held from reading a key's state until its changelog is acknowledged.

    Two tasks writing the same key (a record handler and a timer) must publish their changelog
    records in the order they changed the state, or the changelog would end on a stale value.
    Nearly every hold finds its key free: that path costs one dict entry, no lock object (an
    ``asyncio.Lock`` per key behind a generator-based context manager was several microseconds
    per hold, paid several times per record). Waiters are served first come, first served.
    """

    def __init__(self) -> None:
        # Held keys, each with the futures of the tasks waiting for it, oldest first.
        self._waiting: dict[tuple[int, str], deque[asyncio.Future[None]]] = {}

    def is_held(self, partition: int, key: str) -> bool:
        return (partition, key) in self._waiting

    def hold(self, partition: int, key: str) -> _KeyHold:
        return _KeyHold(self._waiting, (partition, key))

    def hold_all(self, partition: int, keys: Iterable[str]) -> _KeysHold:
        """Every one of ``keys``, taken in sorted order (two holders of overlapping keys then
        never wait for each other in a circle)."""
        return _KeysHold([self.hold(partition, key) for key in sorted(set(keys))])


class _KeyHold:
    __slots__ = ("_slot", "_waiting")

    def __init__(
        self, waiting: dict[tuple[int, str], deque[asyncio.Future[None]]], slot: tuple[int, str]
    ) -> None:
        self._waiting = waiting
        self._slot = slot

    async def __aenter__(self) -> None:
        queue = self._waiting.get(self._slot)
        if queue is None:
            self._waiting[self._slot] = deque()
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # handed the key just as it was cancelled: hand it on
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    def _release(self) -> None:
        queue = self._waiting[self._slot]
        while queue:
            turn = queue.popleft()
            if not turn.done():  # a cancelled waiter's turn is done already: skip it
                turn.set_result(None)
                return
        del self._waiting[self._slot]


class _KeysHold:
    __slots__ = ("_holds", "_taken")

    def __init__(self, holds: list[_KeyHold]) -> None:
        self._holds = holds
        self._taken = 0

    async def __aenter__(self) -> None:
        try:
            for hold in self._holds:
                await hold.__aenter__()
                self._taken += 1
        except BaseException:
            await self.__aexit__()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        taken, self._taken = self._taken, 0
        for hold in reversed(self._holds[:taken]):
            hold._release()


class GlobalTable:
    """Every partition of a compacted topic, mirrored into local SQLite and kept following it.

    For lookups that cannot be partitioned like the input (the opt-out list consulted before
    every send, the number formats Optimove used): each instance holds the whole table, on disk,
    so memory stays flat however many keys there are. Values are the topic's JSON records; a
    tombstone deletes. Writes by others become visible within about one poll (~100 ms).

    ``on_change`` is called with the keys of every batch of records applied (the catch-up
    included), right after they became visible to ``get``: for owners that must act when an
    entry changes, not only read it when they need it.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: Topic,
        *,
        name: str,
        on_change: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        self.kafka = kafka
        self.topic = topic
        self.name = name
        self.on_change = on_change
        self._directory = Path(tempfile.mkdtemp(prefix=f"smsbridge-{name}-"))
        self._connection = _connect(self._directory / "table.sqlite3")
        self._connection.execute(
            "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, value BLOB NOT NULL)"
        )
        self._caught_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._caught_up.is_set()

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._connection.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        value = orjson.loads(row[0])
        return value if isinstance(value, dict) else None

    def __len__(self) -> int:
        return int(self._connection.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def values(self) -> list[dict[str, Any]]:
        """Every entry (for small tables: the whole table is read)."""
        rows = self._connection.execute("SELECT value FROM entries").fetchall()
        return [value for (raw,) in rows if isinstance(value := orjson.loads(raw), dict)]

    async def start(self, catch_up_timeout_s: float = 60.0) -> None:
        """Read the topic up to its high watermark, then keep following it in the background."""
        self._task = asyncio.create_task(self._follow(), name=f"{self.name}-follow")
        waiter = asyncio.create_task(self._caught_up.wait())
        done, _ = await asyncio.wait(
            {self._task, waiter}, timeout=catch_up_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            waiter.cancel()
            if self._task in done:
                self._task.result()  # raises what stopped the follower
            raise KafkaUnavailable(f"{self.topic.name}: not caught up in {catch_up_timeout_s}s")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._connection.close()
        shutil.rmtree(self._directory, ignore_errors=True)

    def apply(self, records: Iterable[tuple[bytes | None, bytes | None]]) -> list[str]:
        """Apply records (key, value; None deletes); returns the keys they changed."""
        keys: list[str] = []
        with _transaction(self._connection):
            for raw_key, raw_value in records:
                if raw_key is None:
                    continue
                key = raw_key.decode("utf-8")
                keys.append(key)
                if raw_value is None:
                    self._connection.execute(_DELETE, (key,))
                else:
                    self._connection.execute(
                        "INSERT OR REPLACE INTO entries (key, value) VALUES (?, ?)",
                        (key, raw_value),
                    )
        return keys

    def _changed(self, keys: Sequence[str]) -> None:
        if not keys or self.on_change is None:
            return
        try:
            self.on_change(keys)
        except Exception:
            # The owner's reaction failed; the table itself is fine and must keep following.
            log.exception("%s: on_change failed", self.name)

    async def _follow(self) -> None:
        consumer = make_consumer(self.kafka, None, role=f"{self.name}-table")
        try:
            await consumer.start()  # inside: a start that fails must close the client too
            partitions = consumer.partitions_for_topic(self.topic.name) or set(
                range(self.topic.partitions)
            )
            assigned = [TopicPartition(self.topic.name, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            behind = set(assigned)
            while True:
                batches = await consumer.getmany(timeout_ms=100, max_records=10_000)
                for records in batches.values():
                    self._changed(self.apply((r.key, r.value) for r in records))
                if behind:
                    for tp in list(behind):
                        highwater = consumer.highwater(tp)
                        if highwater is not None and await consumer.position(tp) >= highwater:
                            behind.discard(tp)
                    if not behind:
                        self._caught_up.set()
        finally:
            await consumer.stop()
