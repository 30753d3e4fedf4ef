"""The one plain-text table (tools, campaigns client, bench) and the one way to read and write
ISO 8601 times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from shared.text_table import column_widths, table_line, text_table
from shared.times import format_iso, parse_iso


def test_columns_are_padded_to_their_widest_cell_and_lines_stripped() -> None:
    table = text_table(("name", "count"), [("a", 1), ("longer", 12345)])
    assert table.splitlines() == ["name    count", "a       1", "longer  12345"]


def test_right_aligned_columns() -> None:
    table = text_table(("what", "n"), [("x", 5), ("y", 120)], right={1})
    assert table.splitlines() == ["what    n", "x       5", "y     120"]


def test_lines_can_be_laid_out_one_by_one_with_the_same_widths() -> None:
    widths = column_widths(("a", "b"), [("xx", "1"), ("y", "22")])
    assert widths == [2, 2]
    assert table_line(("y", "1"), widths, right={1}) == "y    1"


def test_parse_iso_reads_utc_and_the_sources_own_zone() -> None:
    assert parse_iso("2026-03-01T12:00:00Z") == datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert parse_iso(" 2026-03-01T12:00:00 ") == datetime(2026, 3, 1, 12, tzinfo=UTC)
    plus_two = parse_iso("2026-03-01T14:00:00+02:00")
    assert plus_two == datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert plus_two is not None and plus_two.utcoffset() == timedelta(0)
    paris = parse_iso("2026-03-01 13:00:00", naive_zone=ZoneInfo("Europe/Paris"))
    assert paris == datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert [parse_iso(v) for v in ("", "  ", "soon", None, 17)] == [None] * 5


def test_format_iso_writes_utc_in_the_form_each_reader_expects() -> None:
    moment = datetime(2026, 3, 1, 14, 0, 5, 678000, tzinfo=ZoneInfo("Europe/Paris"))
    assert format_iso(moment, zulu=True) == "2026-03-01T13:00:05Z"  # Optimove's bodies
    assert (
        format_iso(moment.timestamp(), timespec="milliseconds") == "2026-03-01T13:00:05.678+00:00"
    )
