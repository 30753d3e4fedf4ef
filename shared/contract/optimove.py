"""Everything we send to Optimove, and every guess at what its documentation leaves out.

Documented: the three endpoints, the headers, ``type.status``/``type.subStatus``, ``metadata``
echoed unchanged, the incoming-message body. Guessed (decisions.md §4, §5, §8), and switchable in
``[optimove]`` of the configuration: the API version segment, the paths, the handshake field names,
the status and sub-status names, and the extra delivery-report fields (each renamed or left out by
``report_fields``, so that a field Optimove refuses with 400 is a configuration change).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from shared.config import OptimoveContractSettings, TenantSettings
from shared.contract.events import InboundMessage, StatusEvent
from shared.contract.signing import SIGNATURE_HEADER, sign
from shared.providers.dryrun import MARK as DRY_RUN_MARK
from shared.times import format_iso

API_KEY_HEADER = "app-api-key"


@dataclass(frozen=True)
class SignedRequest:
    url: str
    body: bytes
    headers: dict[str, str]


class OptimoveContract:
    def __init__(self, settings: OptimoveContractSettings) -> None:
        self.settings = settings

    def url(self, tenant: TenantSettings, path_template: str) -> str:
        return tenant.optimove_base_url + path_template.format(version=self.settings.api_version)

    def signed(self, tenant: TenantSettings, path_template: str, body: bytes) -> SignedRequest:
        """Sign exactly the bytes that will be sent."""
        return SignedRequest(
            url=self.url(tenant, path_template),
            body=body,
            headers={
                "content-type": "application/json",
                API_KEY_HEADER: tenant.api_token.get_secret_value(),
                SIGNATURE_HEADER: sign(body, tenant.secret_key.get_secret_value()),
            },
        )

    def sub_status_name(self, sub_status: str) -> str:
        """``type.subStatus`` for one of ours; a dry run's mark stays in front of the name."""
        names = self.settings.sub_status_names
        if sub_status.startswith(DRY_RUN_MARK):
            plain = sub_status.removeprefix(DRY_RUN_MARK)
            return DRY_RUN_MARK + names.get(plain, plain)
        return names.get(sub_status, sub_status)

    def delivery_report_body(self, event: StatusEvent) -> bytes:
        context = event.context
        report: dict[str, Any] = {
            "type": {
                "status": self.settings.status_names[event.status],
                "subStatus": self.sub_status_name(event.sub_status),
            },
            # The object Optimove sent, byte for byte.
            "metadata": orjson.Fragment(context.metadata_json),
        }
        extras: dict[str, Any] = {
            "batchId": context.batch_id,
            "requestId": context.request_id,
            "customerId": context.customer_id,
            "mobileNumber": context.mobile_number,
            "messageId": context.message_id,
            "providerMessageId": event.provider_message_id,
            "timestamp": format_iso(event.occurred_at, zulu=True),
        }
        for field, value in extras.items():
            wire_name = self.settings.report_fields[field]
            if wire_name:  # "" leaves the field out
                report[wire_name] = value
        return orjson.dumps(report)

    def delivery_report(self, tenant: TenantSettings, event: StatusEvent) -> SignedRequest:
        return self.signed(
            tenant, self.settings.delivery_report_path, self.delivery_report_body(event)
        )

    def incoming_messages(
        self, tenant: TenantSettings, messages: list[InboundMessage]
    ) -> SignedRequest:
        body = orjson.dumps(
            {
                "messages": [
                    {
                        "to": m.to,
                        "from": m.from_number,
                        "message": m.text,
                        "sentAt": format_iso(m.sent_at, zulu=True),
                    }
                    for m in messages
                ]
            }
        )
        return self.signed(tenant, self.settings.incoming_message_path, body)

    def handshake(self, tenant: TenantSettings, campaign_send_url: str) -> SignedRequest:
        body = orjson.dumps(
            {
                self.settings.handshake_url_field: campaign_send_url,
                self.settings.handshake_api_key_field: tenant.aggregator_api_key.get_secret_value(),
                self.settings.handshake_sender_id_field: tenant.default_sender_id,
            }
        )
        return self.signed(tenant, self.settings.handshake_path, body)
