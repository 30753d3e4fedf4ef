from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from shared.config import KafkaSettings
from shared.contract.events import StateChange, decode
from shared.contract.topics import NORMALIZER_STATE
from shared.kafka.clients import OutRecord
from shared.kafka.store import ChangelogStore, KeyLocks, PartitionNotReady


def make_store(state_dir: str = "") -> ChangelogStore:
    return ChangelogStore(KafkaSettings(), NORMALIZER_STATE, state_dir=state_dir, name="test")


def changelog_of(records: list[OutRecord]) -> list[tuple[bytes | None, bytes | None]]:
    return [record.encoded for record in records]


@pytest.fixture
def store() -> Iterator[ChangelogStore]:
    store = make_store()
    store.load(3, [])
    yield store
    store.close()


def test_put_get_and_the_changelog_record(store: ChangelogStore) -> None:
    record = store.put(3, "acct:sms-1", {"status": "sent", "n": 1}, due_at=100.0)

    assert store.get(3, "acct:sms-1") == {"status": "sent", "n": 1}
    assert store.get_entry(3, "acct:sms-1") == ({"status": "sent", "n": 1}, 100.0)
    assert store.get(3, "acct:other") is None
    # The changelog goes to the input's partition number, keyed like the store.
    assert record.topic == NORMALIZER_STATE
    assert record.partition == 3
    assert record.key == "acct:sms-1"
    change = decode(StateChange, record.encoded[1])
    assert change.value == {"status": "sent", "n": 1}
    assert change.due_at == 100.0
    # Built from the stored bytes: the same as the event's own encoding, with or without a timer.
    assert record.encoded[1] == change.to_bytes()
    value = {"nested": {"a": [1, 2.5, None]}, "text": "é\n"}
    untimed = store.put(3, "acct:sms-2", value)
    assert untimed.encoded[1] == StateChange(value=value, due_at=None).to_bytes()


async def test_a_wrong_hint_is_mended_when_the_write_reaches_the_file(tmp_path: Path) -> None:
    store = make_store(str(tmp_path))
    store.load(3, [])
    try:
        store.put(3, "k", {"v": 1}, existed=False)
        store.put(3, "gone", {"v": 1})
        store.flush()
        store.put(3, "k", {"v": 2}, due_at=5.0, existed=False)  # wrong: it is there
        store.put(3, "gone", None, existed=False)  # wrong too
        store.put(3, "never", {"v": 3}, existed=True)  # and this one was not there

        assert store.get_entry(3, "k") == ({"v": 2}, 5.0)
        store.flush()
        assert store.count(3) == 2
        assert _committed_keys(store, 3) == ["k", "never"]
        assert store.get_entry(3, "k") == ({"v": 2}, 5.0)
        assert store.get(3, "gone") is None
    finally:
        store.close()


def test_delete_is_a_tombstone(store: ChangelogStore) -> None:
    store.put(3, "k", {"a": 1})
    record = store.put(3, "k", None)

    assert store.get(3, "k") is None
    assert record.value is None
    assert record.encoded == (b"k", None)
    assert record.partition == 3


def test_due_lists_only_entries_whose_time_has_come_earliest_first(store: ChangelogStore) -> None:
    store.put(3, "late", {"v": "late"}, due_at=300.0)
    store.put(3, "early", {"v": "early"}, due_at=100.0)
    store.put(3, "never", {"v": "never"}, due_at=None)
    store.put(3, "middle", {"v": "middle"}, due_at=200.0)

    assert store.due(3, 50.0) == []
    assert store.due(3, 200.0) == [("early", {"v": "early"}), ("middle", {"v": "middle"})]
    assert [key for key, _ in store.due(3, 1e12)] == ["early", "middle", "late"]
    assert [key for key, _ in store.due(3, 1e12, limit=1)] == ["early"]

    store.put(3, "early", {"v": "early"}, due_at=400.0)  # re-armed
    assert [key for key, _ in store.due(3, 300.0)] == ["middle", "late"]


def test_partitions_are_separate(store: ChangelogStore) -> None:
    store.load(4, [])
    store.put(3, "k", {"p": 3}, due_at=1.0)
    store.put(4, "k", {"p": 4}, due_at=1.0)

    assert store.get(3, "k") == {"p": 3}
    assert store.get(4, "k") == {"p": 4}
    assert store.partitions() == [3, 4]


