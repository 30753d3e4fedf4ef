"""Optimove's campaign request body exactly as optimove-sms-api.md §3.2 writes it, values filled in.

The tests of ingress send this text (its layout, key order and whitespace), not a body of our
own making; ``test_documented_shape_is_the_specs`` checks it is still the spec's text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import orjson

SPEC = Path(__file__).resolve().parents[3] / "shared" / "spec" / "optimove-sms-api.md"

# Verbatim from optimove-sms-api.md §3.2 (the values are the documentation's type placeholders).
SECTION_3_2 = """{
  "batchId": "string",
  "metadata": {
    "appId": 0,
    "brandId": "string",
    "campaignId": "string",
    "campaignType": 0,
    "channelId": 0,
    "engagementId": "string",
    "isHashed": false,
    "scheduledTime": 0,
    "tenantId": 0
  },
  "recipients": [
    { "message": "string", "mobileNumber": "string", "customerId": "string" }
  ],
  "requestId": "string",
  "senderId": "string"
}"""

_MEMBER = re.compile(r'^(\s*)"(\w+)": (?!\{|\[)(.*?)(,?)$')
_RECIPIENT = '    { "message": %s, "mobileNumber": %s, "customerId": %s }'

METADATA: dict[str, Any] = {
    "appId": 7,
    "brandId": "brand-1",
    "campaignId": "spring-sale",
    "campaignType": 1,
    "channelId": 505,
    "engagementId": "eng-42",
    "isHashed": False,
    "scheduledTime": 0,
    "tenantId": 1234,
}
# §3.4: auto replies send "" for batchId, brandId and campaignId.
AUTO_REPLY_METADATA: dict[str, Any] = {**METADATA, "brandId": "", "campaignId": ""}


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def campaign_body(
    recipients: list[dict[str, str]],
    *,
    batch_id: str = "batch-1",
    request_id: str | None = "req-1",
    sender_id: str = "ACME",
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """§3.2's text with these values; ``request_id=None`` leaves ``requestId`` out (the older
    page's body has none)."""
    values: dict[str, Any] = {
        **METADATA,
        **(metadata or {}),
        "batchId": batch_id,
        "requestId": request_id,
        "senderId": sender_id,
    }
    lines = []
    for line in SECTION_3_2.splitlines():
        if line.lstrip().startswith('{ "message"'):
            lines.append(
                ",\n".join(
                    _RECIPIENT
                    % (_json(r["message"]), _json(r["mobileNumber"]), _json(r["customerId"]))
                    for r in recipients
                )
            )
            continue
        member = _MEMBER.match(line)
        if member is None:
            lines.append(line)
            continue
        indent, name, _, comma = member.groups()
        if values[name] is None:
            continue  # requestId: the line before keeps its comma, senderId follows
        lines.append(f'{indent}"{name}": {_json(values[name])}{comma}')
    return "\n".join(lines).encode()


def compact(body: bytes) -> bytes:
    """The body as the older page's examples sign it: ``json.dumps(body, separators=(",",
    ":"))``, key order kept (what ingress's tolerant signature check re-creates)."""
    return json.dumps(json.loads(body), separators=(",", ":")).encode()
