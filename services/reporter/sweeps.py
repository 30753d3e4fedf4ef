"""Which parked reports to send at once because their tenant's Optimove answers again.

During an outage the turns of a tenant's parked reports spread out up to ``max_backoff_s`` ahead;
Optimove wants reports in real time once it is back. So each recovery of a tenant's circuit starts
a sweep per held partition and kind, paging through its entries as retry places free up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from services.reporter.metrics import KIND_DELIVERY, KIND_INCOMING

# (partition, kind, tenant)
Sweep = tuple[int, str, str]


class RecoverySweeps:
    """Per sweep under way, the last key it has gone past."""

    def __init__(self) -> None:
        self._recoveries_seen: dict[str, int] = {}
        self._cursors: dict[Sweep, str] = {}

    def note(self, held: Iterable[int], recoveries: Mapping[str, int]) -> None:
        """Start a sweep of every held partition for each tenant whose circuit closed since the
        last call; forget the sweeps of partitions no longer held."""
        partitions = set(held)
        for stale in [sweep for sweep in self._cursors if sweep[0] not in partitions]:
            del self._cursors[stale]
        for tenant, count in recoveries.items():
            if self._recoveries_seen.get(tenant, 0) == count:
                continue
            self._recoveries_seen[tenant] = count
            for partition in partitions:
                for kind in (KIND_DELIVERY, KIND_INCOMING):
                    self._cursors[(partition, kind, tenant)] = ""

    def of_partition(self, partition: int) -> list[tuple[Sweep, str]]:
        """The sweeps of ``partition`` under way, each with its cursor."""
        return [(sweep, after) for sweep, after in self._cursors.items() if sweep[0] == partition]

    def advance(self, sweep: Sweep, cursor: str, finished: bool) -> None:
        if finished:
            self._cursors.pop(sweep, None)
        else:
            self._cursors[sweep] = cursor