def test_restore_from_changelog_records_rebuilds_the_same_state(store: ChangelogStore) -> None:
    written = [
        store.put(3, "a", {"v": 1}, due_at=10.0),
        store.put(3, "b", {"v": 2}),
        store.put(3, "a", {"v": 3}, due_at=30.0),  # the latest value wins
        store.put(3, "c", {"v": 4}, due_at=5.0),
        store.put(3, "c", None),  # tombstone
    ]

    rebuilt = make_store()
    try:
        rebuilt.load(3, changelog_of(written))
        assert rebuilt.get_entry(3, "a") == ({"v": 3}, 30.0)
        assert rebuilt.get_entry(3, "b") == ({"v": 2}, None)
        assert rebuilt.get(3, "c") is None
        assert rebuilt.count(3) == 2
        assert rebuilt.due(3, 100.0) == [("a", {"v": 3})]
    finally:
        rebuilt.close()


def test_restore_skips_unreadable_records_but_keeps_the_rest(store: ChangelogStore) -> None:
    good = store.put(3, "good", {"v": 1})
    store.load(
        3,
        [
            (b"bad-json", b"{not json"),
            (b"bad-shape", orjson.dumps({"value": [1, 2]})),
            (b"bad-version", orjson.dumps({"schema_version": 99, "value": {}})),
            (None, b"{}"),
            good.encoded,
        ],
    )

    assert store.get(3, "good") == {"v": 1}
    assert store.count(3) == 1


COUNTED = ("parked:held:", "parked:retry:")


def counting_store(max_pending: int = 4096) -> ChangelogStore:
    return ChangelogStore(
        KafkaSettings(),
        NORMALIZER_STATE,
        name="test",
        counted_prefixes=COUNTED,
        max_pending=max_pending,
    )


def counts(store: ChangelogStore, partition: int = 3) -> tuple[int, int, int]:
    """Every entry, the held ones and the retry ones."""
    return (
        store.count(partition),
        store.count_prefix(partition, "parked:held:"),
        store.count_prefix(partition, "parked:retry:"),
    )


def test_running_counts_follow_puts_overwrites_and_deletes() -> None:
    store = counting_store()
    try:
        store.load(3, [])
        store.put(3, "parked:held:m-1", {"v": 1})
        store.put(3, "parked:held:m-2", {"v": 1}, due_at=10.0)
        store.put(3, "parked:retry:m-3", {"v": 1})
        store.put(3, "m-1", {"v": 1})
        assert counts(store) == (4, 2, 1)

        store.put(3, "parked:held:m-1", {"v": 2}, due_at=20.0)  # an overwrite adds nothing
        store.put(3, "parked:held:m-1", {"v": 2}, due_at=20.0)  # nor the same value again
        assert counts(store) == (4, 2, 1)
        assert store.get_entry(3, "parked:held:m-1") == ({"v": 2}, 20.0)

        store.put(3, "parked:held:m-2", None)
        store.put(3, "parked:held:m-2", None)  # a tombstone of a key not there removes nothing
        store.put(3, "parked:retry:never", None)
        assert counts(store) == (3, 1, 1)
        assert store.count_prefix(3, "") == 3
    finally:
        store.close()


@pytest.mark.parametrize("max_pending", [4096, 7])
async def test_running_counts_agree_with_the_entries_after_random_writes(max_pending: int) -> None:
    """In an event loop, as the services write: writes wait in memory, flushed now and then
    (or as soon as ``max_pending`` wait), with and without the callers' hints."""
    store = counting_store(max_pending=max_pending)
    rng = random.Random(7)
    # "parked:h..." and "parked:held" sort next to the counted prefixes without being under them.
    names = ("parked:held:", "parked:retry:", "parked:h", "parked:held", "other:")
    keys = [f"{name}{n}" for name in names for n in range(15)]
    model: dict[str, int] = {}
    try:
        store.load(3, [])
        store.load(4, [])
        for step in range(3000):
            key = rng.choice(keys)
            # Read first, as the services do: a key found missing is remembered as such.
            assert store.get(3, key) == ({"step": model[key]} if key in model else None)
            hint = rng.choice([None, key in model])
            if rng.random() < 0.35:
                store.put(3, key, None, existed=hint)
                model.pop(key, None)
            else:
                due_at = rng.choice([None, float(step)])
                store.put(3, key, {"step": step}, due_at=due_at, existed=hint)
                model[key] = step
            store.put(4, key, {"step": step})  # another partition's writes count there only
            assert store.get(3, key) == ({"step": model[key]} if key in model else None)
            if step % 100 == 0:
                store.flush()

        assert store.count(3) == len(model)
        for prefix in (*COUNTED, "parked:", "parked:h", "other:"):  # counted, and queried
            assert store.count_prefix(3, prefix) == sum(key.startswith(prefix) for key in model)
        assert store.count(4) == len(keys)
    finally:
        store.close()


