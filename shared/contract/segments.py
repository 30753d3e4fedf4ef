"""How many SMS segments a text costs (decisions.md §10).

GSM-7 when every character is in the GSM 03.38 default alphabet or its extension table: 160 septets
in one SMS, 153 per part once concatenated; an extension character (``€``, ``[``, ``{`` …) is an
escape plus a septet, so it counts twice and is never split across two parts. Anything else is
UCS-2: 70 UTF-16 code units in one SMS, 67 per part; a character outside the BMP is a surrogate pair
(two units) and is never split either.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Encoding = Literal["gsm7", "ucs2"]

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

GSM7_SINGLE, GSM7_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67


@dataclass(frozen=True)
class SegmentCount:
    encoding: Encoding
    units: int  # septets for GSM-7, UTF-16 code units for UCS-2
    segments: int


def is_gsm7(text: str) -> bool:
    return all(char in GSM7_BASIC or char in GSM7_EXTENSION for char in text)


def encoding_of(text: str) -> Encoding:
    return "gsm7" if is_gsm7(text) else "ucs2"


def _pack(widths: Iterable[int], single: int, part: int) -> tuple[int, int]:
    """(units, segments) when characters of these widths are laid into parts without splitting."""
    widths = list(widths)
    units = sum(widths)
    if units <= single:
        return units, 1
    segments, used = 1, 0
    for width in widths:
        if used + width > part:
            segments += 1
            used = 0
        used += width
    return units, segments


def count_segments(text: str) -> SegmentCount:
    """The encoding a handset-compatible sender would choose, and the parts it would send.

    An empty text still costs one SMS.
    """
    if is_gsm7(text):
        units, segments = _pack(
            (2 if char in GSM7_EXTENSION else 1 for char in text), GSM7_SINGLE, GSM7_PART
        )
        return SegmentCount("gsm7", units, segments)
    units, segments = _pack(
        (2 if ord(char) > 0xFFFF else 1 for char in text), UCS2_SINGLE, UCS2_PART
    )
    return SegmentCount("ucs2", units, segments)
