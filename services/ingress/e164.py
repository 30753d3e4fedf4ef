"""E.164 for whole campaign batches: ``shared.contract.numbers.read_number``'s answers at a
fraction of its cost.

``phonenumbers`` spends about 50 µs on one number, which alone would keep a 10,000-recipient batch
far below the Kafka produce rate. For numbers written as ASCII digits with an optional ``+`` and
single spaces or hyphens (how Optimove's tenants store numbers) this module takes the same steps
as ``read_number`` (country code, national prefix, lengths, validity) with each region's patterns
compiled once. Bare digits are read both ways and the tenant's ``bare_digits`` picks when both are
valid. Anything else, and every number found invalid, goes to ``read_number`` itself, so a refusal
always carries its verdict and wording; ``tests/unit/test_ingress_fast_paths.py`` checks that the
two agree on large samples.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Final

from phonenumbers import REGION_CODE_FOR_NON_GEO_ENTITY, PhoneMetadata, PhoneNumberDesc
from phonenumbers.phonenumberutil import (
    _MAX_LENGTH_COUNTRY_CODE,
    _MAX_LENGTH_FOR_NSN,
    _MIN_LENGTH_FOR_NSN,
    COUNTRY_CODE_TO_REGION_CODE,
    SUPPORTED_REGIONS,
    ValidationResult,
    _maybe_strip_national_prefix_carrier_code,
    _test_number_length,
    region_code_for_country_code,
)

from shared.contract.numbers import BareDigits, Reading, choose_reading, read_number, valid_e164

# Digits, optionally after "+", with single spaces or hyphens between them.
_SIMPLE_SPELLING: Final = re.compile(r"\+?[0-9](?:[ -]?[0-9])*")
_SEPARATORS: Final = str.maketrans("", "", " -")
# No valid number has more digits (country code + national number); read_number refuses them.
_MAX_DIGITS: Final = _MAX_LENGTH_FOR_NSN + _MAX_LENGTH_COUNTRY_CODE

# After national-prefix stripping, these lengths make parse keep the unstripped number.
_KEEP_UNSTRIPPED: Final = frozenset(
    {
        ValidationResult.TOO_SHORT,
        ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
        ValidationResult.INVALID_LENGTH,
    }
)
_POSSIBLE: Final = frozenset(
    {ValidationResult.IS_POSSIBLE, ValidationResult.IS_POSSIBLE_LOCAL_ONLY}
)


class _Undecided:
    """This module does not follow the path phonenumbers would take; ask ``read_number``."""


_UNDECIDED: Final = _Undecided()
_Verdict = str | None | _Undecided  # E.164, definitely invalid, or undecided


def _desc_regex(desc: PhoneNumberDesc | None) -> str | None:
    """phonenumbers' _is_number_matching_desc as one regex: the lengths, then the whole pattern."""
    if desc is None or not desc.national_number_pattern:
        return None  # never matches
    lengths = "|".join(f".{{{n}}}" for n in desc.possible_length)
    length_check = f"(?=(?:{lengths})\\Z)" if lengths else ""
    return f"{length_check}(?:{desc.national_number_pattern})"


def _validity_pattern(metadata: PhoneMetadata) -> re.Pattern[str] | None:
    """``_number_type_helper(n, metadata) != UNKNOWN`` as one full-match pattern.

    The number must match the general description and at least one number type. Any type
    matching will do, so only the order changes: mobile first (the usual case). When mobile and
    fixed-line share a pattern phonenumbers never tests mobile on its own, so neither do we.
    """
    candidates = [
        metadata.fixed_line,
        metadata.premium_rate,
        metadata.toll_free,
        metadata.shared_cost,
        metadata.voip,
        metadata.personal_number,
        metadata.pager,
        metadata.uan,
        metadata.voicemail,
    ]
    if not metadata.same_mobile_and_fixed_line_pattern:
        candidates.insert(0, metadata.mobile)
    general = _desc_regex(metadata.general_desc)
    types = [r for r in (_desc_regex(d) for d in candidates) if r is not None]
    if general is None or not types:
        return None
    alternatives = "|".join(f"(?:{t})" for t in types)
    return re.compile(f"(?=(?:{general})\\Z)(?:{alternatives})")


