"""One unit of work: put state, publish the outputs with its changelog records, undo on failure.

A handler stores changes in its ``ChangelogStore`` as it decides, adds the records to publish,
then ``commit``s: all go to Kafka in one publish (through the outbox), in the order they were
added. If that publish fails, every stored change is put back (a retry then finds the state it
started from and recomputes the same outputs), the ``on_undo`` steps run, and the error is raised.
Once Kafka acknowledged, the ``on_commit`` steps run (metrics, logs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.kafka.clients import OutRecord
from shared.kafka.store import ChangelogStore, Entry, PartitionNotReady

Publish = Callable[[Sequence[OutRecord]], Awaitable[None]]


class _Unread:
    """``previous`` not given: the unit of work reads it from the store."""


_UNREAD = _Unread()


@dataclass(frozen=True)
class _Written:
    key: str
    previous: Entry | None


@dataclass
class UnitOfWork:
    """The state changes and outputs of one decision on one partition of ``store``."""

    store: ChangelogStore
    partition: int
    records: list[OutRecord] = field(default_factory=list, init=False)
    _written: list[_Written] = field(default_factory=list, init=False)
    _on_undo: list[Callable[[], None]] = field(default_factory=list, init=False)
    _on_commit: list[Callable[[], None]] = field(default_factory=list, init=False)

    def put(
        self,
        key: str,
        value: dict[str, Any] | None,
        due_at: float | None = None,
        *,
        previous: Entry | _Unread | None = _UNREAD,
    ) -> None:
        """Store ``value`` (None deletes) now; its changelog record joins the outputs.

        ``previous``: the entry this replaces, when the caller has read it already.
        """
        if isinstance(previous, _Unread):
            previous = self.store.get_entry(self.partition, key)
        self.records.append(
            self.store.put(self.partition, key, value, due_at, existed=previous is not None)
        )
        self._written.append(_Written(key, previous))

    def add(self, records: Iterable[OutRecord]) -> None:
        """Publish ``records`` with the state changes (after those already added)."""
        self.records.extend(records)

    def on_undo(self, step: Callable[[], None]) -> None:
        """Run ``step`` if the publish fails (to undo a change made outside the store)."""
        self._on_undo.append(step)

    def on_commit(self, step: Callable[[], None]) -> None:
        """Run ``step`` once Kafka acknowledged everything (metrics and logs)."""
        self._on_commit.append(step)

    @property
    def empty(self) -> bool:
        return not self.records and not self._written

    async def commit(self, publish: Publish) -> None:
        """Publish every record; on failure undo every change and raise the publish's error."""
        if self.records:
            try:
                await publish(self.records)
            except BaseException:
                self.undo()
                raise
        for step in self._on_commit:
            step()

    def undo(self) -> None:
        """Put back every stored entry (last change first), then run the ``on_undo`` steps."""
        for written in reversed(self._written):
            previous = written.previous
            # A partition dropped meanwhile has nothing to undo: its state is gone anyway.
            with contextlib.suppress(PartitionNotReady):
                self.store.put(
                    self.partition,
                    written.key,
                    previous.value if previous is not None else None,
                    previous.due_at if previous is not None else None,
                )
        self._written.clear()
        for step in self._on_undo:
            step()
