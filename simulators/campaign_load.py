"""``smsbridge simulate campaign``: post a campaign as Optimove does, then follow its reports.

The campaign is split into batches, each an Optimove Campaign Transmission request (``batchId``,
``requestId``, ``senderId``, full ``metadata``, recipients with ``customerId``, ``mobileNumber``
and ``message``), serialised once, signed with the tenant's secret and posted to ingress with the
tenant's aggregator API key. Numbers come in the mixed formats Optimove may use. Then the simulated
Optimove's tally for this campaign is followed until every recipient has a final delivery report.

Exit status: 0 when every recipient has exactly one final report (and, with ``--fail-expected``,
the deliberately unsendable recipients were reported ``Failed`` with the right sub-status);
1 otherwise; 2 for a configuration problem.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
import orjson
import phonenumbers

from shared.config import (
    OptimoveContractSettings,
    Settings,
    TenantSettings,
    dev_config_path,
    load_settings,
)
from shared.contract.signing import SIGNATURE_HEADER, sign
from shared.contract.statuses import SubStatus
from shared.providers.http import RETRY_AFTER_HEADER, is_retryable_status, parse_retry_after
from shared.retry import RetryPolicy, retry

CAMPAIGN_API_KEY_HEADER = "X-API-Key"
DEFAULT_TENANT = "dev"
DEFAULT_BATCH_SIZE = 500
DEFAULT_TIMEOUT_S = 300.0
POLL_INTERVAL_S = 1.0
# After the last expected final report, keep watching this long so a late duplicate is seen.
SETTLE_S = 2.0
POST_ATTEMPTS = 6
POST_RETRY = RetryPolicy(base_s=0.5, cap_s=16.0, max_attempts=POST_ATTEMPTS)
# A longer Retry-After from ingress is cut to this: a load test should not stall on one answer.
MAX_RETRY_AFTER_S = 30.0

# GB mobile numbers, given as their 10-digit national significant number ("7911123456"), written
# the ways Optimove's tenants store them.
NUMBER_FORMATS: tuple[Callable[[str], str], ...] = (
    lambda n: f"+44{n}",
    lambda n: f"44{n}",
    lambda n: f"0{n}",
    lambda n: f"0{n[:4]} {n[4:7]} {n[7:]}",
    lambda n: f"+44 {n[:4]} {n[4:]}",
)
_MOBILE_TYPES = (
    phonenumbers.PhoneNumberType.MOBILE,
    phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE,
)

# With --fail-expected, every FAILURE_EVERY-th recipient is unsendable on purpose.
FAILURE_EVERY = 20
INVALID_NUMBER = "12345"


def sample_numbers(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct valid GB mobile numbers, deterministic for ``seed``, in rotating formats."""
    rng = random.Random(seed)
    seen: set[str] = set()
    numbers: list[str] = []
    while len(numbers) < n:
        national = "7" + "".join(rng.choice("0123456789") for _ in range(9))
        if national in seen:
            continue
        parsed = phonenumbers.parse("+44" + national)
        if not phonenumbers.is_valid_number(parsed):
            continue
        if phonenumbers.number_type(parsed) not in _MOBILE_TYPES:
            continue
        seen.add(national)
        numbers.append(NUMBER_FORMATS[len(numbers) % len(NUMBER_FORMATS)](national))
    return numbers


# -- building the campaign -----------------------------------------------------------------------


@dataclass(frozen=True)
class CampaignBatch:
    batch_id: str
    request_id: str
    body: bytes  # exactly what is signed and sent
    recipients: int


@dataclass(frozen=True)
class Campaign:
    tenant: str
    campaign_id: str
    batches: list[CampaignBatch]
    recipients: int
    # customerId -> the sub-status the pipeline must report for it (with --fail-expected)
    expected_failures: dict[str, str] = field(default_factory=dict)


def new_campaign_id() -> str:
    return f"sim-{datetime.now(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(3)}"


def campaign_metadata(tenant: str, campaign_id: str, scheduled_ms: int) -> dict[str, Any]:
    tenant_number = zlib.crc32(tenant.encode("utf-8")) % 100_000
    return {
        "appId": 7,
        "brandId": f"{tenant}-brand",
        "campaignId": campaign_id,
        "campaignType": 1,
        "channelId": 501,
        "engagementId": f"eng-{campaign_id}",
        "isHashed": False,
        "scheduledTime": scheduled_ms,
        "tenantId": tenant_number,
    }


def _message(index: int) -> str:
    text = f"Hello customer {index}, your offer code is C{index:06d}. Reply STOP to opt out"
    # Some non-GSM text, so UCS-2 messages travel too.
    return text + " ☀" if index % 7 == 0 else text


