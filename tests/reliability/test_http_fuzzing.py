"""Bad input over HTTP: schemathesis drives docs/openapi.yaml against ingress and callbacks running
as processes on a real broker (``bench.stack``), with random bodies, headers and parameters, both
fitting the description and not (issue 7, "Bad input").

For every answer: no 5xx but the documented 503, the answer the description gives, a service that
still answers ``/healthz``, and on Kafka exactly what the 2xx answers promised. Each operation is
also run behind authentication (real ids, key and signature). docs/reliability.md has the detail.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bench.stack import (
    AGGREGATOR_API_KEY,
    CALLBACK_TOKEN,
    OTPIQ_WEBHOOK_SECRET,
    TENANT,
    TENANT_SECRET,
    Stack,
    ops_address,
)
from services.ingress.batch import parse_campaign
from shared.contract.signing import SIGNATURE_HEADER, sign
from shared.contract.topics import (
    CAMPAIGN_CONTROL,
    DISPATCHES,
    INGRESS_REQUESTS,
    PROVIDER_EVENTS,
    RECIPIENTS,
)
from shared.providers.otpiq import WEBHOOK_SECRET_HEADER
from tests.reliability.profile import current
from tests.reliability.support import (
    ADMIN_TOKEN,
    CALLBACK_ACCOUNTS,
    INGRESS_MAX_BODY_BYTES,
    INGRESS_MAX_RECIPIENTS,
    OCTOPUSH_ACCOUNT,
    OCTOPUSH_CALLBACK_TOKEN,
    OPENSMS_ACCOUNT,
    OPENSMS_CALLBACK_TOKEN,
    bad_input_overrides,
    topic_sizes,
)

pytestmark = pytest.mark.integration

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
SCHEMA = schemathesis.openapi.from_path(str(SPEC_PATH))
CAMPAIGNS = "/optimove/{tenant}/campaigns"
CALLBACK_TOKENS = {"otpiq": CALLBACK_TOKEN, "opensms": OPENSMS_CALLBACK_TOKEN}
CALLBACK_TOKENS["octopush"] = OCTOPUSH_CALLBACK_TOKEN
COUNTED = (RECIPIENTS, DISPATCHES, INGRESS_REQUESTS, PROVIDER_EVENTS, CAMPAIGN_CONTROL)
ADMIN = "/admin/campaigns"
OPERATIONS = ("/healthz", "/readyz", "/metrics")  # on ops_listen, not on the public ports
CONTROL_ACTIONS = ("pause", "resume", "cancel")
CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = current().api_examples
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def callback_path(kind: str) -> str:
    return f"/callbacks/{kind}/{{account}}/{{token}}"


@dataclass
class Expected:
    """What the 2xx answers so far promised to have put on Kafka, per topic."""

    records: dict[str, int] = field(default_factory=lambda: {t.name: 0 for t in COUNTED})
    campaign_keys: set[str] = field(default_factory=set)
    answers: dict[int, int] = field(default_factory=dict)

    def campaign_accepted(self, body: bytes, answer: dict[str, Any]) -> None:
        campaign = parse_campaign(body)
        if campaign.identity in self.campaign_keys:
            return  # a repeated request is answered again and publishes nothing
        self.campaign_keys.add(campaign.identity)
        self.records[RECIPIENTS.name] += answer["accepted"]
        self.records[DISPATCHES.name] += len(answer["rejected"])
        # A request without ids is claimed on the ledger first, then entered (ingress/ledger.py).
        self.records[INGRESS_REQUESTS.name] += 2 if campaign.by_content else 1

    def callback_accepted(self) -> None:
        self.records[PROVIDER_EVENTS.name] += 1  # each provider's callback is one event

    def control_accepted(self) -> None:
        self.records[CAMPAIGN_CONTROL.name] += 1


@dataclass
class Target:
    """The running stack as the fuzzing sees it: where each service listens, what it promised."""

    stack: Stack
    http: requests.Session
    expected: Expected = field(default_factory=Expected)

    def base_url(self, path: str) -> str:
        if path.startswith("/callbacks/"):
            return self.stack.callbacks_url
        if path.startswith(ADMIN):
            return f"http://{self.stack.settings.campaigns.listen}"
        if path in OPERATIONS:
            return self._ops("ingress")
        return self.stack.ingress_url

    def _ops(self, service: str) -> str:
        return f"http://{ops_address(self.stack.settings, service)}"

    def ops_url(self, path: str) -> str:
        """Where the service that serves ``path`` answers /healthz (its ops_listen)."""
        if path.startswith("/callbacks/"):
            return self._ops("callbacks")
        if path.startswith(ADMIN):
            return f"http://{self.stack.settings.campaigns.listen}"
        return self._ops("ingress")


@pytest.fixture(scope="module")
async def target(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    stack = Stack(tmp_path_factory.mktemp("http-fuzzing"), overrides=bad_input_overrides())
    async with stack:
        await stack.start("ingress", "callbacks", "campaigns")
        with requests.Session() as http:
            yield Target(stack, http)


def body_bytes(prepared: requests.PreparedRequest) -> bytes:
    body = prepared.body
    if body is None:
        return b""
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


def send(target: Target, case: Case, *, signed: bool) -> requests.Response:
    """Send ``case`` as schemathesis serialises it; signed with the tenant's secret if asked."""
    base_url = target.base_url(case.operation.path)
    kwargs = case.as_transport_kwargs(base_url=base_url)
    try:
        prepared = requests.Request(
            method=kwargs["method"],
            url=kwargs["url"],
            headers=kwargs.get("headers"),
            params=kwargs.get("params"),
            data=kwargs.get("data"),
            json=kwargs.get("json"),
            files=kwargs.get("files"),
            cookies=kwargs.get("cookies"),
        ).prepare()
    except (ValueError, requests.exceptions.RequestException):
        reject()  # not expressible as an HTTP request (requests refuses the header or URL)
    if signed:
        prepared.headers[SIGNATURE_HEADER] = sign(body_bytes(prepared), TENANT_SECRET)
    return target.http.send(prepared, timeout=60)


