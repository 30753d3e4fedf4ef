from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.contract.segments import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    count_segments,
    encoding_of,
)


@pytest.mark.parametrize(
    ("text", "encoding", "units", "segments"),
    [
        ("", "gsm7", 0, 1),
        ("Hello", "gsm7", 5, 1),
        ("a" * 160, "gsm7", 160, 1),
        ("a" * 161, "gsm7", 161, 2),
        ("a" * 306, "gsm7", 306, 2),
        ("a" * 307, "gsm7", 307, 3),
        ("€" * 80, "gsm7", 160, 1),
        ("€" * 81, "gsm7", 162, 2),
        ("a" * 159 + "€", "gsm7", 161, 2),
        ("Ünïcode", "ucs2", 7, 1),
        ("é" * 160 + "ï", "ucs2", 161, 3),
        ("ش" * 70, "ucs2", 70, 1),
        ("ش" * 71, "ucs2", 71, 2),
        ("ش" * 134, "ucs2", 134, 2),
        ("ش" * 135, "ucs2", 135, 3),
        ("😀" * 35, "ucs2", 70, 1),
        ("😀" * 36, "ucs2", 72, 2),
    ],
)
def test_counts_units_and_segments(text: str, encoding: str, units: int, segments: int) -> None:
    counted = count_segments(text)
    assert (counted.encoding, counted.units, counted.segments) == (encoding, units, segments)


def test_extension_character_is_not_split_across_parts() -> None:
    # 152 septets, then an escape pair that would straddle the 153-septet boundary.
    text = "a" * 152 + "€" + "a" * 10
    assert count_segments(text).units == 164
    assert count_segments(text).segments == 2
    text = "a" * 152 + "€" + "a" * 152  # first part 152, second 2+152 > 153
    assert count_segments(text).segments == 3


def test_surrogate_pair_is_not_split_across_parts() -> None:
    text = "ش" * 66 + "😀" + "ش" * 10  # 66 units, then a pair that would straddle 67
    assert count_segments(text).segments == 2
    assert count_segments("ش" * 66 + "😀" + "ش" * 66).segments == 3


def test_greek_capitals_in_gsm_alphabet_stay_gsm7() -> None:
    assert encoding_of("ΔΦΓΛΩΠΨΣΘΞ") == "gsm7"
    assert encoding_of("αβγ") == "ucs2"  # lower-case Greek is not in GSM 03.38


def test_alphabets_are_disjoint_and_exclude_the_escape_character() -> None:
    assert not GSM7_BASIC & GSM7_EXTENSION
    assert "\x1b" not in GSM7_BASIC
    assert len(GSM7_BASIC) == 127
    assert len(GSM7_EXTENSION) == 10


@given(st.text(alphabet=sorted(GSM7_BASIC | GSM7_EXTENSION), max_size=800))
def test_gsm7_parts_hold_at_most_153_septets(text: str) -> None:
    counted = count_segments(text)
    assert counted.encoding == "gsm7"
    if counted.units <= 160:
        assert counted.segments == 1
    else:
        # Never fewer than a perfect packing; at most one wasted septet per part boundary.
        assert -(-counted.units // 153) <= counted.segments <= -(-counted.units // 152)


@given(st.text(min_size=1, max_size=400).filter(lambda t: encoding_of(t) == "ucs2"))
def test_ucs2_parts_hold_at_most_67_units(text: str) -> None:
    counted = count_segments(text)
    assert counted.units == len(text.encode("utf-16-le")) // 2
    if counted.units <= 70:
        assert counted.segments == 1
    else:
        assert -(-counted.units // 67) <= counted.segments <= -(-counted.units // 66)