class _Rules:
    """One PhoneMetadata with what ``read_number`` asks of it precomputed."""

    def __init__(self, metadata: PhoneMetadata) -> None:
        self.metadata = metadata
        self.country_code = metadata.country_code
        self.validity = _validity_pattern(metadata)
        self.leading_digits = (
            re.compile(metadata.leading_digits) if metadata.leading_digits is not None else None
        )
        prefix = metadata.national_prefix_for_parsing
        self.national_prefix = re.compile(prefix) if prefix else None
        self.transforms_prefix = bool(metadata.national_prefix_transform_rule)
        general = metadata.general_desc
        self.general_pattern = (
            re.compile(general.national_number_pattern)
            if general is not None and general.national_number_pattern
            else None
        )
        # _test_number_length depends on the length alone: answer it from a table.
        self.length_results = {
            length: _test_number_length("0" * length, metadata) for length in range(_MAX_DIGITS + 1)
        }

    def valid(self, national_number: str) -> bool:
        return self.validity is not None and self.validity.fullmatch(national_number) is not None

    def length_result(self, national_number: str) -> int:
        return self.length_results[len(national_number)]

    def matches_general(self, number: str) -> bool:
        """_match_national_number(number, general_desc, False): the pattern alone, no lengths."""
        return (
            self.general_pattern is not None and self.general_pattern.fullmatch(number) is not None
        )

    def strip_national_prefix(self, number: str) -> str:
        """The number _maybe_strip_national_prefix_carrier_code returns."""
        if not number or self.national_prefix is None:
            return number
        prefix = self.national_prefix.match(number)
        if prefix is None:
            return number
        if self.transforms_prefix:
            # Regions that rewrite the prefix (AR, MX, ...): leave it to phonenumbers.
            return _maybe_strip_national_prefix_carrier_code(number, self.metadata)[1]
        stripped = number[prefix.end() :]
        # Keep the prefix when only the number with it is viable.
        if self.matches_general(number) and not self.matches_general(stripped):
            return number
        return stripped


@cache
def _rules_for_region(region: str) -> _Rules | None:
    metadata = PhoneMetadata.metadata_for_region(region, None)
    return _Rules(metadata) if metadata is not None else None


@cache
def _rules_for_calling_code(country_code: int, region: str) -> _Rules | None:
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
    return _Rules(metadata) if metadata is not None else None


@cache
def _main_rules(country_code: int) -> _Rules | None:
    return _rules_for_calling_code(country_code, region_code_for_country_code(country_code))


def _region_of(country_code: int, national_number: str) -> tuple[str | None, bool]:
    """phonenumbers.region_code_for_number, and whether it already found the number valid there."""
    regions = COUNTRY_CODE_TO_REGION_CODE.get(country_code)
    if regions is None:
        return None, False
    if len(regions) == 1:
        return regions[0], False
    for region in regions:
        rules = _rules_for_region(region.upper())
        if rules is None:
            continue
        if rules.leading_digits is not None:
            if rules.leading_digits.match(national_number):
                return region, False
        elif rules.valid(national_number):
            return region, True
    return None, False


def _is_possible_and_valid(country_code: int, national_number: str) -> bool:
    """phonenumbers.is_possible_number and is_valid_number for a parsed number."""
    main = _main_rules(country_code)
    if main is None or main.length_result(national_number) not in _POSSIBLE:
        return False
    region, found_valid = _region_of(country_code, national_number)
    if region is None:
        return False
    if region != REGION_CODE_FOR_NON_GEO_ENTITY:
        region_rules = _rules_for_region(region.upper())
        if region_rules is None or region_rules.country_code != country_code:
            return False
        if found_valid:
            return True  # is_valid_number_for_region would test the same rules again
    rules = _rules_for_calling_code(country_code, region.upper())
    return rules is not None and rules.valid(national_number)


def _finish(country_code: int, national_number: str, rules: _Rules) -> _Verdict:
    """The tail of phonenumbers.parse (national prefix, lengths), then the validity checks."""
    if len(national_number) < _MIN_LENGTH_FOR_NSN:
        return None
    stripped = rules.strip_national_prefix(national_number)
    if rules.length_result(stripped) not in _KEEP_UNSTRIPPED:
        national_number = stripped
    if not _MIN_LENGTH_FOR_NSN <= len(national_number) <= _MAX_LENGTH_FOR_NSN:
        return None
    # For a digit string the national significant number is the string itself (leading zeros
    # are kept through italian_leading_zero / number_of_leading_zeros).
    if not _is_possible_and_valid(country_code, national_number):
        return None
    return f"+{country_code}{national_number}"