def check(target: Target, case: Case, response: requests.Response) -> None:
    status = response.status_code
    target.expected.answers[status] = target.expected.answers.get(status, 0) + 1
    assert status < 500 or (status == 503 and response.headers.get("Retry-After")), (
        f"{case.operation.label} answered {status}: {response.text[:300]}"
    )
    case.validate_response(response, checks=CONFORMANCE)
    healthz = target.http.get(f"{target.ops_url(case.operation.path)}/healthz", timeout=10)
    assert healthz.status_code == 200, f"/healthz answered {healthz.status_code} after {case}"
    if 200 <= status < 300 and case.operation.path == CAMPAIGNS:
        target.expected.campaign_accepted(body_bytes(response.request), response.json())
    elif 200 <= status < 300 and case.operation.path.startswith("/callbacks/"):
        target.expected.callback_accepted()
    elif status == 202 and case.operation.path.startswith(ADMIN):
        target.expected.control_accepted()


async def fuzz(target: Target, strategy: st.SearchStrategy[Case], *, signed: bool) -> None:
    """Run the examples (in a thread: the requests are blocking), then compare Kafka's records
    with what the accepted answers promised."""

    @FUZZ
    @given(case=strategy)
    def run(case: Case) -> None:
        check(target, case, send(target, case, signed=signed))

    await asyncio.to_thread(run)
    target.stack.check_alive()
    await assert_published_as_promised(target)


async def assert_published_as_promised(target: Target) -> None:
    # Everything answered has been acknowledged by Kafka already: no waiting is needed.
    found = await topic_sizes(target.stack.settings, COUNTED)
    assert found == target.expected.records, (found, target.expected.answers)


def strategies(path: str, method: str = "POST", **fixed: Any) -> st.SearchStrategy[Case]:
    operation = SCHEMA[path][method]
    return st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE, **fixed),
        operation.as_strategy(GenerationMode.NEGATIVE, **fixed),
    )


# -- anything at all ---------------------------------------------------------------------------


def answers_during(target: Target, before: dict[int, int]) -> dict[int, int]:
    now = target.expected.answers
    return {
        status: n - before.get(status, 0) for status, n in now.items() if n > before.get(status, 0)
    }


@pytest.mark.parametrize("path", [CAMPAIGNS, *(callback_path(kind) for kind in CALLBACK_ACCOUNTS)])
async def test_random_requests_get_documented_answers_and_publish_nothing(
    target: Target, path: str
) -> None:
    before = dict(target.expected.answers)
    await fuzz(target, strategies(path), signed=False)
    assert not any(200 <= status < 300 for status in answers_during(target, before))


async def test_unsigned_requests_for_a_real_tenant_are_refused(target: Target) -> None:
    before = dict(target.expected.answers)
    await fuzz(target, strategies(CAMPAIGNS, path_parameters={"tenant": TENANT}), signed=False)
    assert set(answers_during(target, before)) == {401}


async def test_operations_endpoints_answer_as_documented(target: Target) -> None:
    for path in OPERATIONS:
        await fuzz(target, SCHEMA[path]["GET"].as_strategy(), signed=False)