def build_campaign(
    *,
    tenant: str,
    recipients: int,
    batch_size: int,
    sender_id: str,
    campaign_id: str,
    seed: int,
    scheduled_ms: int,
    with_expected_failures: bool = False,
) -> Campaign:
    """The campaign's request bodies, serialised once (with spaces, as raw bytes may come)."""
    if recipients < 1:
        raise ValueError("a campaign needs at least one recipient")
    if batch_size < 1:
        raise ValueError("the batch size must be at least 1")
    numbers = sample_numbers(recipients, seed)
    metadata = campaign_metadata(tenant, campaign_id, scheduled_ms)
    expected_failures: dict[str, str] = {}
    entries: list[dict[str, str]] = []
    for index, number in enumerate(numbers):
        customer_id = f"cust-{index}"
        entry = {"message": _message(index), "mobileNumber": number, "customerId": customer_id}
        if with_expected_failures and index % FAILURE_EVERY == FAILURE_EVERY - 1:
            if (index // FAILURE_EVERY) % 2 == 0:
                entry["mobileNumber"] = INVALID_NUMBER
                expected_failures[customer_id] = SubStatus.INVALID_NUMBER
            else:
                entry["message"] = ""
                expected_failures[customer_id] = SubStatus.EMPTY_MESSAGE
        entries.append(entry)
    batches = []
    for batch_index, start in enumerate(range(0, recipients, batch_size)):
        batch_id = f"{campaign_id}-b{batch_index:04d}"
        request_id = str(uuid.uuid4())
        chunk = entries[start : start + batch_size]
        body = {
            "batchId": batch_id,
            "metadata": metadata,
            "recipients": chunk,
            "requestId": request_id,
            "senderId": sender_id,
        }
        encoded = json.dumps(body, ensure_ascii=False).encode("utf-8")
        batches.append(CampaignBatch(batch_id, request_id, encoded, len(chunk)))
    return Campaign(tenant, campaign_id, batches, recipients, expected_failures)


def signed_headers(body: bytes, secret: str, api_key: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        CAMPAIGN_API_KEY_HEADER: api_key,
        SIGNATURE_HEADER: sign(body, secret),
    }


# -- posting ---------------------------------------------------------------------------------------


class CampaignError(Exception):
    """The campaign could not be posted; the message says what ingress answered."""


class _Retryable(Exception):
    """An answer worth another attempt (429, 5xx, none at all), with the wait it asks for."""

    def __init__(self, problem: str, retry_after_s: float | None = None) -> None:
        super().__init__(problem)
        self.retry_after_s = retry_after_s


async def post_batch(
    session: aiohttp.ClientSession,
    url: str,
    batch: CampaignBatch,
    headers: Mapping[str, str],
    attempts: int = POST_ATTEMPTS,
) -> dict[str, Any]:
    """POST one batch until ingress answers 202, retrying 5xx/429/network errors like Optimove."""

    async def attempt() -> dict[str, Any]:
        try:
            async with session.post(url, data=batch.body, headers=dict(headers)) as response:
                text = await response.text()
                if response.status == 202:
                    answer: dict[str, Any] = orjson.loads(text)
                    return answer
                problem = f"HTTP {response.status}: {text[:300]}"
                if not is_retryable_status(response.status):
                    raise CampaignError(f"batch {batch.batch_id} refused: {problem}")
                wait_s = parse_retry_after(response.headers.get(RETRY_AFTER_HEADER))
                raise _Retryable(
                    problem, None if wait_s is None else min(MAX_RETRY_AFTER_S, wait_s)
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc

    try:
        return await retry(attempt, replace(POST_RETRY, max_attempts=attempts), on=_Retryable)
    except _Retryable as exc:
        raise CampaignError(
            f"batch {batch.batch_id} not accepted after {attempts} attempts: {exc}"
        ) from None


# -- following the reports -------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    expected: int
    delivered: int
    failed_by_sub_status: dict[str, int]
    missing: int
    duplicates: int
    problems: list[str]

    @property
    def failed(self) -> int:
        return sum(self.failed_by_sub_status.values())

    @property
    def ok(self) -> bool:
        return not self.problems


def judge(
    tally: Mapping[str, Any],
    expected: int,
    failed_status: str = "Failed",
    wrong_failures: Sequence[str] = (),
) -> Verdict:
    """Compare one campaign's tally (``/_simulator/tally``) with what was posted."""
    final = int(tally.get("final", 0))
    by_status: Mapping[str, Mapping[str, int]] = tally.get("final_by_status", {})
    failed_by_sub = {sub: count for sub, count in by_status.get(failed_status, {}).items()}
    duplicates = int(tally.get("duplicates", 0))
    problems = list(wrong_failures)
    if final < expected:
        problems.append(f"{expected - final} recipients have no final report")
    if final > expected:
        problems.append(f"{final - expected} final reports for messages that were not posted")
    if duplicates:
        problems.append(f"{duplicates} messages got more than one final report")
    return Verdict(
        expected=expected,
        delivered=int(tally.get("delivered", 0)),
        failed_by_sub_status=failed_by_sub,
        missing=max(0, expected - final),
        duplicates=duplicates,
        problems=problems,
    )


async def fetch_tally(
    session: aiohttp.ClientSession, optimove_url: str, tenant: str, campaign_id: str
) -> dict[str, Any]:
    url = f"{optimove_url}/_simulator/tally"
    params = {"tenant": tenant, "campaign_id": campaign_id}
    async with session.get(url, params=params) as response:
        if response.status != 200:
            raise CampaignError(f"simulated Optimove answered {response.status} for the tally")
        data: dict[str, dict[str, Any]] = orjson.loads(await response.read())
    return data[tenant]


async def follow_tally(
    session: aiohttp.ClientSession,
    optimove_url: str,
    tenant: str,
    campaign_id: str,
    expected: int,
    timeout_s: float,
    on_progress: Callable[[Mapping[str, Any]], None] = lambda _: None,
    poll_interval_s: float = POLL_INTERVAL_S,
    settle_s: float = SETTLE_S,
) -> dict[str, Any]:
    """Poll the campaign's tally until every recipient has a final report (or time runs out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        tally = await fetch_tally(session, optimove_url, tenant, campaign_id)
        on_progress(tally)
        if tally["final"] >= expected:
            await asyncio.sleep(settle_s)
            settled = await fetch_tally(session, optimove_url, tenant, campaign_id)
            on_progress(settled)
            return settled
        if time.monotonic() >= deadline:
            return tally
        await asyncio.sleep(poll_interval_s)


async def check_expected_failures(
    session: aiohttp.ClientSession,
    optimove_url: str,
    tenant: str,
    campaign: Campaign,
    status_names: Mapping[str, str],
) -> list[str]:
    """Every deliberately unsendable recipient must be reported failed with its sub-status."""
    params = {"endpoint": "delivery-report", "tenant": tenant}
    async with session.get(f"{optimove_url}/_simulator/received", params=params) as response:
        received: list[dict[str, Any]] = orjson.loads(await response.read())
    failed_status = status_names["failed"]
    final_statuses = {status_names["delivered"], failed_status}
    finals: dict[str, tuple[str, str]] = {}
    for request in received:
        if request["rejected"]:
            continue
        report = orjson.loads(request["body"])
        if report.get("metadata", {}).get("campaignId") != campaign.campaign_id:
            continue
        status = report["type"]["status"]
        if status in final_statuses:
            finals.setdefault(report.get("customerId", ""), (status, report["type"]["subStatus"]))
    problems = []
    for customer_id, sub_status in sorted(campaign.expected_failures.items()):
        found = finals.get(customer_id)
        if found != (failed_status, sub_status):
            problems.append(
                f"{customer_id}: expected {failed_status}/{sub_status}, got "
                f"{'/'.join(found) if found else 'no final report'}"
            )
    return problems


# -- the command -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CampaignOptions:
    tenant: str
    recipients: int
    batch_size: int
    ingress_url: str
    optimove_url: str
    timeout_s: float
    fail_expected: bool
    seed: int


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def options_from(args: argparse.Namespace, settings: Settings) -> CampaignOptions:
    tenant = settings.tenants[args.tenant]
    return CampaignOptions(
        tenant=args.tenant,
        recipients=args.recipients,
        batch_size=args.batch_size,
        ingress_url=(args.ingress or settings.ingress.public_url).rstrip("/"),
        # The simulator serves every tenant under http://HOST:PORT/{tenant}.
        optimove_url=(args.optimove or origin(tenant.optimove_base_url)).rstrip("/"),
        timeout_s=args.timeout,
        fail_expected=args.fail_expected,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(2**31),
    )


def _progress_printer(expected: int, out: TextIO) -> Callable[[Mapping[str, Any]], None]:
    last: list[tuple[int, int, int]] = []

    def show(tally: Mapping[str, Any]) -> None:
        state = (int(tally["final"]), int(tally["reports"]), int(tally["duplicates"]))
        if last and last[-1] == state:
            return
        last[:] = [state]
        print(
            f"  reports {tally['reports']:>7}  final {tally['final']:>7}/{expected}  "
            f"delivered {tally['delivered']:>7}  failed {tally['failed']:>6}  "
            f"duplicates {tally['duplicates']}",
            file=out,
            flush=True,
        )

    return show


def print_verdict(verdict: Verdict, out: TextIO) -> None:
    failed = ", ".join(f"{sub} {n}" for sub, n in sorted(verdict.failed_by_sub_status.items()))
    print("final tally:", file=out)
    print(f"  delivered   {verdict.delivered:>7}", file=out)
    print(f"  failed      {verdict.failed:>7}" + (f"   ({failed})" if failed else ""), file=out)
    print(f"  missing     {verdict.missing:>7}", file=out)
    print(f"  duplicates  {verdict.duplicates:>7}", file=out)
    for problem in verdict.problems:
        print(f"  problem: {problem}", file=out)
    result = "OK: every recipient has exactly one final report" if verdict.ok else "FAILED"
    print(result, file=out, flush=True)


async def run_campaign(
    tenant: TenantSettings,
    options: CampaignOptions,
    *,
    status_names: Mapping[str, str] | None = None,
    out: TextIO = sys.stdout,
) -> int:
    names = dict(status_names or OptimoveContractSettings().status_names)
    campaign = build_campaign(
        tenant=options.tenant,
        recipients=options.recipients,
        batch_size=options.batch_size,
        sender_id=tenant.default_sender_id or "SMSBRIDGE",
        campaign_id=new_campaign_id(),
        seed=options.seed,
        scheduled_ms=int(time.time() * 1000),
        with_expected_failures=options.fail_expected,
    )
    url = f"{options.ingress_url}/optimove/{options.tenant}/campaigns"
    print(
        f"campaign {campaign.campaign_id} for tenant {options.tenant}: {campaign.recipients} "
        f"recipients in {len(campaign.batches)} batches (seed {options.seed}) -> {url}",
        file=out,
        flush=True,
    )
    secret = tenant.secret_key.get_secret_value()
    api_key = tenant.aggregator_api_key.get_secret_value()
    rejected_at_ingress = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        try:
            for batch in campaign.batches:
                answer = await post_batch(
                    session, url, batch, signed_headers(batch.body, secret, api_key)
                )
                rejected_at_ingress += len(answer.get("rejected", []))
        except CampaignError as exc:
            print(f"error: {exc}", file=out, flush=True)
            return 1
        print(
            f"posted; ingress rejected {rejected_at_ingress} recipients (they must come back "
            f"as Failed). Following {options.optimove_url}/_simulator/tally",
            file=out,
            flush=True,
        )
        try:
            tally = await follow_tally(
                session,
                options.optimove_url,
                options.tenant,
                campaign.campaign_id,
                campaign.recipients,
                options.timeout_s,
                on_progress=_progress_printer(campaign.recipients, out),
            )
            wrong_failures: list[str] = []
            if campaign.expected_failures:
                wrong_failures = await check_expected_failures(
                    session, options.optimove_url, options.tenant, campaign, names
                )
        except (CampaignError, aiohttp.ClientError) as exc:
            print(f"error: cannot read the simulated Optimove's tally: {exc}", file=out)
            return 1
    verdict = judge(tally, campaign.recipients, names["failed"], wrong_failures)
    print_verdict(verdict, out)
    return 0 if verdict.ok else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Post a signed campaign to ingress as Optimove does and follow the simulated Optimove "
        "until every recipient has one final delivery report."
    )
    parser.add_argument("--tenant", default=DEFAULT_TENANT, help="tenant slug in --config")
    parser.add_argument("--recipients", type=int, default=1000, help="number of recipients")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="recipients per request"
    )
    parser.add_argument("--ingress", help="ingress base URL (default: ingress.public_url)")
    parser.add_argument(
        "--optimove",
        help="simulated Optimove URL (default: scheme://host:port of the tenant's base URL)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for all final reports (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--fail-expected",
        action="store_true",
        help=(
            f"make every {FAILURE_EVERY}th recipient unsendable (an invalid number or an empty "
            "message) and require it to be reported Failed with InvalidNumber / EmptyMessage"
        ),
    )
    parser.add_argument("--seed", type=int, help="seed for the sample numbers (default: random)")


def cli(args: argparse.Namespace) -> int:
    settings = load_settings(dev_config_path(args.config))
    if args.tenant not in settings.tenants:
        known = ", ".join(sorted(settings.tenants)) or "none"
        print(f"unknown tenant {args.tenant!r} (configured: {known})", file=sys.stderr)
        return 2
    if args.recipients < 1 or args.batch_size < 1:
        print("--recipients and --batch-size must be at least 1", file=sys.stderr)
        return 2
    options = options_from(args, settings)
    return asyncio.run(
        run_campaign(
            settings.tenants[args.tenant],
            options,
            status_names=settings.optimove.status_names,
        )
    )