def test_running_counts_are_rebuilt_by_a_load_and_forgotten_by_a_drop() -> None:
    store = counting_store()
    rebuilt = counting_store()
    try:
        store.load(3, [])
        written = [
            store.put(3, "parked:held:m-1", {"v": 1}),
            store.put(3, "parked:held:m-2", {"v": 1}),
            store.put(3, "parked:retry:m-3", {"v": 1}, due_at=5.0),
            store.put(3, "parked:held:m-1", {"v": 2}),  # overwritten
            store.put(3, "parked:held:m-2", None),  # deleted
            store.put(3, "m-1", {"v": 1}),
        ]
        unreadable = (b"parked:held:bad", b"{not json")

        rebuilt.load(3, [*changelog_of(written), unreadable])
        assert counts(rebuilt) == counts(store) == (3, 1, 1)
        rebuilt.put(3, "parked:retry:m-4", {"v": 1})  # writes go on from the loaded counts
        assert counts(rebuilt) == (4, 1, 2)

        rebuilt.drop([3])
        with pytest.raises(PartitionNotReady):
            rebuilt.count(3)
        with pytest.raises(PartitionNotReady):
            rebuilt.count_prefix(3, "parked:held:")
        rebuilt.load(3, [])
        assert counts(rebuilt) == (0, 0, 0)
        rebuilt.load(3, changelog_of(written[:2]))  # a load replaces the partition's counts
        assert counts(rebuilt) == (2, 2, 0)
    finally:
        rebuilt.close()
        store.close()


def test_a_partition_not_restored_or_dropped_is_not_served(store: ChangelogStore) -> None:
    with pytest.raises(PartitionNotReady):
        store.get(7, "k")
    with pytest.raises(PartitionNotReady):
        store.put(7, "k", {"v": 1})

    store.put(3, "k", {"v": 1})
    store.drop([3])

    assert not store.is_ready(3)
    with pytest.raises(PartitionNotReady):
        store.due(3, 0.0)
    store.load(3, [])
    assert store.get(3, "k") is None  # a new assignment starts from the changelog only


def test_state_lives_on_disk_and_files_of_an_earlier_process_are_not_trusted(
    tmp_path: Path,
) -> None:
    first = make_store(str(tmp_path))
    first.load(0, [])
    first.put(0, "k", {"v": 1})
    directory = tmp_path / NORMALIZER_STATE.name
    assert any(directory.glob("0.*.sqlite3"))
    first.drop([0])
    assert not any(directory.iterdir())  # dropped partitions leave no files behind

    first.load(0, [])
    first.put(0, "k", {"v": 1})
    leftover = make_store(str(tmp_path))  # a restarted process on the same directory
    try:
        assert not any(directory.iterdir())
        leftover.load(0, [])
        assert leftover.get(0, "k") is None
    finally:
        leftover.close()
        first.close()


def test_private_directory_is_removed_on_close() -> None:
    store = make_store()
    store.load(0, [])
    store.put(0, "k", {"v": 1})
    directory = store.directory

    store.close()

    assert not directory.exists()


async def test_key_locks_serialise_one_key_and_not_others() -> None:
    locks = KeyLocks()
    order: list[str] = []

    async def writer(name: str, key: str, pause: float) -> None:
        async with locks.hold(0, key):
            order.append(f"{name}+")
            await asyncio.sleep(pause)
            order.append(f"{name}-")

    first = asyncio.create_task(writer("a", "k", 0.05))
    await asyncio.sleep(0)
    assert locks.is_held(0, "k")
    await asyncio.gather(first, writer("b", "k", 0), writer("c", "other", 0))

    assert order.index("a-") < order.index("b+")  # same key: one after the other
    assert order.index("c+") < order.index("a-")  # another key: not held up
    assert not locks.is_held(0, "k")
    assert not locks.is_held(0, "other")


async def test_a_waiter_cancelled_before_or_after_its_turn_passes_the_key_on() -> None:
    locks = KeyLocks()
    entered: list[str] = []

    async def writer(name: str) -> None:
        async with locks.hold(0, "k"):
            entered.append(name)
            await asyncio.sleep(0.01)

    async with locks.hold(0, "k"):
        waiting = [asyncio.create_task(writer(name)) for name in ("a", "b", "c")]
        await asyncio.sleep(0)
        waiting[0].cancel()  # cancelled while it waits
    # "b" was handed the key by the release above; cancelled before it could run, it must
    # hand it on to "c" rather than keep it for ever.
    waiting[1].cancel()
    await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 1.0)

    assert entered == ["c"]
    assert not locks.is_held(0, "k")


