"""Bad input, pure functions: every parser and validator that reads what a peer sent answers with
its documented refusal and never with anything else (issue 7, "Bad input").

- Optimove's campaign request: ``parse_campaign`` raises only ``InvalidJson``/``SchemaViolation``;
  what it accepts becomes records that decode as the event models.
- Provider callbacks: ``parse_callback`` and ``encode_events`` raise only ``CallbackRejected``.
- Signatures and secrets: ``verify`` returns a verdict and ``constant_time_equals`` a boolean for
  any header value, including the surrogate-escaped text of non-UTF-8 header bytes.
- Phone numbers: ``to_e164`` and ingress's fast normaliser raise only ``InvalidNumber``, agree,
  and what they accept is E.164 that normalises to itself.

Examples per property: ``tests/reliability/profile.py`` (short in ``make test``, full in
``make reliability``).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from phonenumbers.phonenumberutil import SUPPORTED_REGIONS

from services.callbacks.app import encode_events, provider_events
from services.ingress.batch import InvalidJson, SchemaViolation, build_records, parse_campaign
from services.ingress.e164 import reader
from shared.contract.events import DispatchRecord, ProviderEvent, RecipientMessage, decode
from shared.contract.numbers import InvalidNumber, to_e164
from shared.contract.signing import SignatureFailure, constant_time_equals, sign, verify
from shared.providers import PROVIDER_KINDS
from shared.providers.base import CallbackRejected, ParsedCallback, Provider
from shared.providers.octopush import FIXTURES as OCTOPUSH_FIXTURES
from shared.providers.opensms import FIXTURES as OPENSMS_FIXTURES
from shared.providers.otpiq import FIXTURES as OTPIQ_FIXTURES
from tests.reliability.profile import current
from tests.support import TENANT, make_settings

EXAMPLES = current().property_examples
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ACCEPTED_AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TENANT_SETTINGS = make_settings().tenants[TENANT]
READ = reader(TENANT_SETTINGS.default_region, TENANT_SETTINGS.bare_digits)

# -- generic input ---------------------------------------------------------------------------------

# Text as a peer can send it: any code point, surrogates included (aiohttp turns non-UTF-8 bytes
# of headers into lone surrogates, "surrogateescape").
ANY_TEXT = st.text(st.characters(codec=None), max_size=40)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=16,
)


DEEP_MARKER = re.compile(r'"@@deep:(\d+)@@"')


def deep(depth: int) -> str:
    """A stand-in for ``depth`` arrays inside each other, written out by ``serialised``: deeper
    than orjson writes (254) or Python's json reads (about 1,000 under pytest)."""
    return f"@@deep:{depth}@@"


def expand_deep(text: bytes) -> bytes:
    return DEEP_MARKER.sub(lambda m: "[" * int(m[1]) + "]" * int(m[1]), text.decode()).encode()


DEEP_VALUES = st.integers(min_value=0, max_value=1_100).map(deep)


def serialised(document: Any) -> st.SearchStrategy[bytes]:
    """``document`` written the ways senders write JSON: compact, pretty, ASCII-escaped."""
    return st.sampled_from(
        [
            lambda d: json.dumps(d, separators=(",", ":")).encode(),
            lambda d: json.dumps(d, indent=2, ensure_ascii=True).encode(),
            lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8"),
        ]
    ).map(lambda write: expand_deep(write(document)))


