"""Phone numbers: E.164 for providers (via ``phonenumbers``), masked for logs.

The number reported to Optimove is never rewritten: it is always the exact string received.
"""

from __future__ import annotations

from typing import Literal

import phonenumbers

NumberStyle = Literal["digits", "plus"]


class InvalidNumber(ValueError):
    pass


def to_e164(raw: str, default_region: str) -> str:
    """``+`` and digits, or InvalidNumber. Accepts international digits without ``+`` too."""
    candidate = raw.strip()
    if not candidate:
        raise InvalidNumber("empty mobile number")
    attempts = [candidate]
    if candidate[0].isdigit() and not candidate.startswith("0"):
        attempts.append("+" + candidate)  # Optimove's own example: 44123456789
    for attempt in attempts:
        try:
            parsed = phonenumbers.parse(attempt, default_region.upper())
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_possible_number(parsed) and phonenumbers.is_valid_number(parsed):
            return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    raise InvalidNumber("not a valid mobile number")


def in_style(e164: str, style: NumberStyle) -> str:
    return e164.lstrip("+") if style == "digits" else e164


def digits_only(number: str) -> str:
    return "".join(c for c in number if c.isdigit())