# -- behind authentication -----------------------------------------------------------------------


async def test_signed_random_campaign_requests_are_validated_and_publish_only_when_accepted(
    target: Target,
) -> None:
    strategy = strategies(
        CAMPAIGNS, path_parameters={"tenant": TENANT}, headers={"X-API-Key": AGGREGATOR_API_KEY}
    )
    await fuzz(target, strategy, signed=True)
    assert target.expected.answers.get(400, 0) > 0, "no signed request reached validation"


@pytest.mark.parametrize("kind", list(CALLBACK_ACCOUNTS))
async def test_authenticated_random_callbacks_are_parsed_and_publish_only_when_accepted(
    target: Target, kind: str
) -> None:
    headers = {WEBHOOK_SECRET_HEADER: OTPIQ_WEBHOOK_SECRET} if kind == "otpiq" else {}
    path_parameters = {"account": CALLBACK_ACCOUNTS[kind], "token": CALLBACK_TOKENS[kind]}
    strategy = strategies(callback_path(kind), path_parameters=path_parameters, headers=headers)
    before = dict(target.expected.answers)
    await fuzz(target, strategy, signed=False)
    reached = {s: n - before.get(s, 0) for s, n in target.expected.answers.items()}
    assert reached.get(400, 0) + reached.get(200, 0) > 0, f"no {kind} callback got past auth"


def admin_operations() -> list[tuple[str, str]]:
    return [
        ("GET", ADMIN),
        ("GET", f"{ADMIN}/{{tenant}}/{{campaign}}"),
        *(("POST", f"{ADMIN}/{{tenant}}/{action}") for action in CONTROL_ACTIONS),
        *(("POST", f"{ADMIN}/{{tenant}}/{{campaign}}/{action}") for action in CONTROL_ACTIONS),
    ]


@pytest.mark.parametrize(("method", "path"), admin_operations())
async def test_admin_api_answers_random_calls_as_documented(
    target: Target, method: str, path: str
) -> None:
    before = dict(target.expected.answers)
    await fuzz(target, strategies(path, method), signed=False)
    assert set(answers_during(target, before)) <= {401}, "an admin call without the token"
    tenant = {"tenant": TENANT} if "{tenant}" in path else {}
    authorised = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    before = dict(target.expected.answers)
    await fuzz(
        target, strategies(path, method, path_parameters=tenant, headers=authorised), signed=False
    )
    assert 401 not in answers_during(target, before)


# -- what schemathesis does not generate ---------------------------------------------------------


@dataclass(frozen=True)
class Odd:
    """One hand-made request: raw bytes on the wire, and the answers it may get."""

    name: str
    path: str
    body: bytes
    headers: dict[str, str]
    allowed: frozenset[int]
    sign_body: bytes | None = None  # what the signature covers, when not the body itself
    chunked: bool = False