def json_bodies(documents: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return documents.flatmap(serialised)


def mutated(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``valid`` with some members dropped and others replaced by any JSON value."""
    names = sorted(valid)
    return st.tuples(
        st.sets(st.sampled_from(names)),
        st.dictionaries(st.sampled_from(names), JSON_VALUES | DEEP_VALUES, max_size=3),
        st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=2),
    ).map(
        lambda change: {
            **{k: v for k, v in valid.items() if k not in change[0]},
            **change[1],
            **change[2],
        }
    )


# -- Optimove campaign requests ----------------------------------------------------------------

PHONE_LIKE = st.text(alphabet="+0123456789 -()", max_size=18) | st.sampled_from(
    ["+447911123456", "447911123456", "07911 123 456", "+33600000000", "", " "]
)
RECIPIENTS = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "mobileNumber": PHONE_LIKE | JSON_VALUES,
            "message": st.text(max_size=40) | JSON_VALUES,
            "customerId": st.text(max_size=10) | JSON_VALUES,
            "extra": JSON_VALUES | DEEP_VALUES,
        },
    )
    | JSON_VALUES,
    max_size=5,
)
METADATA = st.fixed_dictionaries(
    {"appId": st.integers(min_value=-(2**63), max_value=2**63 - 1)},
    optional={
        "campaignId": st.text(max_size=12) | st.none(),
        "scheduledTime": st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.none(),
        "brandId": st.text(max_size=8),
        "extra": JSON_VALUES | DEEP_VALUES,
    },
)
CAMPAIGN_DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "batchId": st.text(max_size=12) | JSON_VALUES,
        "metadata": METADATA | JSON_VALUES,
        "recipients": RECIPIENTS | JSON_VALUES,
        "requestId": st.text(max_size=12) | JSON_VALUES,
        "senderId": st.text(max_size=11) | JSON_VALUES,
    },
)
CAMPAIGN_BODIES = json_bodies(CAMPAIGN_DOCUMENTS | JSON_VALUES) | st.binary(max_size=200)


def deep_metadata(depth: int) -> bytes:
    return expand_deep(
        orjson.dumps({"batchId": "b", "metadata": {"appId": 1, "x": deep(depth)}, "recipients": []})
    )


@given(CAMPAIGN_BODIES)
@example(deep_metadata(1_000))
@example(deep_metadata(300))
@example(b'{"batchId": "b", "metadata": {"appId": 1}, "metadata": {"appId": 2}}')
@example(b'{"batchId": "b", "metadata": {"appId": 1, "scheduledTime": 9223372036854775807}}')
@example(b"\xef\xbb\xbf{}")
@example(b"")
@PROPERTY
def test_campaign_requests_are_accepted_or_refused_with_a_reason(raw: bytes) -> None:
    try:
        campaign = parse_campaign(raw)
    except (InvalidJson, SchemaViolation):
        return
    records = build_records(
        tenant=TENANT,
        settings=TENANT_SETTINGS,
        campaign=campaign,
        read=READ,
        accepted_at=ACCEPTED_AT,
    )
    assert records.accepted + len(records.rejections) == len(campaign.recipients)
    assert len(records.dispatches) == len(records.rejections)
    for _, value in records.recipients:
        decode(RecipientMessage, value)
    for _, value in records.dispatches:
        decode(DispatchRecord, value)
    # The metadata reported back is the text received, and it is the object that was validated.
    assert orjson.loads(campaign.metadata_json) == orjson.loads(raw)["metadata"]


# -- provider callbacks --------------------------------------------------------------------------

CONTENT_TYPES = st.sampled_from(
    [
        "",
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=latin-1",
        "application/x-www-form-urlencoded; charset=utf-16",
        "application/x-www-form-urlencoded; charset=idna",
        "application/x-www-form-urlencoded; charset=rot13",
        "application/x-www-form-urlencoded; charset=hex",
        'application/x-www-form-urlencoded; charset="no-such-charset"',
        "multipart/form-data; boundary=x",
    ]
) | st.text(max_size=40)


def callback_documents(fixtures: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    shapes = [value for name, value in fixtures.items() if name.startswith("callback_")]
    return st.sampled_from(shapes).flatmap(mutated)


def form_bodies(documents: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    """Form-encoded callbacks, in a charset that may or may not be the one declared."""
    return st.tuples(documents, st.sampled_from(["utf-8", "latin-1", "utf-16"])).map(
        lambda pair: urllib.parse.urlencode(
            {str(k): json.dumps(v) if not isinstance(v, str) else v for k, v in pair[0].items()},
            encoding=pair[1],
            errors="replace",
        ).encode("ascii")
    )


def callback_bodies(fixtures: dict[str, Any]) -> st.SearchStrategy[bytes]:
    documents = callback_documents(fixtures)
    return (
        json_bodies(documents)
        | json_bodies(JSON_VALUES)
        | form_bodies(documents)
        | st.binary(max_size=200)
    )


def check_callback(provider: type[Provider], body: bytes, content_type: str) -> None:
    try:
        parsed = provider.parse_callback(body, content_type)
    except CallbackRejected:
        return
    assert all(isinstance(item, ParsedCallback) for item in parsed)
    try:
        events = provider_events(provider, "acct", body, parsed, ACCEPTED_AT)
        encoded = encode_events(events)
    except CallbackRejected:
        return
    for key, value in encoded:
        event = decode(ProviderEvent, value)
        assert key == event.correlation_key.encode()


def deep_callback(fixture: dict[str, Any]) -> bytes:
    return expand_deep(orjson.dumps({**fixture, "meta_data": deep(300)}))


@given(callback_bodies(OTPIQ_FIXTURES), CONTENT_TYPES)
@example(deep_callback(OTPIQ_FIXTURES["callback_delivered"]), "application/json")
@PROPERTY
def test_otpiq_callbacks_are_parsed_or_rejected(body: bytes, content_type: str) -> None:
    check_callback(PROVIDER_KINDS["otpiq"], body, content_type)


@given(callback_bodies(OPENSMS_FIXTURES), CONTENT_TYPES)
@example(deep_callback(OPENSMS_FIXTURES["callback_failed"]), "application/json")
@PROPERTY
def test_opensms_callbacks_are_parsed_or_rejected(body: bytes, content_type: str) -> None:
    check_callback(PROVIDER_KINDS["opensms"], body, content_type)


@given(callback_bodies(OCTOPUSH_FIXTURES), CONTENT_TYPES)
@example(deep_callback(OCTOPUSH_FIXTURES["callback_stop"]), "application/json")
@example(b"number=%2B33600000000&text=STOP&stop_date=2020-11-04", "")
@example(b"number=+33600000000&text=ARR%CAT&stop_date=x", "application/x-www-form-urlencoded")
@example(b"number=1&text=a&stop_date=x", "application/x-www-form-urlencoded; charset=idna")
@PROPERTY
def test_octopush_callbacks_including_replies_and_stop_are_parsed_or_rejected(
    body: bytes, content_type: str
) -> None:
    check_callback(PROVIDER_KINDS["octopush"], body, content_type)


# -- signatures and secrets ----------------------------------------------------------------------

SIGNATURE_HEADERS = (
    ANY_TEXT
    | st.builds(lambda hexits: f"sha256={hexits}", st.text(alphabet="0123456789abcdefABCDEF "))
    | st.builds(lambda text: f"sha256={text}", ANY_TEXT)
)


@given(st.binary(max_size=200), st.none() | SIGNATURE_HEADERS, st.text(min_size=1, max_size=30))
@PROPERTY
def test_verify_gives_a_verdict_for_any_header(
    body: bytes, header: str | None, secret: str
) -> None:
    verdict = verify(body, header, secret)
    assert verdict is None or isinstance(verdict, SignatureFailure)
    if verdict is None:
        assert header is not None


@given(json_bodies(JSON_VALUES) | st.binary(max_size=200), st.text(min_size=1, max_size=30))
@PROPERTY
def test_a_body_verifies_against_its_own_signature_only(body: bytes, secret: str) -> None:
    assert verify(body, sign(body, secret), secret) is None
    assert verify(body, sign(body, secret + "x"), secret) == SignatureFailure.MISMATCH


@given(st.none() | ANY_TEXT, st.text(max_size=30))
@example("\udcff", "\xff")
@PROPERTY
def test_secret_comparison_answers_for_any_given_text(
    given_text: str | None, expected: str
) -> None:
    assert constant_time_equals(given_text, expected) == (given_text == expected) or (
        given_text is None and expected == ""
    )


# -- phone numbers ---------------------------------------------------------------------------------

REGIONS = st.sampled_from(sorted(SUPPORTED_REGIONS))
NUMBERS = (
    ANY_TEXT
    | st.text(alphabet="+0123456789 -().٠١٢٣٤٥٦٧٨٩０１２", max_size=22)
    | st.integers(min_value=0, max_value=10**16).map(str)
)


@given(NUMBERS, REGIONS)
@example("+447911123456", "GB")
@example("٠٧٩١١١٢٣٤٥٦", "GB")
@example("+" + "9" * 300, "FR")
@PROPERTY
def test_phone_normalisation_answers_e164_or_invalid_number(raw: str, region: str) -> None:
    try:
        e164 = to_e164(raw, region)
    except InvalidNumber:
        e164 = None
    try:
        fast = reader(region, "international")(raw).e164  # to_e164's reading
    except InvalidNumber:
        fast = None
    assert fast == e164
    if e164 is not None:
        assert e164.startswith("+") and e164[1:].isdecimal() and e164[1:].isascii()
        assert to_e164(e164, region) == e164


@pytest.mark.parametrize("depth", [999, 1_024])
def test_campaign_requests_nested_deeper_than_python_reads_are_refused(depth: int) -> None:
    # Outside hypothesis, which raises the recursion limit: as deep as a service process reads.
    recipients_first = expand_deep(
        orjson.dumps({"batchId": "b", "recipients": [{"x": deep(depth)}], "metadata": {"appId": 1}})
    )
    for body in (deep_metadata(depth), recipients_first):
        with pytest.raises((InvalidJson, SchemaViolation)):
            parse_campaign(body)