def _international(digits: str) -> _Verdict:
    """phonenumbers.parse("+" + digits, region) followed by the validity checks."""
    if len(digits) <= _MIN_LENGTH_FOR_NSN:
        return None  # TOO_SHORT_AFTER_IDD
    if digits[0] == "0":
        return _UNDECIDED  # parse retries without the plus sign
    for length in range(1, min(len(digits), _MAX_LENGTH_COUNTRY_CODE) + 1):
        country_code = int(digits[:length])
        if country_code in COUNTRY_CODE_TO_REGION_CODE:
            break
    else:
        return _UNDECIDED  # parse retries without the plus sign
    rules = _main_rules(country_code)
    if rules is None:
        return _UNDECIDED
    return _finish(country_code, digits[length:], rules)


@dataclass(frozen=True)
class _DefaultRegion:
    code: str
    rules: _Rules
    international_prefix: re.Pattern[str]
    country_code: int
    country_code_digits: str


@cache
def _default_region(region: str) -> _DefaultRegion | None:
    if region not in SUPPORTED_REGIONS:
        return None
    rules = _rules_for_region(region)
    if rules is None or rules.country_code is None:
        return None
    return _DefaultRegion(
        code=region,
        rules=rules,
        # phonenumbers uses "NonMatch" as the never-matching prefix when the region has none.
        international_prefix=re.compile(rules.metadata.international_prefix or "NonMatch"),
        country_code=rules.country_code,
        country_code_digits=str(rules.country_code),
    )


def _national(digits: str, default: _DefaultRegion) -> _Verdict:
    """phonenumbers.parse(digits, region) followed by the validity checks."""
    if default.international_prefix.match(digits):
        return _UNDECIDED  # dialled with an IDD prefix (00..., 011...)
    rules = default.rules
    national_number = digits
    if digits.startswith(default.country_code_digits):
        # The region's own calling code written without "+": parse drops it when the rest is a
        # better national number, or when the whole is too long to be one.
        without_code = rules.strip_national_prefix(digits[len(default.country_code_digits) :])
        if (
            not rules.matches_general(digits) and rules.matches_general(without_code)
        ) or rules.length_result(digits) == ValidationResult.TOO_LONG:
            national_number = without_code
            number_region = region_code_for_country_code(default.country_code)
            if number_region != default.code:
                found = _rules_for_calling_code(default.country_code, number_region)
                if found is None:
                    return _UNDECIDED
                rules = found
    return _finish(default.country_code, national_number, rules)


def fast_read(raw: str, default_region: str, bare_digits: BareDigits) -> Reading:
    """Exactly ``shared.contract.numbers.read_number(raw, default_region, bare_digits)``."""
    region = default_region.upper()
    candidate = raw.strip()
    default = _default_region(region)
    if default is None:
        return read_number(raw, default_region, bare_digits)
    plain = candidate[1:] if candidate[:1] == "+" else candidate
    if plain.isascii() and plain.isdigit():
        digits = candidate  # the usual spelling, and the regex's cost is saved
    elif _SIMPLE_SPELLING.fullmatch(candidate):
        digits = candidate.translate(_SEPARATORS)
    else:
        return read_number(raw, default_region, bare_digits)
    if len(digits) > _MAX_DIGITS:
        return read_number(raw, default_region, bare_digits)
    if digits[0] == "+":
        verdict = _international(digits[1:])
        if isinstance(verdict, str):
            return Reading(verdict, False)
        return read_number(raw, default_region, bare_digits)
    national = _national(digits, default)
    if digits[0] == "0":
        # A national "0" (or an IDD prefix): never an international number missing its "+".
        if isinstance(national, str):
            return Reading(national, False)
        return read_number(raw, default_region, bare_digits)
    # Bare digits: both readings, so that one valid both ways is known to be ambiguous. A side
    # this module does not follow is asked of phonenumbers alone.
    international = _international(digits)
    if isinstance(national, _Undecided):
        national = valid_e164(candidate, default_region)
    if isinstance(international, _Undecided):
        international = valid_e164("+" + candidate, default_region)
    if national is None and international is None:
        return read_number(raw, default_region, bare_digits)  # its verdict and wording
    return choose_reading(national, international, bare_digits)


NumberReader = Callable[[str], Reading]


def reader(default_region: str, bare_digits: BareDigits) -> NumberReader:
    """``fast_read`` bound to one tenant's default region and reading of bare digits."""

    def read(raw: str) -> Reading:
        return fast_read(raw, default_region, bare_digits)

    return read
