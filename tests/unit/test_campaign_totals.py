"""The campaigns' totals the admin API serves, kept through the counts mirror's ``on_change``:
always what adding up the whole table would give, while a status call reads only the campaigns
it asks for.

The mirror is fed batches the way its follower applies what it reads from sms.campaign-counts.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest

from services.campaigns import mirror as mirror_module
from services.campaigns.counts import (
    Counts,
    campaigns_of_key,
    counts_key,
    read_counts,
    summarize,
    to_event,
)
from services.campaigns.mirror import CampaignTotals, CountsMirror
from shared.contract.topics import DEAD_LETTERS, INGRESS_REQUESTS, STATUSES
from tests.support import make_settings

NOW = 1_800_000_000.0
Record = tuple[bytes, bytes | None]


@pytest.fixture
async def mirror() -> AsyncIterator[CountsMirror]:
    made = CountsMirror(make_settings().kafka, name="test-totals")
    yield made
    await made.stop()


def follow(mirror: CountsMirror, records: Iterable[Record]) -> None:
    """Apply one batch and tell the owner, as the table's follower does."""
    keys = mirror.apply(records)
    assert mirror.on_change is not None
    mirror.on_change(keys)


def written(
    tenant: str, campaign: str, topic: str, partition: int, counts: Counts, offset: int = 0
) -> Record:
    event = to_event(tenant, campaign, topic, partition, offset, counts)
    return counts_key(tenant, campaign, topic, partition).encode(), event.to_bytes()


def deleted(tenant: str, campaign: str, topic: str, partition: int) -> Record:
    return counts_key(tenant, campaign, topic, partition).encode(), None


def whole_table(mirror: CountsMirror) -> list[tuple[tuple[str, str], Counts]]:
    """What a status call answered before: every counts record of the table added up."""
    return sorted(summarize(read_counts(mirror.values())).items())


class Reads:
    """The mirror's ``values``, recording which prefixes were read."""

    def __init__(self, mirror: CountsMirror) -> None:
        self.mirror = mirror
        self.prefixes: list[str] = []

    def __call__(self, prefix: str) -> list[dict[str, Any]]:
        self.prefixes.append(prefix)
        return self.mirror.values(prefix)


async def test_totals_follow_counters_that_change(mirror: CountsMirror) -> None:
    follow(
        mirror,
        [written("acme", "spring", STATUSES.name, 0, Counts(sent=2, first_at=NOW, last_at=NOW))],
    )
    assert mirror.totals.get("acme", "spring") == Counts(sent=2, first_at=NOW, last_at=NOW)

    follow(
        mirror,
        [
            written(
                "acme",
                "spring",
                STATUSES.name,
                1,
                Counts(delivered=1, first_at=NOW, last_at=NOW + 5),
            ),
            written("acme", "spring", INGRESS_REQUESTS.name, 3, Counts(accepted=7, rejected=1)),
        ],
    )
    spring = mirror.totals.get("acme", "spring")
    assert spring is not None
    assert (spring.accepted, spring.rejected, spring.sent, spring.delivered) == (7, 1, 2, 1)
    assert spring.last_at == NOW + 5
    assert mirror.totals.campaigns() == whole_table(mirror)


async def test_a_partitions_counters_replaced_count_once_not_added_again(
    mirror: CountsMirror,
) -> None:
    follow(
        mirror,
        [
            written("acme", "spring", STATUSES.name, 0, Counts(sent=2, failed={"Expired": 1})),
            written("acme", "spring", STATUSES.name, 1, Counts(sent=3)),
        ],
    )
    assert mirror.totals.get("acme", "spring") is not None
    # The owner of partition 0 wrote its counters again, further on: they replace the old ones.
    replaced = Counts(sent=5, failed={"Expired": 1, "OptedOut": 2}, first_at=NOW, last_at=NOW)
    follow(mirror, [written("acme", "spring", STATUSES.name, 0, replaced, offset=9)])

    spring = mirror.totals.get("acme", "spring")
    assert spring is not None
    assert spring.sent == 8
    assert spring.failed == {"Expired": 1, "OptedOut": 2}
    assert [counts for _, counts in mirror.totals.campaigns("acme")] == [spring]


async def test_a_campaign_whose_keys_are_deleted_is_gone_and_others_stay(
    mirror: CountsMirror,
) -> None:
    follow(
        mirror,
        [
            written(
                "acme", "old", STATUSES.name, 0, Counts(sent=1, first_at=NOW - 10, last_at=NOW - 10)
            ),
            written(
                "acme",
                "old",
                DEAD_LETTERS.name,
                2,
                Counts(dead_lettered=1, first_at=NOW, last_at=NOW),
            ),
            written("acme", "new", STATUSES.name, 0, Counts(sent=4)),
            written("bolt", "old", STATUSES.name, 0, Counts(sent=6)),
        ],
    )
    assert [campaign for campaign, _ in mirror.totals.campaigns()] == [
        ("acme", "new"),
        ("acme", "old"),
        ("bolt", "old"),
    ]
    # One key gone: what the other partition counted is left, its last activity included.
    follow(mirror, [deleted("acme", "old", DEAD_LETTERS.name, 2)])
    assert mirror.totals.get("acme", "old") == Counts(sent=1, first_at=NOW - 10, last_at=NOW - 10)

    # Expired (tombstones for every key): nothing of the campaign is left.
    follow(mirror, [deleted("acme", "old", STATUSES.name, 0)])
    assert mirror.totals.get("acme", "old") is None
    assert [campaign for campaign, _ in mirror.totals.campaigns()] == [
        ("acme", "new"),
        ("bolt", "old"),
    ]
    follow(mirror, [deleted("acme", "new", STATUSES.name, 0)])
    assert mirror.totals.campaigns("acme") == []
    assert mirror.totals.campaigns() == whole_table(mirror)


