"""Replies and STOPs through the normalizer: sms.inbound for Optimove, sms.opt-outs for the sender.

Two tenants share the Octopush account ``octo-shared``; ``otpiq-main`` is acme's alone and
``octo-orphan`` is in nobody's routes. Events are published the way the callbacks service stores
them (Octopush keys a reply to a message by ticket and number, an unsolicited one by number).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from services.callbacks.app import build as build_callbacks
from services.normalizer.app import build
from shared.config import Settings
from shared.contract.events import (
    DeadLetter,
    DispatchRecord,
    InboundMessage,
    LastInbound,
    MessageContext,
    NumberFormat,
    OptOutChange,
    ProviderEvent,
    ProviderEventKind,
    StatusEvent,
)
from shared.contract.topics import (
    DEAD_LETTERS,
    DISPATCHES,
    INBOUND,
    LAST_INBOUND,
    NUMBER_FORMATS,
    OPT_OUTS,
    PROVIDER_EVENTS,
    STATUSES,
)
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import OutRecord, Publisher, make_producer
from shared.providers import callback_url
from tests.support import make_settings, read_topic, running, wait_for
from tests.support.providers import post_provider_callback

pytestmark = pytest.mark.integration

SENT_AT = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
BETA_NUMBER = "+33600000001"  # beta sent to it, as Optimove wrote it: "06 00 00 00 01"
ACME_NUMBER = "+447700900123"  # acme sent to it, as "07700 900123"


def octopush(account: str) -> dict[str, Any]:
    return {
        "kind": "octopush",
        "base_url": "http://127.0.0.1:9/octopush",
        "api_key": f"key-{account}",
        "api_login": "ops@example.com",
        "callback_token": f"cb-{account}",
    }


def replies_settings(state_dir: Path) -> Settings:
    return make_settings(
        overrides={
            "normalizer": {"state_dir": str(state_dir)},
            "tenants": {
                "acme": {"routes": [{"provider": "otpiq-main"}, {"provider": "octo-shared"}]},
                "beta": {
                    "optimove_base_url": "http://127.0.0.1:9/beta",
                    "api_token": "beta-token",
                    "secret_key": "beta-secret",
                    "aggregator_api_key": "beta-key",
                    "default_sender_id": "BETA",
                    "default_region": "FR",
                    "routes": [{"provider": "octo-shared"}],
                },
            },
            "providers": {
                "octo-shared": octopush("octo-shared"),
                "octo-orphan": octopush("octo-orphan"),
            },
        }
    )


def dispatch(
    tenant: str, key: str, number: str, written_as: str, *, sender_id: str = ""
) -> DispatchRecord:
    account, provider_message_id = key.split(":")[:2]
    return DispatchRecord(
        context=MessageContext(
            tenant=tenant,
            message_id=f"m-{tenant}-{provider_message_id}",
            batch_id="batch-1",
            mobile_number=written_as,
            metadata_json="{}",
        ),
        correlation_key=key,
        outcome="accepted",
        sub_status="Sent",
        provider_kind="octopush" if account.startswith("octo") else "otpiq",
        provider_account=account,
        provider_message_id=provider_message_id,
        destination=number,
        sender_id=sender_id,
    )


def reply(
    event_id: str,
    account: str,
    number: str,
    text: str,
    *,
    ticket: str = "",
    to: str = "",
    kind: ProviderEventKind = "inbound",
) -> ProviderEvent:
    return ProviderEvent(
        event_id=event_id,
        kind=kind,
        provider_kind="octopush" if account.startswith("octo") else "otpiq",
        provider_account=account,
        # As the callbacks service keys it (Octopush: ticket and number).
        correlation_key=f"{account}:{ticket}:{number}" if ticket else f"{account}:from:{number}",
        provider_message_id=ticket,
        number=number,
        text=text,
        to=to,
        occurred_at=SENT_AT,
    )


@pytest.fixture
async def publisher(kafka: EmbeddedBroker) -> AsyncIterator[Publisher]:
    producer = make_producer(make_settings().kafka, "test")
    await producer.start()
    try:
        yield Publisher(producer, 10.0)
    finally:
        await producer.stop()


async def publish(publisher: Publisher, *items: DispatchRecord | ProviderEvent) -> None:
    await publisher.publish(
        OutRecord(
            DISPATCHES if isinstance(item, DispatchRecord) else PROVIDER_EVENTS,
            item.correlation_key,
            item,
        )
        for item in items
    )


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def inbound_by_text(settings: Settings, expect: int) -> dict[str, InboundMessage]:
    found = await read_topic(settings, INBOUND, InboundMessage, expect=expect, timeout_s=30)
    assert len(found) == expect, [message.text for _, message in found]
    for key, message in found:
        assert key == message.tenant
    return {message.text: message for _, message in found}


async def test_replies_go_to_their_tenant_with_from_as_optimove_wrote_the_number(
    kafka: EmbeddedBroker, publisher: Publisher, tmp_path: Path
) -> None:
    settings = replies_settings(tmp_path)
    # Written by an earlier instance: the directory is read back from the topic.
    earlier = NumberFormat(
        tenant="acme", number="+447700900777", mobile_number="0044 7700 900777", seen_at=SENT_AT
    )
    await publisher.publish([OutRecord(NUMBER_FORMATS, "acme:+447700900777", earlier)])

    held_before = counter("smsbridge_inbound_held_total", provider="octopush")
    async with running(build(settings)):
        # A reply that overtook its message's dispatch record: on the shared account only that
        # record names the tenant, so it waits for it.
        await publish(
            publisher,
            reply("e-0", "octo-shared", "+33600000002", "Early", ticket="sms_t2", to="36000"),
        )
        await wait_for(
            lambda: counter("smsbridge_inbound_held_total", provider="octopush") > held_before,
            what="the early reply to be held",
        )
        await publish(
            publisher,
            dispatch("beta", "octo-shared:sms_t2:+33600000002", "+33600000002", "06 00 00 00 02"),
            dispatch(
                "beta",
                f"octo-shared:sms_t1:{BETA_NUMBER}",
                BETA_NUMBER,
                "06 00 00 00 01",
                sender_id="BETA-PROMO",
            ),
            dispatch("acme", "otpiq-main:sms-a1", ACME_NUMBER, "07700 900123"),
            dispatch("acme", "otpiq-main:sms-a2", ACME_NUMBER, "07700 900123"),  # known already
        )
        formats = await read_topic(settings, NUMBER_FORMATS, NumberFormat, expect=4)
        await publish(
            publisher,
            # Octopush reply carrying its ticket: joins beta's message.
            reply("e-1", "octo-shared", BETA_NUMBER, "Oui merci", ticket="sms_t1", to="36000"),
            # Same message, no receiving number in the callback: the message's own sender id.
            reply("e-2", "octo-shared", BETA_NUMBER, "Encore", ticket="sms_t1"),
            # No message id, on acme's own account, from a number never sent to.
            reply("e-3", "otpiq-main", "+447700900555", "who is this?"),
            # No message id, acme's account, a number acme sent to.
            reply("e-4", "otpiq-main", ACME_NUMBER, "thanks"),
            # No message id on the shared account: beta is the tenant that sent there.
            reply("e-5", "octo-shared", BETA_NUMBER, "  Bonjour ", to="36000"),
            # A number only the topic knows (an earlier instance wrote it).
            reply("e-6", "otpiq-main", "+447700900777", "hi"),
        )
        inbound = await inbound_by_text(settings, expect=7)

    # One record per tenant and number, however many messages went there.
    assert sorted(str(key) for key, _ in formats) == [
        "acme:+447700900123",
        "acme:+447700900777",
        f"beta:{BETA_NUMBER}",
        "beta:+33600000002",
    ]
    assert {(f.number, f.mobile_number) for _, f in formats} == {
        ("+447700900123", "07700 900123"),
        ("+447700900777", "0044 7700 900777"),
        (BETA_NUMBER, "06 00 00 00 01"),
        ("+33600000002", "06 00 00 00 02"),
    }
    summary = {
        text: (m.tenant, m.to, m.from_number, m.opt_out, m.opt_in) for text, m in inbound.items()
    }
    assert summary == {
        "Early": ("beta", "36000", "06 00 00 00 02", False, False),
        "Oui merci": ("beta", "36000", "06 00 00 00 01", False, False),
        "Encore": ("beta", "BETA-PROMO", "06 00 00 00 01", False, False),
        "who is this?": ("acme", "ACME", "447700900555", False, False),
        "thanks": ("acme", "ACME", "07700 900123", False, False),
        "  Bonjour ": ("beta", "36000", "06 00 00 00 01", False, False),
        "hi": ("acme", "ACME", "0044 7700 900777", False, False),
    }
    assert all(m.sent_at == SENT_AT for m in inbound.values())
    assert inbound["thanks"].provider_account == "otpiq-main"


async def test_stop_start_provider_stops_duplicates_and_unroutable_replies(
    kafka: EmbeddedBroker, publisher: Publisher, tmp_path: Path
) -> None:
    settings = replies_settings(tmp_path)
    stop = reply("e-stop", "otpiq-main", ACME_NUMBER, "Stop ")
    keyword_before = counter("smsbridge_optout_total", source="keyword")
    provider_before = counter("smsbridge_optout_total", source="provider")
    optin_before = counter("smsbridge_optin_total")
    forwarded_before = counter("smsbridge_inbound_messages_total", provider="otpiq", kind="inbound")
    duplicates_before = counter("smsbridge_inbound_duplicates_total", provider="otpiq")

    async with running(build(settings)):
        await publish(
            publisher,
            dispatch("beta", f"octo-shared:sms_t9:{BETA_NUMBER}", BETA_NUMBER, "06 00 00 00 01"),
            stop,
            stop,  # the provider repeated its callback
            # An Octopush STOP callback for beta's message: opts out whatever the text.
            reply(
                "e-octo-stop", "octo-shared", BETA_NUMBER, "stop", ticket="sms_t9", kind="opt_out"
            ),
            # Nobody routes this account.
            reply("e-orphan", "octo-orphan", "+33600000002", "STOP", kind="opt_out"),
            # Shared account, a number neither tenant sent to.
            reply("e-stranger", "octo-shared", "+33600000003", "hello"),
        )
        await wait_for(
            lambda: (
                counter("smsbridge_inbound_duplicates_total", provider="otpiq") > duplicates_before
            ),
            what="the repeated STOP to be recognised",
        )
        # After the STOP, on the same key: the customer opts back in.
        await publish(publisher, reply("e-start", "otpiq-main", ACME_NUMBER, "START"))

        inbound = await inbound_by_text(settings, expect=3)
        changes = await read_topic(settings, OPT_OUTS, OptOutChange, expect=3)
        letters = await read_topic(settings, DEAD_LETTERS, DeadLetter, expect=2)

    assert {text: (m.tenant, m.opt_out, m.opt_in) for text, m in inbound.items()} == {
        "Stop ": ("acme", True, False),
        "stop": ("beta", True, False),
        "START": ("acme", False, True),
    }
    assert [(key, c.opted_out, c.source) for key, c in changes if c.tenant == "acme"] == [
        (f"acme:{ACME_NUMBER}", True, "keyword"),
        (f"acme:{ACME_NUMBER}", False, "keyword"),
    ]
    assert [(key, c.number, c.opted_out, c.source) for key, c in changes if c.tenant == "beta"] == [
        (f"beta:{BETA_NUMBER}", BETA_NUMBER, True, "provider")
    ]

    reasons = sorted(letter.reason for _, letter in letters)
    assert reasons == [
        "inbound: provider account 'octo-shared' serves tenants ['acme', 'beta'] "
        "and none of them has sent to this number",
        "opt_out: provider account 'octo-orphan' is in no tenant's routes",
    ]
    for _, letter in letters:
        assert letter.stage == "normalizer"
        assert letter.redrive_topic == PROVIDER_EVENTS.name
        assert ProviderEvent.model_validate_json(letter.payload).event_id in {
            "e-orphan",
            "e-stranger",
        }

    assert counter("smsbridge_optout_total", source="keyword") == keyword_before + 1
    assert counter("smsbridge_optout_total", source="provider") == provider_before + 1
    assert counter("smsbridge_optin_total") == optin_before + 1
    forwarded = counter("smsbridge_inbound_messages_total", provider="otpiq", kind="inbound")
    assert forwarded == forwarded_before + 2  # STOP once, START


# -- a provider account shared by tenants: the documented Octopush callbacks ---------------------

# providers.md §3.3 and §3.4, verbatim.
OCTOPUSH_REPLY = (
    b'{"message_id":"sms_5fa275dbf21dc","number":"+33600000000","text":"some reply",\n'
    b' "sim_card_number":"12345","reception_date":"2020-11-04 11:11:45"}'
)
OCTOPUSH_STOP = (
    b'{"message_id":"sms_5fa275dbf21dc","number":"+33600000000","text":"stop",'
    b'"stop_date":"2020-11-04 11:11:45"}'
)
CUSTOMER = "+33600000000"


def shared_account_settings(state_dir: Path) -> Settings:
    """acme and beta share ``octo-shared`` (as in ``replies_settings``); gamma routes it too
    (and ``otpiq-main``)."""
    settings = replies_settings(state_dir)
    gamma = settings.tenants["beta"].model_copy(
        update={
            "default_sender_id": "GAMMA",
            "routes": [*settings.tenants["beta"].routes, *settings.tenants["acme"].routes[:1]],
        }
    )
    settings.tenants["gamma"] = gamma
    return settings


async def test_shared_account_stop_opts_out_all_that_sent_there_and_a_reply_goes_to_the_last(
    kafka: EmbeddedBroker, publisher: Publisher, tmp_path: Path
) -> None:
    settings = shared_account_settings(tmp_path)
    sends = [
        # acme and beta send to the customer through the shared account, acme last; gamma sends
        # to the customer only through otpiq-main.
        dispatch("acme", f"octo-shared:sms_a1:{CUSTOMER}", CUSTOMER, "0033600000000"),
        dispatch("beta", f"octo-shared:sms_b1:{CUSTOMER}", CUSTOMER, "06 00 00 00 00"),
        dispatch("gamma", "otpiq-main:sms-g1", CUSTOMER, "+33600000000"),
        dispatch("acme", f"octo-shared:sms_a2:{CUSTOMER}", CUSTOMER, "0033600000000"),
    ]
    url = callback_url(settings, "octo-shared")
    async with running(build(settings)), running(build_callbacks(settings)):
        # One at a time, each joined before the next is sent: the order is the order they went.
        for count, sent in enumerate(sends, start=1):
            await publish(publisher, sent)
            await read_topic(settings, STATUSES, StatusEvent, expect=count, settle_s=0.1)

        await post_provider_callback(url, OCTOPUSH_REPLY)
        await inbound_by_text(settings, expect=1)
        await post_provider_callback(url, OCTOPUSH_STOP)
        inbound = await read_topic(settings, INBOUND, InboundMessage, expect=3, timeout_s=30)
        changes = await read_topic(settings, OPT_OUTS, OptOutChange, expect=2)
        wrote = await read_topic(settings, LAST_INBOUND, LastInbound, expect=3)

    # The reply goes to the tenant that sent to the number last, though not first.
    assert sorted((m.text, m.tenant, m.from_number, m.opt_out) for _, m in inbound) == [
        ("some reply", "acme", "0033600000000", False),
        ("stop", "acme", "0033600000000", True),
        ("stop", "beta", "06 00 00 00 00", True),
    ]
    # The STOP opts the customer out for acme and beta, not for gamma.
    assert sorted((key, c.opted_out, c.source) for key, c in changes) == [
        (f"acme:{CUSTOMER}", True, "provider"),
        (f"beta:{CUSTOMER}", True, "provider"),
    ]
    assert sorted((key, w.tenant) for key, w in wrote) == [
        (f"acme:{CUSTOMER}", "acme"),
        (f"acme:{CUSTOMER}", "acme"),
        (f"beta:{CUSTOMER}", "beta"),
    ]