async def test_holding_overlapping_sets_of_keys_in_any_order_never_deadlocks() -> None:
    locks = KeyLocks()
    inside: list[str] = []

    async def holder(name: str, keys: list[str]) -> None:
        async with locks.hold_all(0, keys):
            assert all(locks.is_held(0, key) for key in keys)
            inside.append(name)
            await asyncio.sleep(0.01)

    await asyncio.wait_for(
        asyncio.gather(holder("a", ["x", "y", "z"]), holder("b", ["z", "y"]), holder("c", ["y"])),
        1.0,
    )
    assert sorted(inside) == ["a", "b", "c"]
    assert not any(locks.is_held(0, key) for key in "xyz")


def _file(store: ChangelogStore, partition: int) -> sqlite3.Connection:
    """The partition's file, through the store's own connection (it holds the file's lock)."""
    return store._ready[partition].connection


def _committed_keys(store: ChangelogStore, partition: int) -> list[str]:
    """The keys in a partition's file: what its writes that reached it left."""
    return [
        key for (key,) in _file(store, partition).execute("SELECT key FROM entries ORDER BY key")
    ]


async def test_writes_wait_in_memory_and_reach_the_file_together(tmp_path: Path) -> None:
    store = ChangelogStore(
        KafkaSettings(),
        NORMALIZER_STATE,
        state_dir=str(tmp_path),
        name="test",
        flush_after_s=0.05,
        max_pending=3,
    )
    store.load(1, [])
    store.load(2, [])
    try:
        store.put(1, "a", {"v": 1}, due_at=5.0)
        store.put(1, "a", {"v": 2}, due_at=6.0)
        store.put(2, "b", {"v": 2})
        # The store reads its own writes at once...
        assert store.get_entry(1, "a") == ({"v": 2}, 6.0)
        assert _committed_keys(store, 1) == []
        # ...a query over many keys sees them (its partition's writes go to the file first)...
        assert [key for key, _ in store.due(1, 10.0)] == ["a"]
        assert _committed_keys(store, 1) == ["a"]
        assert _committed_keys(store, 2) == []
        # ...and every partition's writes go to the file within ``flush_after_s``.
        await asyncio.sleep(0.1)
        assert _committed_keys(store, 2) == ["b"]
        # A partition with ``max_pending`` writes waiting writes them before it takes another.
        for key in ("c", "d", "e"):
            store.put(2, key, {"v": 3})
        assert _committed_keys(store, 2) == ["b"]
        store.put(2, "f", {"v": 4})
        assert _committed_keys(store, 2) == ["b", "c", "d", "e"]
        assert store.count(2) == 5
        assert store.get(2, "f") == {"v": 4}
    finally:
        store.close()


async def test_a_failed_flush_keeps_the_writes_pending_and_mends_the_counts_once() -> None:
    store = counting_store()
    store.load(3, [])
    try:
        # Both said to exist, wrongly: the flush finds out, and mends the counts.
        store.put(3, "parked:held:b", {"v": 1}, existed=True)
        store.put(3, "parked:held:z", {"v": 1}, existed=True)
        assert counts(store) == (0, 0, 0)
        file = _file(store, 3)
        file.execute(
            "CREATE TEMP TRIGGER refuse BEFORE INSERT ON entries WHEN NEW.key LIKE '%:z' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        with pytest.raises(sqlite3.IntegrityError):
            store.flush()  # b is written, then z is refused: the transaction is undone
        assert store.get(3, "parked:held:b") == {"v": 1}
        assert counts(store) == (0, 0, 0)

        file.execute("DROP TRIGGER refuse")
        store.flush()
        assert counts(store) == (2, 2, 0)
        assert [key for key, _ in store.scan_prefix(3, "parked:")] == [
            "parked:held:b",
            "parked:held:z",
        ]
    finally:
        store.close()


def test_a_normalizer_sized_state_keeps_to_its_page(store: ChangelogStore) -> None:
    """States of 1 to 1.5 KiB (the normalizer's) sit in their table's pages: a table that spilled
    each into an overflow page of its own (a WITHOUT ROWID table does above about 1 KiB) took
    twice the file and three times the time per statement (docs/performance.md)."""
    for number in range(1000):
        store.put(3, f"otpiq-bench:sms-{number:08d}", {"state": "x" * 1400})
    store.flush()
    file = _file(store, 3)
    pages = file.execute("PRAGMA page_count").fetchone()[0]
    page_size = file.execute("PRAGMA page_size").fetchone()[0]
    # 1,000 values of about 1.4 KiB: 1.4 MB and the keys, where one page each would be 4 MB.
    assert pages * page_size < 2_200_000, pages * page_size
