"""``smsbridge replay``'s plain parts: the targets, durations, offsets files, the command line,
and the per-service group id (docs/replay.md). On a real broker: tests/integration/test_replay.py
and test_kafka_tools.py."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from services.campaigns.app import build as build_campaigns
from services.normalizer.app import build as build_normalizer
from services.reporter.app import build as build_reporter
from services.sender.app import build as build_sender
from shared.kafka.service import ConsumerService
from tests.support import make_settings
from tools.cli import build_parser
from tools.replay import target_from, topics_from
from tools.replay_targets import (
    FromBeginning,
    FromFile,
    ReplayError,
    ShiftBy,
    ToLatest,
    ToOffset,
    ToTime,
    offsets_csv,
    parse_duration,
    parse_offsets_csv,
    read_offsets_file,
    target_offset,
    write_offsets_file,
)

TP = TopicPartition("sms.statuses", 2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PT2H", timedelta(hours=2)),
        ("PT90M", timedelta(minutes=90)),
        ("P1DT12H", timedelta(days=1, hours=12)),
        ("pt1h30m", timedelta(hours=1, minutes=30)),  # Java's Duration.parse ignores case
        ("PT0.5S", timedelta(milliseconds=500)),
        ("P2D", timedelta(days=2)),
        ("PT1H-30M", timedelta(minutes=30)),  # a sign per part, as Java reads it
    ],
)
def test_by_duration_reads_what_kafka_consumer_groups_reads(text: str, expected: timedelta) -> None:
    assert parse_duration(text).duration == expected


@pytest.mark.parametrize("text", ["2H", "PT", "P", "P1W", "PT2", "P1Y", "", "PT2Hx"])
def test_a_duration_that_is_not_iso_8601_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="ISO 8601 duration"):
        parse_duration(text)


def test_a_negative_duration_is_refused_rather_than_moving_to_the_end() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="must not be negative"):
        parse_duration("-PT2H")


def test_by_duration_is_the_time_that_long_before_now() -> None:
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    assert parse_duration("PT2H").since(now) == ToTime(datetime(2026, 12, 7, 10, 0, tzinfo=UTC))


@pytest.mark.parametrize(
    ("target", "committed", "expected"),
    [
        (FromBeginning(), 7, 3),
        (ToLatest(), 7, 12),
        (ToOffset(1), 7, 3),  # below the log start: the start
        (ToOffset(99), 7, 12),  # past the end: the end
        (ShiftBy(-2), 7, 5),
        (ShiftBy(-100), 7, 3),
        (ShiftBy(4), 10, 12),
        (FromFile("f.csv", {TP: 6}), None, 6),
        (FromFile("f.csv", {TP: 40}), 7, 12),
    ],
)
def test_targets_clamp_to_the_partition_as_kafka_does(
    target: FromBeginning | ToLatest | ToOffset | ShiftBy | FromFile,
    committed: int | None,
    expected: int,
) -> None:
    assert target_offset(target, TP, earliest=3, end=12, committed=committed) == expected


def test_shift_by_without_a_committed_offset_is_refused() -> None:
    with pytest.raises(ReplayError, match="no committed offset"):
        target_offset(ShiftBy(-1), TP, earliest=0, end=5, committed=None)


def test_an_exported_file_reads_back_as_the_same_offsets(tmp_path: Path) -> None:
    offsets = {TopicPartition("t1-sms.statuses", 0): 17, TopicPartition("t1-sms.inbound", 3): 0}
    path = tmp_path / "before.csv"
    write_offsets_file(str(path), offsets.items())
    assert path.read_text() == "t1-sms.statuses,0,17\nt1-sms.inbound,3,0\n"
    assert read_offsets_file(str(path), "g").offsets == offsets


def test_an_existing_export_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "before.csv"
    path.write_text("sms.statuses,0,5\n")
    with pytest.raises(ReplayError, match="exists and is kept"):
        write_offsets_file(str(path), [(TP, 1)])
    assert path.read_text() == "sms.statuses,0,5\n"


def test_kafka_consumer_groups_several_group_form_keeps_this_groups_lines() -> None:
    text = "other,sms.statuses,0,1\nsmsbridge-reporter,sms.statuses,0,9\n\n"
    assert parse_offsets_csv(text, "smsbridge-reporter", "f") == {
        TopicPartition("sms.statuses", 0): 9
    }
    assert offsets_csv([(TopicPartition("sms.statuses", 0), 9)]) == "sms.statuses,0,9\n"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("sms.statuses,0\n", "line 1: expected topic,partition,offset"),
        ("sms.statuses,0,1\nsms.statuses,x,1\n", "line 2: partition and offset must be numbers"),
        ("sms.statuses,0,-1\n", "must be numbers"),
        ("sms.statuses,0,1\nsms.statuses,0,2\n", "line 2: sms.statuses partition 0 again"),
        ("other,sms.statuses,0,1\n", "no offsets for group g"),
        ("", "no offsets for group g"),
    ],
)
def test_a_bad_offsets_file_is_refused_with_its_line(text: str, reason: str) -> None:
    with pytest.raises(ReplayError, match=reason):
        parse_offsets_csv(text, "g", "f")


def replay_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["replay", "--group", "smsbridge-reporter", *argv])


def test_the_command_plans_unless_execute_and_takes_dry_run_as_the_default() -> None:
    assert replay_args("--topic", "sms.statuses", "--to-latest").execute is False
    assert replay_args("--topic", "sms.statuses", "--to-latest", "--dry-run").execute is False
    assert replay_args("--topic", "sms.statuses", "--to-latest", "--execute").execute is True
    with pytest.raises(SystemExit):
        replay_args("--topic", "sms.statuses", "--to-latest", "--execute", "--dry-run")


def test_topics_carry_the_prefix_and_a_scope_is_required() -> None:
    args = replay_args("--topic", "sms.statuses", "--topic", "sms.inbound", "--shift-by", "-5")
    assert topics_from(args, "t1-") == ["t1-sms.statuses", "t1-sms.inbound"]
    assert target_from(args, "smsbridge-reporter") == ShiftBy(-5)
    assert topics_from(replay_args("--all-topics", "--to-latest"), "t1-") is None
    with pytest.raises(ReplayError, match=r"--topic \(repeatable\) or --all-topics"):
        topics_from(replay_args("--to-latest"), "")
    with pytest.raises(ReplayError, match="names its own topics"):
        topics_from(replay_args("--all-topics", "--from-file", "f.csv"), "")


async def test_each_consumer_service_joins_the_group_its_section_names() -> None:
    settings = make_settings(
        overrides={
            service: {"group_id": f"{service}-audit"}
            for service in ("sender", "normalizer", "reporter", "campaigns")
        }
    )
    for service in (build_sender(settings), build_normalizer(settings), build_reporter(settings)):
        assert isinstance(service, ConsumerService)
        try:
            assert service.consumer._group_id == f"{service.name}-audit"
        finally:
            await service.close()
    campaigns = build_campaigns(settings)
    try:
        assert campaigns.consumer.consumer._group_id == "campaigns-audit"
    finally:
        await campaigns.stop()
    default = build_sender(make_settings())
    assert isinstance(default, ConsumerService)
    try:
        assert default.consumer._group_id == "smsbridge-sender"
    finally:
        await default.close()
