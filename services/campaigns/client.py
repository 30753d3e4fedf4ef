"""``smsbridge campaign status|pause|resume|cancel``: the admin API from the command line.

``status`` prints one row per campaign (``--tenant``, ``--campaign`` narrow it); ``--follow``
redraws it every ``--interval`` seconds with progress bars (plain ANSI: cursor home, clear to the
end; frames one after another when the output is not a terminal) until Ctrl-C. Progress is the
share of recipients with a final status: (delivered + failed) / (accepted + rejected).

The admin URL defaults to ``http://<campaigns.listen>`` of the configuration (a wildcard host is
read as 127.0.0.1) and the token to ``campaigns.admin_token`` (``SMSBRIDGE_CAMPAIGNS__ADMIN_TOKEN``
overrides it, as for any key). ``--url`` and ``--token`` (inline, ``env:NAME`` or ``file:/path``,
like every secret of the configuration) win; given both, the configuration is not read.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO
from urllib.parse import quote

import aiohttp
import orjson

from shared.config import ConfigError, load_settings, split_listen
from shared.contract.campaign_controls import AUTO_REPLIES
from shared.secrets import resolve_secret
from shared.text_table import column_widths, table_line

ACTIONS = ("pause", "resume", "cancel")
BAR_CELLS = 20
REQUEST_TIMEOUT_S = 10.0
_WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}
_EFFECTS = {"send": "-", "hold": "paused", "cancel": "cancelled"}
_CURSOR_HOME = "\x1b[H"
_CLEAR_TO_END = "\x1b[J"
COLUMNS = (
    "TENANT",
    "CAMPAIGN",
    "DONE",
    "ACCEPTED",
    "REJECTED",
    "HELD",
    "WINDOW",
    "SENT",
    "DELIVERED",
    "FAILED",
    "OPTED-OUT",
    "DEAD",
    "REPORTED",
    "SHARE",
    "CONTROL",
    "LAST ACTIVITY",
)
# Indexes of the right-aligned (numeric) columns.
_NUMERIC = frozenset(range(3, 15))


class AdminError(Exception):
    """The admin API could not be reached or refused the call; the message says why."""


@dataclass(frozen=True)
class AdminTarget:
    url: str
    token: str


def admin_url(listen: str) -> str:
    host, port = split_listen(listen)
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def admin_target(config: str | None, url: str | None, token: str | None) -> AdminTarget:
    """Where the admin API is and its token: the options, else the configuration."""
    settings = load_settings(config) if url is None or token is None else None
    if token is not None:
        try:
            secret = resolve_secret(token)
        except ValueError as exc:
            raise ConfigError(f"--token: {exc}") from None
    elif settings is not None and settings.campaigns.admin_token is not None:
        secret = settings.campaigns.admin_token.get_secret_value()
    else:
        raise ConfigError(
            "no admin token: pass --token (inline, env:NAME or file:/path) or set "
            "[campaigns] admin_token (or SMSBRIDGE_CAMPAIGNS__ADMIN_TOKEN)"
        )
    if url is None:
        assert settings is not None
        url = admin_url(settings.campaigns.listen)
    return AdminTarget(url.rstrip("/"), secret)


def campaign_path(tenant: str, campaign: str | None) -> str:
    """The API path of a tenant or one of its campaigns ("" is the auto replies)."""
    path = f"/admin/campaigns/{quote(tenant, safe='')}"
    if campaign is not None:
        path += f"/{quote(campaign or AUTO_REPLIES, safe='')}"
    return path


class AdminClient:
    def __init__(self, target: AdminTarget, session: aiohttp.ClientSession) -> None:
        self.target = target
        self.session = session

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = self.target.url + path
        headers = {"Authorization": f"Bearer {self.target.token}"}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            async with self.session.request(method, url, data=data, headers=headers) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            reach = f"cannot reach the campaigns service at {self.target.url}"
            raise AdminError(f"{reach}: {exc or type(exc).__name__}") from None
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = {"error": raw[:200].decode("utf-8", "replace")}
        if status >= 400:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise AdminError(f"{method} {path}: HTTP {status}: {error or answer}")
        return answer

    async def campaigns(self, tenant: str | None, campaign: str | None) -> list[dict[str, Any]]:
        if tenant is not None and campaign is not None:
            return [await self.call("GET", campaign_path(tenant, campaign))]
        query = f"?tenant={quote(tenant, safe='')}" if tenant is not None else ""
        found: list[dict[str, Any]] = (await self.call("GET", f"/admin/campaigns{query}"))[
            "campaigns"
        ]
        if campaign is not None:
            wanted = campaign or AUTO_REPLIES
            found = [c for c in found if c["campaign"] == wanted]
        return found


# -- rendering -----------------------------------------------------------------------------------


def progress(campaign: dict[str, Any]) -> float | None:
    """Share of the campaign's recipients with a final status (None before any is known)."""
    total: int = campaign["accepted"] + campaign["rejected"]
    done: int = campaign["delivered"] + campaign["failed"]
    if total <= 0:
        return None
    return min(1.0, done / total)


def progress_cell(share: float | None, bars: bool) -> str:
    if share is None:
        return "-"
    percent = f"{share * 100:3.0f}%"
    if not bars:
        return percent
    filled = round(share * BAR_CELLS)
    return "█" * filled + "░" * (BAR_CELLS - filled) + " " + percent


