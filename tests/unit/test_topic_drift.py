"""What ``topics ensure --fix`` may change on an existing topic (shared/contract/topics.py)."""

from __future__ import annotations

from shared.contract.topics import (
    ALL_TOPICS,
    CO_PARTITIONED,
    DEAD_LETTERS,
    DISPATCHES,
    NORMALIZER_STATE,
    OPT_OUTS,
    REPORT_OUTCOMES,
    config_drift,
    partition_refusal,
)


def test_co_partitioned_topics_share_their_partition_count() -> None:
    for group in CO_PARTITIONED:
        assert len({topic.partitions for topic in group}) == 1, [t.base for t in group]


def test_only_topics_whose_keys_carry_no_state_may_have_partitions_added() -> None:
    raisable = {topic.base for topic in ALL_TOPICS if partition_refusal(topic, 1) is None}
    # Plain event streams, read whole: a key's records need not stay on one partition.
    assert raisable == {DEAD_LETTERS.base, REPORT_OUTCOMES.base}
    refusal = partition_refusal(DISPATCHES, 3)
    assert refusal is not None and "co-partitioned with" in refusal
    assert NORMALIZER_STATE.name in refusal
    assert "compacted" in (partition_refusal(OPT_OUTS, 0) or "")
    assert "never lowers" in (partition_refusal(DEAD_LETTERS, 24) or "")


def test_config_drift_names_each_config_that_differs() -> None:
    found = {"cleanup.policy": "compact,delete", "min.insync.replicas": "2"}
    drift = config_drift(OPT_OUTS, found, replication_factor=3)
    assert [(d.setting, d.found, d.wanted) for d in drift] == [
        ("cleanup.policy", "compact,delete", "compact")
    ]
    assert (
        config_drift(OPT_OUTS, {"cleanup.policy": "compact", "min.insync.replicas": "2"}, 3) == []
    )
    [missing] = config_drift(DEAD_LETTERS, {"cleanup.policy": "delete"}, 1)
    assert (missing.setting, missing.found, missing.wanted) == (
        "min.insync.replicas",
        "(unset)",
        "1",
    )
