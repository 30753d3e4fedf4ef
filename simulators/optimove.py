"""A simulated Optimove SMS API: the three aggregator endpoints, for any tenants it is given.

``POST /{tenant}/api/{version}/aggregator/{handshake|delivery-report|incoming-message}`` checks what
the real API documents (``app-api-key`` equals the tenant's API token, ``x-hub-signature`` over the
raw body, ``content-type: application/json``) and the body shapes of decisions.md §4, §5, §8, and
records every request, rejected ones too. A tenant's ``optimove_base_url`` is
``http://HOST:PORT/{tenant}``. Its control endpoints (``/_simulator/received``, ``tally``,
``report-times``, ``mode``) and ``--record PATH`` are described in docs/simulators.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.config import OptimoveContractSettings, load_settings, split_listen
from shared.contract.optimove import API_KEY_HEADER
from shared.contract.signing import SIGNATURE_HEADER, constant_time_equals, verify
from shared.http_server import HttpServer, Request, Response, Route
from shared.kafka.service import run, serve_until_signalled
from shared.logs import configure_logging
from simulators.optimove_tally import ReportTally, TenantCounters, first_report_times, tenant_tally

log = logging.getLogger(__name__)

HANDSHAKE = "handshake"
DELIVERY_REPORT = "delivery-report"
INCOMING_MESSAGE = "incoming-message"
ENDPOINTS = (HANDSHAKE, DELIVERY_REPORT, INCOMING_MESSAGE)
# Failure modes act on these; a handshake is answered normally.
REPORT_ENDPOINTS = frozenset({DELIVERY_REPORT, INCOMING_MESSAGE})
DEFAULT_LISTEN = "127.0.0.1:8090"
DEFAULT_MAX_RECORDED = 500_000
# Far above any report or control request: nothing is refused for its size.
MAX_BODY_BYTES = 16 * 1024 * 1024
# Requests under way at a stop are given as long as aiohttp's runner gave them.
STOP_GRACE_S = 60.0


@dataclass(frozen=True)
class SimulatedTenant:
    api_token: str
    secret: str


@dataclass
class FailureMode:
    """Answer report requests with ``status`` (or normally when None) after ``delay_ms``.

    Lasts for ``remaining`` requests, or until monotonic time ``until``, or (neither) until ended.
    """

    status: int | None = None
    remaining: int | None = None
    until: float | None = None
    retry_after: str | None = None
    delay_ms: int = 0

    def expired(self, now: float) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return True
        return self.until is not None and now >= self.until

    def take(self, now: float) -> bool:
        """Whether this request falls under the mode; counts it if so."""
        if self.expired(now):
            return False
        if self.remaining is not None:
            self.remaining -= 1
        return True

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "status": self.status,
            "remaining": self.remaining,
            "seconds_left": None if self.until is None else max(0.0, self.until - now),
            "retry_after": self.retry_after,
            "delay_ms": self.delay_ms,
        }


class FailureModeRequest(BaseModel):
    """The JSON body of ``POST /_simulator/mode``."""

    model_config = ConfigDict(extra="forbid")

    status: int | None = Field(default=None, ge=100, le=599)
    count: int | None = Field(default=None, ge=1)
    seconds: float | None = Field(default=None, gt=0)
    retry_after: float | str | None = None
    delay_ms: int = Field(default=0, ge=0)
    tenant: str | None = None

    def to_mode(self, now: float) -> FailureMode:
        retry_after: str | None = None
        if isinstance(self.retry_after, float | int):
            value = float(self.retry_after)
            retry_after = str(int(value)) if value.is_integer() else str(value)
        elif self.retry_after is not None:
            retry_after = self.retry_after
        return FailureMode(
            status=self.status,
            remaining=self.count,
            until=None if self.seconds is None else now + self.seconds,
            retry_after=retry_after,
            delay_ms=self.delay_ms,
        )


@dataclass(frozen=True)
class ReceivedRequest:
    tenant: str
    endpoint: str
    headers: dict[str, str]  # names in lower case
    body: str  # the raw body, decoded as UTF-8
    received_at: str
    status: int  # what was answered; 0 when the client went away first
    rejected: bool
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RejectedRequest(Exception):
    """Answer ``status`` with ``{"error": error, **details}``; recorded with the request."""

    def __init__(
        self,
        status: int,
        error: str,
        *,
        headers: Mapping[str, str] | None = None,
        **details: str,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = dict(headers or {})
        self.details = details

    @property
    def reason(self) -> str:
        return " ".join([self.error, *self.details.values()])

    def response(self) -> Response:
        return _error(self.status, self.error, headers=self.headers, details=self.details)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def check_body(endpoint: str, parsed: object) -> None:
    """The body shapes we send (decisions.md §4, §5, §8); RejectedRequest(400) otherwise."""
    if not isinstance(parsed, dict):
        raise RejectedRequest(400, "body must be a JSON object")
    if endpoint == DELIVERY_REPORT:
        kind = parsed.get("type")
        if not (isinstance(kind, dict) and _is_str(kind.get("status"))):
            raise RejectedRequest(400, "type.status must be a string")
        if not _is_str(kind.get("subStatus")):
            raise RejectedRequest(400, "type.subStatus must be a string")
        if not isinstance(parsed.get("metadata"), dict):
            raise RejectedRequest(400, "metadata must be an object")
        if not (_is_str(parsed.get("messageId")) and parsed["messageId"]):
            raise RejectedRequest(400, "messageId must be a non-empty string")
    elif endpoint == INCOMING_MESSAGE:
        messages = parsed.get("messages")
        if not (isinstance(messages, list) and messages):
            raise RejectedRequest(400, "messages must be a non-empty array")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not all(
                _is_str(message.get(name)) for name in ("to", "from", "message", "sentAt")
            ):
                raise RejectedRequest(
                    400, f"messages[{index}] needs string to, from, message and sentAt"
                )


class OptimoveSimulator:
    """The simulated Optimove, served on ``host:port`` for ``tenants`` {slug: (api_token, secret)}.

    Keeps at most ``max_recorded`` requests (the oldest are forgotten); the tally counts all.
    """

    def __init__(
        self,
        host: str,
        port: int,
        tenants: Mapping[str, tuple[str, str]],
        *,
        status_names: Mapping[str, str] | None = None,
        max_recorded: int = DEFAULT_MAX_RECORDED,
        record_path: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tenants = {
            slug: SimulatedTenant(api_token=token, secret=secret)
            for slug, (token, secret) in tenants.items()
        }
        names = dict(status_names or OptimoveContractSettings().status_names)
        self.delivered_status = names["delivered"]
        self.final_statuses = frozenset({names["delivered"], names["failed"]})
        self._received: deque[ReceivedRequest] = deque(maxlen=max_recorded)
        self._counters: dict[str, TenantCounters] = {}
        self._modes: dict[str | None, FailureMode] = {}
        self.record_path = record_path
        self._record_file: BinaryIO | None = None
        # A report whose client timed out is still taken, late, as the real API may.
        self._http = HttpServer(
            self._routes(), max_body_bytes=MAX_BODY_BYTES, cancel_on_disconnect=False
        )

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def base_url(self, tenant: str) -> str:
        """What the tenant's ``optimove_base_url`` should be."""
        return f"{self.url}/{tenant}"

    async def start(self) -> None:
        if self.record_path is not None:
            self._replay(self.record_path)
            self._record_file = self.record_path.open("ab")
            if self._record_file.tell() and not _ends_with_newline(self.record_path):
                self._record_file.write(b"\n")  # end a line cut short by a kill
        await self._http.start(self.host, self.port)
        log.info("simulated Optimove on %s for tenants %s", self.url, sorted(self.tenants))

    async def stop(self) -> None:
        await self._http.stop(STOP_GRACE_S)
        if self._record_file is not None:
            self._record_file.close()
            self._record_file = None

    def _replay(self, path: Path) -> None:
        """Count the requests recorded by earlier runs (a line cut short by a kill is skipped)."""
        if not path.exists():
            return
        replayed = 0
        with path.open("rb") as lines:
            for line in lines:
                try:
                    entry = orjson.loads(line)
                    self._count(
                        entry["tenant"], entry["endpoint"], orjson.loads(entry["body"]), entry["at"]
                    )
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue
                replayed += 1
        log.info("replayed %d recorded request(s) from %s", replayed, path)

    def _persist(self, slug: str, endpoint: str, raw: bytes, at: float) -> None:
        if self._record_file is None:
            return
        entry = {"tenant": slug, "endpoint": endpoint, "at": at, "body": raw.decode("utf-8")}
        # Written through to the OS before the answer: a SIGKILL after this loses nothing.
        self._record_file.write(orjson.dumps(entry) + b"\n")
        self._record_file.flush()

    # -- in-process accessors ---------------------------------------------------------------------

    def received(
        self, endpoint: str | None = None, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """Recorded requests, oldest first, as dictionaries (see ``ReceivedRequest``)."""
        return [
            request.as_dict()
            for request in self._received
            if (endpoint is None or request.endpoint == endpoint)
            and (tenant is None or request.tenant == tenant)
        ]

    def reset(self) -> None:
        """Forget recorded requests and tallies (failure modes stay), the record file's too."""
        self._received.clear()
        self._counters.clear()
        if self._record_file is not None:
            self._record_file.truncate(0)

    def set_mode(self, mode: FailureMode, tenant: str | None = None) -> None:
        """Apply ``mode`` to one tenant's report requests, or (None) to every tenant's."""
        self._modes[tenant] = mode

    def clear_modes(self, tenant: str | None = None) -> None:
        """End the modes of one tenant, or (None) every mode."""
        if tenant is None:
            self._modes.clear()
        else:
            self._modes.pop(tenant, None)

    def modes(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {
            "*" if tenant is None else tenant: mode.describe(now)
            for tenant, mode in self._modes.items()
            if not mode.expired(now)
        }

    def tally(
        self, tenant: str | None = None, campaign_id: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """Per tenant: what the accepted delivery reports and incoming messages add up to."""
        slugs = [tenant] if tenant is not None else sorted(self.tenants)
        return {
            slug: tenant_tally(
                self._counters.get(slug, TenantCounters()), campaign_id, self.delivered_status
            )
            for slug in slugs
        }

    def report_times(self, tenant: str, campaign_id: str | None = None) -> dict[str, Any]:
        """Per message id: when its first report and its first final report arrived."""
        return first_report_times(self._counters.get(tenant, TenantCounters()), campaign_id)

    # -- HTTP ------------------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        """The aggregator endpoints (one route each: no regex segments), then the control ones."""
        aggregator = [
            Route(
                "POST",
                f"/{{tenant}}/api/{{version}}/aggregator/{endpoint}",
                partial(self._aggregator, endpoint),
            )
            for endpoint in ENDPOINTS
        ]
        return [
            *aggregator,
            Route("GET", "/_simulator/received", partial(_get_received, self)),
            Route("DELETE", "/_simulator/received", partial(_delete_received, self)),
            Route("GET", "/_simulator/tally", partial(_get_tally, self)),
            Route("GET", "/_simulator/report-times", partial(_get_report_times, self)),
            Route("GET", "/_simulator/mode", partial(_get_modes, self)),
            Route("POST", "/_simulator/mode", partial(_post_mode, self)),
            Route("DELETE", "/_simulator/mode", partial(_delete_modes, self)),
        ]

    async def _aggregator(self, endpoint: str, request: Request) -> Response:
        slug = request.match_info["tenant"]
        raw = request.body
        status, reason = 0, "client went away before the answer"
        try:
            await self._check(request, slug, endpoint, raw)
        except RejectedRequest as exc:
            status, reason = exc.status, exc.reason
            return exc.response()
        else:
            status, reason = 200, ""
            return _json({"success": True})
        finally:
            self._record(request, slug, endpoint, raw, status, reason)

    async def _check(self, request: Request, slug: str, endpoint: str, raw: bytes) -> None:
        """Count the request if Optimove would accept it; RejectedRequest otherwise."""
        tenant = self.tenants.get(slug)
        if tenant is None:
            raise RejectedRequest(404, f"unknown tenant {slug!r}")
        mode = self._mode_for(slug) if endpoint in REPORT_ENDPOINTS else None
        if mode is not None and mode.delay_ms:
            await asyncio.sleep(mode.delay_ms / 1000)
        if mode is not None and mode.status is not None:
            headers = {"Retry-After": mode.retry_after} if mode.retry_after is not None else {}
            raise RejectedRequest(mode.status, "simulated failure", headers=headers)
        if not constant_time_equals(request.headers.get(API_KEY_HEADER), tenant.api_token):
            raise RejectedRequest(401, f"invalid {API_KEY_HEADER}")
        failure = verify(raw, request.headers.get(SIGNATURE_HEADER), tenant.secret)
        if failure is not None:
            raise RejectedRequest(401, f"invalid {SIGNATURE_HEADER}", reason=failure.value)
        if request.content_type != "application/json":
            raise RejectedRequest(415, "content-type must be application/json")
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise RejectedRequest(400, "body is not JSON") from None
        check_body(endpoint, parsed)
        at = time.time()
        self._persist(slug, endpoint, raw, at)
        self._count(slug, endpoint, parsed, at)

    def _mode_for(self, slug: str) -> FailureMode | None:
        now = time.monotonic()
        for key in (slug, None):
            mode = self._modes.get(key)
            if mode is None:
                continue
            if mode.take(now):
                return mode
            del self._modes[key]  # used up or out of time
        return None

    def _count(self, slug: str, endpoint: str, parsed: dict[str, Any], at: float) -> None:
        counters = self._counters.setdefault(slug, TenantCounters())
        if endpoint == HANDSHAKE:
            counters.handshakes += 1
        elif endpoint == INCOMING_MESSAGE:
            counters.incoming_requests += 1
            counters.incoming_messages += len(parsed["messages"])
        else:
            metadata = parsed["metadata"]
            campaign = metadata.get("campaignId")
            key = campaign if isinstance(campaign, str) else ""
            status = parsed["type"]["status"]
            counters.campaigns.setdefault(key, ReportTally()).add(
                parsed["messageId"],
                status,
                parsed["type"]["subStatus"],
                final=status in self.final_statuses,
                at=at,
            )

    def _record(
        self,
        request: Request,
        slug: str,
        endpoint: str,
        raw: bytes,
        status: int,
        reason: str,
    ) -> None:
        rejected = not 200 <= status < 300
        if rejected:
            self._counters.setdefault(slug, TenantCounters()).rejected_requests += 1
            log.warning(
                "%s for tenant %s answered %d (%s)",
                endpoint,
                slug,
                status,
                reason,
                extra={"tenant": slug},
            )
        self._received.append(
            ReceivedRequest(
                tenant=slug,
                endpoint=endpoint,
                headers={name.lower(): value for name, value in request.headers.items()},
                body=raw.decode("utf-8", "replace"),
                received_at=_now_iso(),
                status=status,
                rejected=rejected,
                reason=reason,
            )
        )


# -- control endpoints -----------------------------------------------------------------------


async def _get_received(simulator: OptimoveSimulator, request: Request) -> Response:
    found = simulator.received(
        endpoint=request.query.get("endpoint"), tenant=request.query.get("tenant")
    )
    return _json(found)


async def _delete_received(simulator: OptimoveSimulator, request: Request) -> Response:
    simulator.reset()
    return _json({"reset": True})


async def _get_tally(simulator: OptimoveSimulator, request: Request) -> Response:
    tenant = request.query.get("tenant")
    if tenant is not None and tenant not in simulator.tenants:
        return _error(404, f"unknown tenant {tenant!r}")
    return _json(simulator.tally(tenant=tenant, campaign_id=request.query.get("campaign_id")))


async def _get_report_times(simulator: OptimoveSimulator, request: Request) -> Response:
    tenant = request.query.get("tenant", "")
    if tenant not in simulator.tenants:
        return _error(404, f"unknown tenant {tenant!r}")
    return _json(simulator.report_times(tenant, request.query.get("campaign_id")))


async def _get_modes(simulator: OptimoveSimulator, request: Request) -> Response:
    return _json(simulator.modes())


async def _post_mode(simulator: OptimoveSimulator, request: Request) -> Response:
    try:
        wanted = FailureModeRequest.model_validate_json(request.body)
    except ValidationError as exc:
        return _error(400, "invalid mode", details={"detail": str(exc)})
    if wanted.tenant is not None and wanted.tenant not in simulator.tenants:
        return _error(404, f"unknown tenant {wanted.tenant!r}")
    now = time.monotonic()
    simulator.set_mode(wanted.to_mode(now), wanted.tenant)
    return _json(simulator.modes())


async def _delete_modes(simulator: OptimoveSimulator, request: Request) -> Response:
    simulator.clear_modes(request.query.get("tenant"))
    return _json(simulator.modes())


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as file:
        file.seek(-1, 2)
        return file.read(1) == b"\n"


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, orjson.dumps(data), "application/json", headers or {})


def _error(
    status: int,
    error: str,
    *,
    headers: Mapping[str, str] | None = None,
    details: Mapping[str, str] | None = None,
) -> Response:
    return _json({"error": error, **(details or {})}, status, headers)


# -- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "A simulated Optimove for every tenant of --config: checks API keys and signatures, "
        "records requests, tallies reports, and fails on demand (POST /_simulator/mode)."
    )
    parser.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=f"host:port (default {DEFAULT_LISTEN})"
    )
    parser.add_argument(
        "--max-recorded",
        type=int,
        default=DEFAULT_MAX_RECORDED,
        help="requests kept for /_simulator/received (the tally counts all)",
    )
    parser.add_argument(
        "--record",
        type=Path,
        default=None,
        metavar="PATH",
        help="append every accepted request to PATH (JSON lines) and read it back at start, "
        "so that the tally survives a restart",
    )


def cli(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    configure_logging("sim-optimove", settings.log_level)
    host, port = split_listen(args.listen)
    simulator = OptimoveSimulator(
        host,
        port,
        {
            slug: (tenant.api_token.get_secret_value(), tenant.secret_key.get_secret_value())
            for slug, tenant in settings.tenants.items()
        },
        status_names=settings.optimove.status_names,
        max_recorded=args.max_recorded,
        record_path=args.record,
    )
    run(serve_until_signalled(simulator), settings.event_loop)
    return 0
