"""Test support for the campaigns service: settings with its listener and token, admin calls."""

from __future__ import annotations

from typing import Any

import aiohttp

from shared.config import Settings
from shared.kafka.broker import free_port

ADMIN_TOKEN = "s3cret-admin-token"


def campaigns_section(token: str | None = ADMIN_TOKEN) -> dict[str, Any]:
    """``[campaigns]`` on a free loopback port, with ``token`` as its admin token."""
    section: dict[str, Any] = {"listen": f"127.0.0.1:{free_port()}"}
    if token is not None:
        section["admin_token"] = token
    return section


async def admin_call(
    settings: Settings,
    method: str,
    path: str,
    *,
    token: str | None = ADMIN_TOKEN,
    authorization: str | None = None,
    body: bytes | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """(status, JSON answer, headers) of one call to the admin API."""
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = f"http://{settings.campaigns.listen}{path}"
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers, data=body) as response,
    ):
        return response.status, await response.json(), dict(response.headers)


async def campaign_status(settings: Settings, tenant: str, campaign: str) -> dict[str, Any] | None:
    """``GET /admin/campaigns/{tenant}/{campaign}``, None while nothing is counted of it."""
    status, answer, _ = await admin_call(settings, "GET", f"/admin/campaigns/{tenant}/{campaign}")
    if status == 404:
        return None
    assert status == 200, answer
    result: dict[str, Any] = answer
    return result