async def test_campaign_ids_with_the_key_separator_are_kept_apart(mirror: CountsMirror) -> None:
    assert campaigns_of_key(counts_key("acme", "a|b", STATUSES.name, 0)) == [
        ("acme", "a|b"),
        ("acme|a", "b"),
    ]
    assert campaigns_of_key("~sync|token|0") == []
    follow(
        mirror,
        [
            written("acme", "a", STATUSES.name, 0, Counts(sent=1)),
            written("acme", "a|b", STATUSES.name, 0, Counts(sent=10)),
        ],
    )
    a, a_b = mirror.totals.get("acme", "a"), mirror.totals.get("acme", "a|b")
    assert a is not None and a_b is not None
    assert (a.sent, a_b.sent) == (1, 10)

    follow(mirror, [deleted("acme", "a|b", STATUSES.name, 0)])
    assert mirror.totals.get("acme", "a|b") is None
    assert mirror.totals.get("acme", "a") == a
    assert mirror.totals.campaigns() == whole_table(mirror)


async def test_a_status_call_reads_only_the_campaigns_it_asks_for(mirror: CountsMirror) -> None:
    reads = Reads(mirror)
    totals = CampaignTotals(reads)
    totals.changed(
        mirror.apply(
            written("acme", f"c{n}", STATUSES.name, partition, Counts(sent=1))
            for n in range(50)
            for partition in range(3)
        )
    )
    assert reads.prefixes == []  # changes only mark campaigns; nothing is added up yet

    assert totals.get("acme", "c7") == Counts(sent=3, first_at=0.0, last_at=0.0)
    assert reads.prefixes == ["acme|c7|"]
    assert totals.get("acme", "c7") is not None
    assert reads.prefixes == ["acme|c7|"]  # unchanged since: read from the totals

    assert len(totals.campaigns("acme")) == 50
    reads.prefixes.clear()
    totals.changed(mirror.apply([written("acme", "c9", STATUSES.name, 0, Counts(sent=2))]))
    assert len(totals.campaigns()) == 50
    assert reads.prefixes == ["acme|c9|"]


async def test_campaigns_nobody_reads_are_added_up_past_a_bound(
    mirror: CountsMirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror_module, "MAX_STALE", 2)
    reads = Reads(mirror)
    totals = CampaignTotals(reads)
    totals.changed(mirror.apply([written("acme", "a", STATUSES.name, 0, Counts(sent=1))]))
    totals.changed(mirror.apply([written("acme", "b", STATUSES.name, 0, Counts(sent=1))]))
    assert reads.prefixes == []
    totals.changed(mirror.apply([written("bolt", "c", STATUSES.name, 0, Counts(sent=1))]))
    assert sorted(reads.prefixes) == ["acme|a|", "acme|b|", "bolt|c|"]
    reads.prefixes.clear()
    assert totals.campaigns() == whole_table(mirror)
    assert reads.prefixes == []


async def test_totals_match_the_whole_table_through_random_changes(mirror: CountsMirror) -> None:
    rng = random.Random(5)
    campaigns = [("acme", "spring"), ("acme", "(auto replies)"), ("acme", "x|y"), ("acme|x", "y")]
    campaigns += [("bolt", "spring"), ("bolt", "(replies)")]
    topics = [STATUSES.name, INGRESS_REQUESTS.name, DEAD_LETTERS.name]
    for _ in range(40):
        batch: list[Record] = []
        for _ in range(rng.randint(1, 6)):
            tenant, campaign = rng.choice(campaigns)
            topic, partition = rng.choice(topics), rng.randrange(3)
            if rng.random() < 0.25:
                batch.append(deleted(tenant, campaign, topic, partition))
                continue
            at = NOW + rng.randrange(-1000, 1000)
            counts = Counts(
                accepted=rng.randrange(5),
                scheduled={int(NOW) + rng.randrange(1, 100): rng.randrange(1, 4)},
                sent=rng.randrange(9),
                failed={rng.choice(["Expired", "OptedOut"]): rng.randrange(1, 3)},
                first_at=at,
                last_at=at + rng.randrange(100),
            )
            batch.append(written(tenant, campaign, topic, partition, counts))
        follow(mirror, batch)
        if rng.random() < 0.5:
            assert mirror.totals.campaigns() == whole_table(mirror)
    assert mirror.totals.campaigns() == whole_table(mirror)
    for (tenant, campaign), counts in whole_table(mirror):
        assert mirror.totals.get(tenant, campaign) == counts
