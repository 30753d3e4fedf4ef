"""Phone numbers: E.164 for providers (via ``phonenumbers``), masked for logs.

The number reported to Optimove is never rewritten: it is always the exact string received.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import phonenumbers

NumberStyle = Literal["digits", "plus"]
# How a number of bare digits (no "+", no leading "0") that is valid both as an international
# number missing its "+" and as a national number of the default region is read.
BareDigits = Literal["international", "national"]


class InvalidNumber(ValueError):
    pass


class Reading(NamedTuple):
    e164: str
    # The digits were a valid number the other way too, and a different one.
    ambiguous: bool


def to_e164(raw: str, default_region: str) -> str:
    """``+`` and digits, or InvalidNumber. Bare digits valid both ways are read as international
    (how Optimove's example and the providers write them); ingress applies the tenant's choice."""
    return read_number(raw, default_region, "international").e164


def read_number(raw: str, default_region: str, bare_digits: BareDigits) -> Reading:
    """E.164, or InvalidNumber. Bare digits are tried both ways (Optimove's own example writes
    international numbers so: ``44123456789``); when both are valid numbers ``bare_digits``
    decides, and the reading says it was ambiguous."""
    candidate = raw.strip()
    if not candidate:
        raise InvalidNumber("empty mobile number")
    as_written = valid_e164(candidate, default_region)
    if not candidate[0].isdigit() or candidate.startswith("0"):
        if as_written is None:
            raise InvalidNumber("not a valid mobile number")
        return Reading(as_written, False)
    return choose_reading(as_written, valid_e164("+" + candidate, default_region), bare_digits)


def choose_reading(
    national: str | None, international: str | None, bare_digits: BareDigits
) -> Reading:
    """The reading of bare digits from what they are read as nationally and internationally."""
    if national is None and international is None:
        raise InvalidNumber("not a valid mobile number")
    if international is None or international == national:
        assert national is not None
        return Reading(national, False)
    if national is None:
        return Reading(international, False)
    return Reading(international if bare_digits == "international" else national, True)


def valid_e164(attempt: str, default_region: str) -> str | None:
    """``attempt`` as ``phonenumbers`` reads it in ``default_region``, if a valid number."""
    try:
        parsed = phonenumbers.parse(attempt, default_region.upper())
    except phonenumbers.NumberParseException:
        return None
    if phonenumbers.is_possible_number(parsed) and phonenumbers.is_valid_number(parsed):
        return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    return None


def in_style(e164: str, style: NumberStyle) -> str:
    return e164.lstrip("+") if style == "digits" else e164


def digits_only(number: str) -> str:
    return "".join(c for c in number if c.isdigit())
