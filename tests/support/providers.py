"""Settings with an OpenSMS and an Octopush account beside the default OTPIQ one."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from shared.config import Settings
from tests.support import deep_merge, make_settings

OPENSMS_ACCOUNT = "opensms-ke"
OPENSMS_TOKEN = "opensms-api-token"
OPENSMS_CALLBACK_TOKEN = "cb-token-opensms"
OCTOPUSH_ACCOUNT = "octopush-fr"
OCTOPUSH_KEY = "octopush-api-key"
OCTOPUSH_LOGIN = "ops@example.com"
OCTOPUSH_CALLBACK_TOKEN = "cb-token-octopush"


def bulk_provider_settings(
    provider_url: str = "http://127.0.0.1:9",
    *,
    callbacks_url: str | None = None,
    octopush: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """``make_settings`` plus accounts ``opensms-ke`` and ``octopush-fr`` at ``provider_url``.

    The base URLs are where the provider simulator serves each API; ``overrides`` is deep-merged
    on top.
    """
    base = provider_url.rstrip("/")
    accounts: dict[str, Any] = {
        "providers": {
            OPENSMS_ACCOUNT: {
                "kind": "opensms",
                "base_url": f"{base}/opensms/api/v3",
                "api_key": OPENSMS_TOKEN,
                "callback_token": OPENSMS_CALLBACK_TOKEN,
            },
            OCTOPUSH_ACCOUNT: {
                "kind": "octopush",
                "base_url": f"{base}/octopush/v1/public",
                "api_key": OCTOPUSH_KEY,
                "api_login": OCTOPUSH_LOGIN,
                "callback_token": OCTOPUSH_CALLBACK_TOKEN,
                **(octopush or {}),
            },
        },
    }
    deep_merge(accounts, overrides or {})
    return make_settings(provider_url=provider_url, callbacks_url=callbacks_url, overrides=accounts)


async def post_provider_callback(url: str, body: bytes) -> None:
    """POST a JSON callback as a provider does: a 503 (past our answer deadline, or Kafka not
    taking it) is retried, as the provider would."""
    async with aiohttp.ClientSession() as client:
        for _ in range(20):
            async with client.post(
                url, data=body, headers={"content-type": "application/json"}
            ) as response:
                if response.status != 503:
                    assert response.status == 200, await response.text()
                    return
            await asyncio.sleep(0.2)
    raise AssertionError("the callback was never taken")
