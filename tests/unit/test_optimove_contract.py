"""What we send to Optimove: bodies, URLs, headers and signatures (decisions.md §4, §5, §8)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from bench.stack import to_toml
from shared.config import (
    DELIVERY_REPORT_FIELDS,
    OptimoveContractSettings,
    TenantSettings,
    load_settings,
)
from shared.contract.events import CanonicalStatus, InboundMessage, MessageContext, StatusEvent
from shared.contract.optimove import API_KEY_HEADER, OptimoveContract
from shared.contract.signing import SIGNATURE_HEADER, verify
from shared.secrets import RotatingSecret
from tests.support import (
    AGGREGATOR_API_KEY,
    TENANT,
    TENANT_API_TOKEN,
    TENANT_SECRET,
    make_settings,
    settings_data,
)

# Spacing, key order, escapes and non-ASCII exactly as a campaign request might carry them.
METADATA_JSON = (
    '{ "tenantId": 1234, "appId":7,"brandId" : "", "campaignId":"spring",'
    ' "scheduledTime": 1700000000000, "isHashed": false,'
    ' "extra": {"z": [1, 2.50, null], "quote": "a\\"b", "u": "caf\\u00e9 ☕"} }'
)
MOBILE_NUMBER = "07911 123 456"


@pytest.fixture(scope="module")
def tenant() -> TenantSettings:
    return make_settings(optimove_url="https://optimove.example/base36id").tenants[TENANT]


def status_event(
    status: CanonicalStatus = "delivered", sub_status: str = "Delivered"
) -> StatusEvent:
    return StatusEvent(
        event_id="e-1",
        context=MessageContext(
            tenant=TENANT,
            message_id="m-abc",
            batch_id="batch-1",
            request_id="req-1",
            campaign_id="spring",
            customer_id="cust-9",
            mobile_number=MOBILE_NUMBER,
            metadata_json=METADATA_JSON,
        ),
        status=status,
        sub_status=sub_status,
        provider_message_id="prov-77",
        occurred_at=datetime(2026, 11, 23, 12, 0, 5, 999_000, tzinfo=timezone(timedelta(hours=2))),
    )


def test_delivery_report_echoes_metadata_byte_for_byte(tenant: TenantSettings) -> None:
    request = OptimoveContract(OptimoveContractSettings()).delivery_report(tenant, status_event())

    assert b'"metadata":' + METADATA_JSON.encode("utf-8") + b"," in request.body
    report = orjson.loads(request.body)
    assert report["metadata"] == orjson.loads(METADATA_JSON)


def test_delivery_report_fields(tenant: TenantSettings) -> None:
    request = OptimoveContract(OptimoveContractSettings()).delivery_report(tenant, status_event())

    report = orjson.loads(request.body)
    assert report["type"] == {"status": "Delivered", "subStatus": "Delivered"}
    assert report["mobileNumber"] == MOBILE_NUMBER  # never normalised
    assert report["batchId"] == "batch-1"
    assert report["requestId"] == "req-1"
    assert report["customerId"] == "cust-9"
    assert report["messageId"] == "m-abc"
    assert report["providerMessageId"] == "prov-77"
    assert report["timestamp"] == "2026-11-23T10:00:05Z"  # UTC, whole seconds


@pytest.mark.parametrize(
    ("status", "sub_status", "expected"),
    [
        ("sent", "Sent", "Sent"),
        ("sent", "Acknowledged", "Sent"),
        ("delivered", "Delivered", "Delivered"),
        ("failed", "InvalidNumber", "Failed"),
        ("failed", "Expired", "Failed"),
    ],
)
def test_status_names(
    tenant: TenantSettings, status: CanonicalStatus, sub_status: str, expected: str
) -> None:
    contract = OptimoveContract(OptimoveContractSettings())
    report = orjson.loads(contract.delivery_report_body(status_event(status, sub_status)))
    assert report["type"] == {"status": expected, "subStatus": sub_status}


def test_status_names_and_version_come_from_configuration(tenant: TenantSettings) -> None:
    settings = OptimoveContractSettings(
        api_version="v1.0",
        status_names={"sent": "SENT", "delivered": "DELIVERED", "failed": "FAILED"},
    )
    request = OptimoveContract(settings).delivery_report(tenant, status_event())
    assert orjson.loads(request.body)["type"]["status"] == "DELIVERED"
    assert (
        request.url == "https://optimove.example/base36id/acme/api/v1.0/aggregator/delivery-report"
    )


def test_delivery_report_is_signed_over_the_exact_bytes(tenant: TenantSettings) -> None:
    request = OptimoveContract(OptimoveContractSettings()).delivery_report(tenant, status_event())

    assert request.url == "https://optimove.example/base36id/acme/api/v1/aggregator/delivery-report"
    assert request.headers["content-type"] == "application/json"
    assert request.headers[API_KEY_HEADER] == TENANT_API_TOKEN
    assert verify(request.body, request.headers[SIGNATURE_HEADER], TENANT_SECRET) is None
    assert verify(request.body + b" ", request.headers[SIGNATURE_HEADER], TENANT_SECRET) is not None
    assert verify(request.body, request.headers[SIGNATURE_HEADER], "another-secret") is not None


def test_incoming_messages_body(tenant: TenantSettings) -> None:
    replies = [
        InboundMessage(
            event_id=f"e-{i}",
            tenant=TENANT,
            to="ACME",
            from_number=number,
            text=text,
            sent_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        )
        for i, (number, text) in enumerate([("447911123456", "STOP"), ("+447911654321", "Oui ☕")])
    ]
    request = OptimoveContract(OptimoveContractSettings()).incoming_messages(tenant, replies)

    assert request.url.endswith("/acme/api/v1/aggregator/incoming-message")
    assert orjson.loads(request.body) == {
        "messages": [
            {
                "to": "ACME",
                "from": "447911123456",
                "message": "STOP",
                "sentAt": "2026-01-02T03:04:05Z",
            },
            {
                "to": "ACME",
                "from": "+447911654321",
                "message": "Oui ☕",
                "sentAt": "2026-01-02T03:04:05Z",
            },
        ]
    }
    assert verify(request.body, request.headers[SIGNATURE_HEADER], TENANT_SECRET) is None
    assert request.headers[API_KEY_HEADER] == TENANT_API_TOKEN


def test_handshake_body(tenant: TenantSettings) -> None:
    contract = OptimoveContract(OptimoveContractSettings())
    request = contract.handshake(tenant, "https://sms.example/optimove/acme/campaigns")

    assert request.url.endswith("/acme/api/v1/aggregator/handshake")
    assert orjson.loads(request.body) == {
        "campaignSendUrl": "https://sms.example/optimove/acme/campaigns",
        "apiKey": AGGREGATOR_API_KEY,
        "senderId": "ACME",
    }
    assert verify(request.body, request.headers[SIGNATURE_HEADER], TENANT_SECRET) is None


def test_handshake_field_names_come_from_configuration(tenant: TenantSettings) -> None:
    settings = OptimoveContractSettings(
        handshake_url_field="webhookUrl",
        handshake_api_key_field="aggregatorApiKey",
        handshake_sender_id_field="defaultSenderId",
    )
    request = OptimoveContract(settings).handshake(tenant, "https://sms.example/x")
    assert set(orjson.loads(request.body)) == {"webhookUrl", "aggregatorApiKey", "defaultSenderId"}


def test_signature_matches_the_documented_test_vector(tenant: TenantSettings) -> None:
    # optimove-sms-api.md §1.2: self-computed with Python hmac and openssl.
    body = (
        b'{"messages":[{"to":"companyAbc","from":"44123456789","message":"stop",'
        b'"sentAt":"2015-12-25T10:30:00"}]}'
    )
    vector_tenant = tenant.model_copy(update={"secret_key": RotatingSecret("my-shared-secret")})
    contract = OptimoveContract(OptimoveContractSettings())
    request = contract.signed(vector_tenant, OptimoveContractSettings().incoming_message_path, body)
    assert request.body == body
    assert request.headers[SIGNATURE_HEADER] == (
        "sha256=523c5914fcb59da75707e9363fd521d7b1d761e0a1733c38fa05982e51d65454"
    )


# -- report fields and sub-status names from configuration (issue 14, point 8) ------------------

# decisions.md §4, verbatim: the body we promise, in this order.
DECISIONS_REPORT_EXAMPLE = """{
  "type": {"status": "Delivered", "subStatus": "Delivered"},
  "metadata": {"...": "byte-for-byte the object received in the campaign request"},
  "batchId": "...", "requestId": "...",
  "customerId": "...", "mobileNumber": "exactly as received",
  "messageId": "our message id", "providerMessageId": "...",
  "timestamp": "2026-11-23T10:00:00Z"
}"""


def test_default_report_is_the_body_decisions_md_promises() -> None:
    body = OptimoveContract(OptimoveContractSettings()).delivery_report_body(status_event())

    assert list(orjson.loads(body)) == list(orjson.loads(DECISIONS_REPORT_EXAMPLE))
    assert body == (
        b'{"type":{"status":"Delivered","subStatus":"Delivered"},"metadata":'
        + METADATA_JSON.encode("utf-8")
        + b',"batchId":"batch-1","requestId":"req-1","customerId":"cust-9",'
        b'"mobileNumber":"07911 123 456","messageId":"m-abc","providerMessageId":"prov-77",'
        b'"timestamp":"2026-11-23T10:00:05Z"}'
    )


def test_report_fields_are_renamed_or_left_out_by_configuration() -> None:
    settings = OptimoveContractSettings(
        report_fields={"providerMessageId": "", "customerId": "customerID", "timestamp": ""}
    )
    body = OptimoveContract(settings).delivery_report_body(status_event())

    report = orjson.loads(body)
    assert list(report) == [
        "type",
        "metadata",
        "batchId",
        "requestId",
        "customerID",
        "mobileNumber",
        "messageId",
    ]
    assert report["customerID"] == "cust-9"
    assert b'"metadata":' + METADATA_JSON.encode("utf-8") + b"," in body  # still byte for byte


@pytest.mark.parametrize(
    ("sub_status", "expected"),
    [
        ("OptedOut", "Unsubscribed"),
        ("InvalidNumber", "BadNumber"),
        ("Delivered", "Delivered"),  # not listed: as it is
        ("DryRun:OptedOut", "DryRun:Unsubscribed"),  # a dry run keeps its mark
    ],
)
def test_sub_status_names_come_from_configuration(sub_status: str, expected: str) -> None:
    settings = OptimoveContractSettings(
        sub_status_names={"OptedOut": "Unsubscribed", "InvalidNumber": "BadNumber"}
    )
    status: CanonicalStatus = "delivered" if sub_status == "Delivered" else "failed"
    body = OptimoveContract(settings).delivery_report_body(status_event(status, sub_status))
    assert orjson.loads(body)["type"]["subStatus"] == expected


def test_a_partial_report_fields_table_in_the_file_keeps_the_other_fields(
    tmp_path: Path,
) -> None:
    # What an operator writes when Optimove refuses one field: that field alone.
    path = tmp_path / "smsbridge.toml"
    path.write_text(
        to_toml(
            {
                **settings_data(),
                "optimove": {
                    "report_fields": {"providerMessageId": ""},
                    "sub_status_names": {"OptedOut": "Unsubscribed"},
                },
            }
        ),
        encoding="utf-8",
    )
    optimove = load_settings(path).optimove

    assert optimove.report_fields == {
        **{name: name for name in DELIVERY_REPORT_FIELDS},
        "providerMessageId": "",
    }
    assert optimove.sub_status_names == {"OptedOut": "Unsubscribed"}


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"report_fields": {"providerMessageID": ""}}, "unknown fields ['providerMessageID']"),
        ({"report_fields": {"customerId": "messageId"}}, "share one name"),
        ({"report_fields": {"timestamp": "type"}}, "named type or metadata"),
        ({"sub_status_names": {"Optedout": "Unsubscribed"}}, "unknown sub-statuses"),
        ({"sub_status_names": {"OptedOut": ""}}, "must not be empty"),
    ],
)
def test_report_names_that_cannot_work_are_refused_at_start(
    settings: dict[str, Any], complaint: str
) -> None:
    # A typo would otherwise leave the refused field in every report, silently.
    with pytest.raises(ValidationError, match=re.escape(complaint)):
        OptimoveContractSettings(**settings)