def campaign(recipients: int = 1, **members: Any) -> bytes:
    document = {
        "batchId": f"odd-{recipients}-{zlib.crc32(repr(members).encode())}",
        "metadata": {"appId": 7, "campaignId": "odd"},
        "recipients": [
            {"mobileNumber": f"+4479111{i:05d}", "message": f"hi {i}"} for i in range(recipients)
        ],
        **members,
    }
    return orjson.dumps(document)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def odd_requests() -> list[Odd]:
    json_type = {"Content-Type": "application/json"}
    valid = campaign()
    deep_metadata = b'{"batchId":"deep","metadata":{"appId":1,"x":' + deep(1000).encode() + b"}}"
    otpiq = f"/callbacks/otpiq/{CALLBACK_ACCOUNTS['otpiq']}/{CALLBACK_TOKEN}"
    octopush = f"/callbacks/octopush/{OCTOPUSH_ACCOUNT}/{OCTOPUSH_CALLBACK_TOKEN}"
    opensms = f"/callbacks/opensms/{OPENSMS_ACCOUNT}/{OPENSMS_CALLBACK_TOKEN}"
    otpiq_headers = {**json_type, WEBHOOK_SECRET_HEADER: OTPIQ_WEBHOOK_SECRET}
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    stop = b"number=%2B33600000000&text=STOP&stop_date=2020-11-04+11%3A11%3A45"
    too_many = campaign(INGRESS_MAX_RECIPIENTS + 1)
    bad, ok, refused, too_large = (
        frozenset({400}),
        frozenset({200, 202}),
        frozenset({401}),
        frozenset({413}),
    )
    return [
        Odd("empty campaign body", CAMPAIGNS, b"", json_type, bad),
        Odd(
            "campaign as text/plain (content type is not checked)",
            CAMPAIGNS,
            valid,
            {"Content-Type": "text/plain"},
            ok,
        ),
        Odd("campaign as a form", CAMPAIGNS, b"batchId=x&metadata=y", form, bad),
        Odd(
            "campaign as multipart",
            CAMPAIGNS,
            b"--x\r\n\r\n{}\r\n--x--\r\n",
            {"Content-Type": "multipart/form-data; boundary=x"},
            bad,
        ),
        Odd(
            "campaign in UTF-16",
            CAMPAIGNS,
            valid.decode().encode("utf-16"),
            {"Content-Type": "application/json; charset=utf-16"},
            bad,
        ),
        Odd("campaign with a byte-order mark", CAMPAIGNS, b"\xef\xbb\xbf" + valid, json_type, bad),
        Odd(
            "campaign with invalid UTF-8",
            CAMPAIGNS,
            valid.replace(b"hi 0", b"hi \xff"),
            json_type,
            bad,
        ),
        Odd(
            "gzip campaign, signed as sent",
            CAMPAIGNS,
            gzip.compress(valid),
            {**json_type, "Content-Encoding": "gzip"},
            bad | refused,
        ),
        Odd(
            "gzip campaign, signed as decoded",
            CAMPAIGNS,
            gzip.compress(campaign(2)),
            {**json_type, "Content-Encoding": "gzip"},
            ok,
            sign_body=campaign(2),
        ),
        Odd(
            "gzip header on plain bytes",
            CAMPAIGNS,
            valid,
            {**json_type, "Content-Encoding": "gzip"},
            bad,
        ),
        Odd(
            "unknown content encoding",
            CAMPAIGNS,
            valid,
            {**json_type, "Content-Encoding": "br, zstd, snappy"},
            bad | ok,
        ),
        Odd("chunked campaign", CAMPAIGNS, campaign(3), json_type, ok, chunked=True),
        Odd(
            "campaign over max_body_bytes",
            CAMPAIGNS,
            b" " * INGRESS_MAX_BODY_BYTES + valid,
            json_type,
            too_large,
        ),
        Odd(
            "chunked campaign over max_body_bytes",
            CAMPAIGNS,
            b" " * INGRESS_MAX_BODY_BYTES + valid,
            json_type,
            too_large,
            chunked=True,
        ),
        Odd("more recipients than max_recipients", CAMPAIGNS, too_many, json_type, too_large),
        Odd("metadata nested 1,000 deep", CAMPAIGNS, deep_metadata, json_type, bad),
        Odd("empty OTPIQ callback", otpiq, b"", otpiq_headers, bad),
        Odd(
            "OTPIQ callback nested 300 deep",
            otpiq,
            b'{"smsId":"s","status":"sent","x":' + deep(300).encode() + b"}",
            otpiq_headers,
            bad,
        ),
        Odd(
            "OTPIQ callback over 64 KiB",
            otpiq,
            b'{"smsId":"s","status":"sent","x":"' + b"a" * 70_000 + b'"}',
            otpiq_headers,
            too_large,
        ),
        Odd(
            "chunked OTPIQ callback over 64 KiB",
            otpiq,
            b" " * 70_000,
            otpiq_headers,
            too_large,
            chunked=True,
        ),
        Odd(
            "gzip header on a plain OTPIQ callback",
            otpiq,
            b'{"smsId":"s","status":"sent"}',
            {**otpiq_headers, "Content-Encoding": "gzip"},
            bad,
        ),
        Odd("OpenSMS callback as a form", opensms, b"message_id=1&status=delivered", form, bad),
        Odd(
            "OpenSMS callback in UTF-16",
            opensms,
            '{"message_id":"m","status":"delivered"}'.encode("utf-16"),
            json_type,
            bad,
        ),
        Odd("Octopush STOP, form, no content type", octopush, stop, {}, ok),
        Odd(
            "Octopush STOP, form in UTF-16",
            octopush,
            stop,
            {"Content-Type": "application/x-www-form-urlencoded; charset=utf-16"},
            ok | bad,
        ),
        Odd(
            "Octopush STOP, form in an unknown charset",
            octopush,
            stop,
            {"Content-Type": "application/x-www-form-urlencoded; charset=no-such"},
            ok,
        ),
        Odd(
            "Octopush STOP, Latin-1 text",
            octopush,
            b"number=%2B33600000000&text=ARR%CAT&stop_date=2020-11-04",
            form,
            ok,
        ),
        Odd(
            "Octopush form, IDNA charset",
            octopush,
            stop,
            {"Content-Type": "application/x-www-form-urlencoded; charset=idna"},
            ok | bad,
        ),
        Odd(
            "Octopush multipart",
            octopush,
            b"--x\r\n\r\nnumber=1\r\n--x--\r\n",
            {"Content-Type": "multipart/form-data; boundary=x"},
            bad,
        ),
        Odd("Octopush not a form", octopush, b"%%%=&&=%zz", form, bad),
    ]