def _share(share: float | None) -> str:
    """The campaign's part of its provider account's sends now ("-": it sends nothing now)."""
    return "-" if share is None else f"{share * 100:.0f}%"


def _when(value: str | None) -> str:
    if not value:
        return "-"
    return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")


def row(campaign: dict[str, Any], bars: bool) -> list[str]:
    return [
        campaign["tenant"],
        campaign["campaign"],
        progress_cell(progress(campaign), bars),
        str(campaign["accepted"]),
        str(campaign["rejected"]),
        str(campaign["held_for_schedule"]),
        str(campaign.get("waiting_for_window", 0)),
        str(campaign["sent"]),
        str(campaign["delivered"]),
        str(campaign["failed"]),
        str(campaign["opted_out"]),
        str(campaign["dead_lettered"]),
        str(campaign["reports_acknowledged"]),
        _share(campaign.get("share")),
        _EFFECTS.get(campaign["control"]["effect"], campaign["control"]["effect"]),
        _when(campaign["last_activity_at"]),
    ]


def render(campaigns: Sequence[dict[str, Any]], *, bars: bool = False) -> str:
    """The status table: a row per campaign, its failures by sub-status beneath it."""
    if not campaigns:
        return "no campaign counted yet\n"
    rows = [row(campaign, bars) for campaign in campaigns]
    widths = column_widths(COLUMNS, rows)
    lines = [table_line(COLUMNS, widths, _NUMERIC)]
    for campaign, cells in zip(campaigns, rows, strict=True):
        lines.append(table_line(cells, widths, _NUMERIC))
        failures = campaign["failed_by_sub_status"]
        if failures:
            detail = ", ".join(f"{sub_status} {n}" for sub_status, n in failures.items())
            lines.append(f"    failed: {detail}")
    return "\n".join(lines) + "\n"


# -- commands --------------------------------------------------------------------------------------


async def status_command(
    target: AdminTarget,
    *,
    tenant: str | None,
    campaign: str | None,
    follow: bool = False,
    interval_s: float = 1.0,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = AdminClient(target, session)
        if not follow:
            try:
                campaigns = await client.campaigns(tenant, campaign)
            except AdminError as exc:
                print(exc, file=err)
                return 1
            out.write(orjson.dumps(campaigns).decode() + "\n" if as_json else render(campaigns))
            return 0
        terminal = out.isatty()
        while True:
            try:
                frame = render(await client.campaigns(tenant, campaign), bars=True)
            except AdminError as exc:
                frame = f"{exc}\n"
            header = (
                f"{target.url}  {datetime.now().strftime('%H:%M:%S')}  "
                f"(every {interval_s:g}s; Ctrl-C to stop)\n\n"
            )
            if terminal:
                out.write(_CURSOR_HOME + header + frame + _CLEAR_TO_END)
            else:
                out.write(header + frame + "\n")
            out.flush()
            await asyncio.sleep(interval_s)


async def control_command(
    target: AdminTarget,
    *,
    action: str,
    tenant: str,
    campaign: str | None,
    reason: str,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            answer = await AdminClient(target, session).call(
                "POST",
                f"{campaign_path(tenant, campaign)}/{action}",
                {"reason": reason, "requested_by": _requested_by()},
            )
        except AdminError as exc:
            print(exc, file=err)
            return 1
    scope = f"campaign {answer['campaign']} of {tenant}" if answer["campaign"] else tenant
    print(
        f"{action} of {scope} stored on {answer['topic']} (key {answer['key']}) at {answer['at']}",
        file=out,
    )
    return 0


def _requested_by() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


# -- arguments -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Campaign status and controls, through the campaigns service's admin API. A campaign "
        f"is its metadata.campaignId; auto replies are {AUTO_REPLIES!r} (or --campaign '')."
    )
    actions = parser.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", help="counts per campaign (--follow: live)")
    status.add_argument("--tenant", help="only this tenant's campaigns")
    status.add_argument("--campaign", help="only this campaign")
    status.add_argument("--follow", action="store_true", help="redraw live with progress bars")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    status.add_argument("--json", action="store_true", help="print the API's JSON instead")
    commands = [status]
    for action in ACTIONS:
        command = actions.add_parser(
            action, help=f"{action} one campaign (--campaign) or every campaign of a tenant"
        )
        command.add_argument("--tenant", required=True)
        command.add_argument("--campaign", help="the campaign (default: the whole tenant)")
        command.add_argument("--reason", default="", help="why, kept with the control")
        commands.append(command)
    for command in commands:
        command.add_argument("--url", help="admin API (default: http://<campaigns.listen>)")
        command.add_argument(
            "--token",
            help="admin token, inline, env:NAME or file:/path (default: campaigns.admin_token)",
        )


def cli(args: argparse.Namespace) -> int:
    target = admin_target(args.config, args.url, args.token)
    if args.action == "status":
        if args.interval <= 0:
            print("--interval must be positive", file=sys.stderr)
            return 2
        try:
            return asyncio.run(
                status_command(
                    target,
                    tenant=args.tenant,
                    campaign=args.campaign,
                    follow=args.follow,
                    interval_s=args.interval,
                    as_json=args.json,
                )
            )
        except KeyboardInterrupt:
            if args.follow:
                return 0  # Ctrl-C is how following ends
            raise
    return asyncio.run(
        control_command(
            target,
            action=args.action,
            tenant=args.tenant,
            campaign=args.campaign,
            reason=args.reason,
        )
    )