def wire_request(target: Target, odd: Odd) -> bytes:
    host = target.base_url(odd.path).removeprefix("http://")
    headers = {"Host": host, "Connection": "close", **odd.headers}
    if odd.path == CAMPAIGNS:
        headers["X-API-Key"] = AGGREGATOR_API_KEY
        covered = odd.body if odd.sign_body is None else odd.sign_body
        headers[SIGNATURE_HEADER] = sign(covered, TENANT_SECRET)
    if odd.chunked:
        headers["Transfer-Encoding"] = "chunked"
        size = 16 * 1024
        chunks = [odd.body[i : i + size] for i in range(0, len(odd.body), size)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    else:
        headers["Content-Length"] = str(len(odd.body))
        payload = odd.body
    path = odd.path.replace("{tenant}", TENANT)
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + payload


async def exchange(address: str, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read the whole answer (the server closes); (status, answer)."""
    host, port = address.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
    except ConnectionResetError:
        answer = b""  # refused before the whole body was read: acceptable only for 413
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, answer


async def expect_from_answer(target: Target, odd: Odd, status: int, answer: bytes) -> None:
    if not 200 <= status < 300:
        return
    if odd.path == CAMPAIGNS:
        payload = answer.split(b"\r\n\r\n", 1)[1]
        body = gzip.decompress(odd.body) if odd.sign_body is not None else odd.body
        target.expected.campaign_accepted(body, orjson.loads(payload))
    else:
        target.expected.callback_accepted()


async def test_odd_transport_is_answered_cleanly(target: Target) -> None:
    failures: list[str] = []
    for odd in odd_requests():
        status, answer = await exchange(target.base_url(odd.path), wire_request(target, odd))
        if status not in odd.allowed and not (status == 0 and odd.allowed == {413}):
            failures.append(f"{odd.name}: {status} {answer[:300]!r}")
        await expect_from_answer(target, odd, status, answer)
        healthz = await asyncio.to_thread(
            target.http.get, f"{target.ops_url(odd.path)}/healthz", timeout=10
        )
        assert healthz.status_code == 200, f"/healthz after {odd.name}"
    assert not failures, "\n".join(failures)
    target.stack.check_alive()
    await assert_published_as_promised(target)


async def test_header_bytes_that_are_not_utf8_are_refused_not_crashed(target: Target) -> None:
    body = campaign(1, batchId="latin-1-key")
    signature = sign(body, TENANT_SECRET).encode()
    otpiq = f"/callbacks/otpiq/{CALLBACK_ACCOUNTS['otpiq']}/{CALLBACK_TOKEN}".encode()
    requests_on_wire: list[tuple[str, bytes]] = [
        (
            target.stack.ingress_url,
            b"POST /optimove/" + TENANT.encode() + b"/campaigns HTTP/1.1\r\nHost: x\r\n"
            b"Connection: close\r\nX-API-Key: caf\xe9\xff\r\n"
            b"x-hub-signature: " + signature + b"\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        ),
        (
            target.stack.callbacks_url,
            b"POST " + otpiq + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"X-OTPIQ-Webhook-Secret: \xff\xfe\r\nContent-Length: 2\r\n\r\n{}",
        ),
        (
            target.stack.callbacks_url,
            b"POST /callbacks/otpiq/" + CALLBACK_ACCOUNTS["otpiq"].encode() + b"/%FF%ED%A0%80"
            b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        ),
    ]
    for address, raw in requests_on_wire:
        status, answer = await exchange(address, raw)
        assert status == 401, answer[:300]
    target.stack.check_alive()
    await assert_published_as_promised(target)


# The checks above must be able to fail: a 500 is not a documented answer.
def test_an_undocumented_server_error_fails_the_checks() -> None:
    operation = SCHEMA[CAMPAIGNS]["POST"]
    case = operation.Case(path_parameters={"tenant": TENANT}, body={})
    response = requests.Response()
    response.status_code = 500
    response.headers["Content-Type"] = "application/json"
    response._content = b'{"error": "internal"}'
    response.request = requests.Request("POST", "http://127.0.0.1:9/x", data=b"{}").prepare()
    checker: Callable[..., None] = case.validate_response
    with pytest.raises(FailureGroup):
        checker(response, checks=CONFORMANCE)
