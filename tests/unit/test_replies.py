"""Replies and STOPs: keywords, which tenant a reply is for, how ``from`` and ``to`` are written."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from services.normalizer.join import Joiner, JoinPolicy, JoinState
from services.normalizer.replies import (
    NumberDirectory,
    ReplyRouter,
    UnroutableReply,
    as_utc,
    choose_tenant,
    customer_e164,
    opt_out_tenants,
    optimove_from,
    reply_to,
    sent_through,
    stamp_due,
    tenants_by_account,
)
from shared.config import NormalizerSettings, TenantSettings
from shared.contract import ids
from shared.contract.events import (
    DispatchRecord,
    LastInbound,
    MessageContext,
    NumberFormat,
    ProviderEvent,
    ProviderEventKind,
)
from shared.contract.ids import tenant_number_key
from shared.contract.keywords import KeywordRules

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
RULES = KeywordRules.of()


def tenant(*accounts: str, sender: str, region: str = "GB") -> TenantSettings:
    return TenantSettings(
        optimove_base_url="http://optimove.test",
        api_token="token",
        secret_key="secret",
        aggregator_api_key="key",
        default_sender_id=sender,
        default_region=region,
        routes=[{"provider": account} for account in accounts],
    )


# acme and beta share the Octopush account; otpiq-main is acme's alone.
TENANTS = {
    "acme": tenant("otpiq-main", "octo-shared", sender="ACME"),
    "beta": tenant("octo-shared", sender="BETA", region="FR"),
}


class Directory:
    """A number directory whose backing topic the test writes to directly."""

    def __init__(self) -> None:
        self.topic: dict[str, dict[str, Any]] = {}

    def lookup(self, key: str) -> Mapping[str, Any] | None:
        return self.topic.get(key)

    def write(
        self,
        tenant: str,
        e164: str,
        written_as: str,
        seen_at: datetime,
        accounts: Mapping[str, datetime] | None = None,
    ) -> None:
        """``accounts`` None: a record written before they were recorded."""
        record = NumberFormat(
            tenant=tenant,
            number=e164,
            mobile_number=written_as,
            seen_at=seen_at,
            accounts=dict(accounts or {}),
        )
        self.topic[tenant_number_key(tenant, e164)] = record.model_dump(mode="json")


def reply(
    text: str = "hello",
    *,
    account: str = "otpiq-main",
    number: str = "+447700900123",
    kind: ProviderEventKind = "inbound",
    to: str = "",
    occurred_at: datetime | None = T0,
) -> ProviderEvent:
    return ProviderEvent(
        event_id="e-reply-1",
        kind=kind,
        provider_kind="octopush" if account.startswith("octo") else "otpiq",
        provider_account=account,
        correlation_key=f"{account}:from:{number}",
        number=number,
        text=text,
        to=to,
        occurred_at=occurred_at,
        received_at=T0 + timedelta(seconds=5),
    )


def dispatch(tenant: str = "beta", *, sender_id: str = "") -> DispatchRecord:
    return DispatchRecord(
        context=MessageContext(
            tenant=tenant,
            message_id="m-1",
            batch_id="batch-1",
            mobile_number="06 00 00 00 01",
            metadata_json="{}",
        ),
        correlation_key="octo-shared:sms_5fa275dbf21dc:+33600000001",
        outcome="accepted",
        sub_status="Sent",
        provider_kind="octopush",
        provider_account="octo-shared",
        provider_message_id="sms_5fa275dbf21dc",
        destination="+33600000001",
        sender_id=sender_id,
    )


# -- keywords ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["STOP", "stop", "Stop", "  stop \n", "\tSTOPALL", "unsubscribe", "Cancel", "end", "QUIT"],
)
def test_whole_message_opt_out_keywords_in_any_case_and_spacing(text: str) -> None:
    assert RULES.classify(text) == "opt_out"


@pytest.mark.parametrize("text", ["ARRÊT", "arrêt", "Arrêt", "ARRE\u0302T", "arret", "ARRET"])
def test_arret_with_or_without_its_accent_however_encoded(text: str) -> None:
    assert RULES.classify(text) == "opt_out"


@pytest.mark.parametrize("text", ["START", " start ", "Unstop"])
def test_opt_in_keywords(text: str) -> None:
    assert RULES.classify(text) == "opt_in"


@pytest.mark.parametrize(
    "text",
    ["please stop texting me", "STOP!", "stop it", "STOP STOP", "", "   ", "stopp", "started"],
)
def test_only_the_whole_message_counts(text: str) -> None:
    assert RULES.classify(text) is None


def test_keyword_lists_come_from_settings_with_the_documented_defaults() -> None:
    settings = NormalizerSettings()
    assert {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"} <= set(
        settings.opt_out_keywords
    )
    assert {"ARRET", "ARRÊT"} <= set(settings.opt_out_keywords)
    assert settings.opt_in_keywords == ["START", "UNSTOP"]

    custom = KeywordRules.of(["halt"], ["resume"])
    assert custom.classify("HALT") == "opt_out"
    assert custom.classify("stop") is None
    assert custom.classify("Resume") == "opt_in"


def test_a_word_cannot_both_opt_out_and_opt_in() -> None:
    with pytest.raises(ValidationError, match="repeat opt_out_keywords"):
        NormalizerSettings(opt_in_keywords=["START", " stop "])
    with pytest.raises(ValueError, match="both opt out and opt in"):
        KeywordRules.of(["STOP"], ["Stop"])


# -- numbers, from, to, time --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("+33600000001", "GB", "+33600000001"),
        ("0600000001", "FR", "+33600000001"),
        ("33600000001", "GB", "+33600000001"),
        # Not valid for phonenumbers (a drama range), but the provider wrote it as E.164.
        ("+447700900123", "GB", "+447700900123"),
        ("+44 7700 900123", "GB", "+447700900123"),
        ("447700900123", "GB", "+447700900123"),
        # Valid as a US national number too: a reply from Singapore must not opt out a US customer.
        ("6596234567", "US", "+6596234567"),
        ("", "GB", None),
        ("SENDER", "GB", None),
        ("+12", "GB", None),
    ],
)
def test_customer_number_in_e164(raw: str, region: str, expected: str | None) -> None:
    assert customer_e164(raw, region) == expected


def test_from_is_written_as_optimove_wrote_it_else_international_digits() -> None:
    assert optimove_from("+447700900123", "07700 900123") == "07700 900123"
    assert optimove_from("+447700900123", None) == "447700900123"
    assert optimove_from("+447700900123", "") == "447700900123"


def test_to_is_the_receiving_number_else_the_replied_to_sender_else_the_default() -> None:
    assert reply_to("36000", "ACME-OFFERS", "ACME") == "36000"
    assert reply_to("", "ACME-OFFERS", "ACME") == "ACME-OFFERS"
    assert reply_to("", "", "ACME") == "ACME"


def test_sent_at_is_utc() -> None:
    paris = timezone(timedelta(hours=1))
    assert as_utc(datetime(2026, 11, 23, 11, 0, tzinfo=paris)) == T0
    assert as_utc(datetime(2026, 11, 23, 10, 0)).tzinfo == UTC


# -- which tenant -------------------------------------------------------------------------------


def test_tenants_by_account_follow_the_routes() -> None:
    assert tenants_by_account(TENANTS) == {
        "otpiq-main": ("acme",),
        "octo-shared": ("acme", "beta"),
    }


def test_choose_tenant() -> None:
    never = lambda tenant: None  # noqa: E731
    assert choose_tenant("otpiq-main", ["acme"], never) == "acme"
    with pytest.raises(UnroutableReply, match="'octo-orphan' is in no tenant's routes"):
        choose_tenant("octo-orphan", [], never)
    with pytest.raises(UnroutableReply, match=r"serves tenants \['acme', 'beta'\] and none"):
        choose_tenant("octo-shared", ["acme", "beta"], never)

    seen = {"acme": T0, "beta": T0 + timedelta(hours=1)}
    assert choose_tenant("octo-shared", ["acme", "beta"], seen.get) == "beta"
    assert choose_tenant("octo-shared", ["acme", "beta"], {"acme": T0}.get) == "acme"


# -- the number directory -----------------------------------------------------------------------


def test_directory_writes_a_number_only_when_new_changed_or_stale() -> None:
    topic = Directory()
    directory = NumberDirectory(topic.lookup, refresh_s=3600)
    sent = dispatch()

    first = directory.update_for(sent, T0)
    assert first == NumberFormat(
        tenant="beta",
        number="+33600000001",
        mobile_number="06 00 00 00 01",
        seen_at=T0,
        accounts={"octo-shared": T0},
    )
    # Being written, or written but not yet back from the topic: not written twice.
    assert directory.update_for(sent, T0 + timedelta(minutes=1)) is None
    # Its publication failed: the next dispatch to the number writes it.
    directory.withdraw(first)
    retried = directory.update_for(sent, T0 + timedelta(minutes=2))
    assert retried is not None and retried.seen_at == T0 + timedelta(minutes=2)

    topic.write("beta", "+33600000001", "06 00 00 00 01", T0, {"octo-shared": T0})
    assert directory.update_for(sent, T0 + timedelta(minutes=59)) is None
    stale = directory.update_for(sent, T0 + timedelta(hours=2))
    assert stale is not None and stale.seen_at == T0 + timedelta(hours=2)

    respelt = sent.model_copy(
        update={"context": sent.context.model_copy(update={"mobile_number": "+33600000001"})}
    )
    changed = directory.update_for(respelt, T0 + timedelta(minutes=5))
    assert changed is not None and changed.mobile_number == "+33600000001"

    failed = sent.model_copy(update={"outcome": "failed"})
    assert NumberDirectory(topic.lookup, refresh_s=3600).update_for(failed, T0) is None


def test_directory_prefers_the_newest_of_its_own_writes_and_the_topic() -> None:
    topic = Directory()
    directory = NumberDirectory(topic.lookup, refresh_s=3600)
    sent = dispatch("acme")
    assert directory.update_for(sent, T0) is not None
    mine = directory.known("acme", "+33600000001")
    assert mine is not None and mine.mobile_number == "06 00 00 00 01"  # before the topic has it
    topic.write("acme", "+33600000001", "newer", T0 + timedelta(hours=1))
    known = directory.known("acme", "+33600000001")
    assert known is not None and known.mobile_number == "newer"
    topic.write("acme", "+33600000001", "older", T0 - timedelta(hours=1))
    known = directory.known("acme", "+33600000001")
    assert known is not None and known.mobile_number == "06 00 00 00 01"
    topic.topic["acme:+447700900124"] = {"not": "a number format"}
    assert directory.known("acme", "+447700900124") is None


# -- the router ---------------------------------------------------------------------------------


def router(topic: Directory | None = None) -> ReplyRouter:
    lookup = (topic or Directory()).lookup
    return ReplyRouter(TENANTS, RULES, NumberDirectory(lookup, refresh_s=3600))


def test_a_reply_to_a_known_message_belongs_to_its_tenant_and_uses_its_spelling() -> None:
    event = reply("Oui", account="octo-shared", number="+33600000001", to="36000")
    [routed] = router().route(event, dispatch("beta", sender_id="BETA-PROMO"))
    assert routed.tenant == "beta"
    assert routed.number == "+33600000001"
    assert routed.message_id == "m-1"
    assert routed.opt_out_change is None
    inbound = routed.inbound
    assert (inbound.tenant, inbound.to, inbound.from_number, inbound.text) == (
        "beta",
        "36000",
        "06 00 00 00 01",
        "Oui",
    )
    assert inbound.sent_at == T0
    assert not inbound.opt_out and not inbound.opt_in
    assert inbound.event_id.startswith("e-") and inbound.event_id != event.event_id

    # No receiving number in the callback: the sender id the message went out from.
    no_to = reply("Oui", account="octo-shared", number="+33600000001")
    [routed] = router().route(no_to, dispatch("beta", sender_id="BETA-PROMO"))
    assert routed.inbound.to == "BETA-PROMO"


def test_an_unmatched_reply_on_a_single_tenant_account() -> None:
    [routed] = router().route(reply(" Thanks ", occurred_at=None), None)
    assert routed.tenant == "acme"
    assert routed.message_id is None
    assert routed.inbound.from_number == "447700900123"  # never seen: international digits
    assert routed.inbound.to == "ACME"  # the tenant's default sender id
    assert routed.inbound.text == " Thanks "  # verbatim
    assert routed.inbound.sent_at == T0 + timedelta(seconds=5)  # received_at, no provider time

    topic = Directory()
    topic.write("acme", "+447700900123", "07700 900123", T0)
    [routed] = router(topic).route(reply(), None)
    assert routed.inbound.from_number == "07700 900123"


def test_an_unmatched_reply_on_a_shared_account_goes_to_who_sent_there_last() -> None:
    topic = Directory()
    event = reply(account="octo-shared", number="+33600000001")
    with pytest.raises(UnroutableReply, match="none of them has sent to this number"):
        router(topic).route(event, None)

    topic.write("acme", "+33600000001", "0033600000001", T0)
    assert [r.tenant for r in router(topic).route(event, None)] == ["acme"]
    topic.write("beta", "+33600000001", "06 00 00 00 01", T0 + timedelta(days=1))
    [routed] = router(topic).route(event, None)
    assert (routed.tenant, routed.inbound.from_number, routed.inbound.to) == (
        "beta",
        "06 00 00 00 01",
        "BETA",
    )


def test_unroutable_replies() -> None:
    with pytest.raises(UnroutableReply, match="'octo-orphan' is in no tenant's routes"):
        router().route(reply(account="octo-orphan"), None)
    with pytest.raises(UnroutableReply, match="without a usable sender number"):
        router().route(reply(number="ACME"), None)
    with pytest.raises(UnroutableReply, match="tenant 'gone' of the replied-to message"):
        router().route(reply(account="octo-shared"), dispatch("gone"))


@pytest.mark.parametrize(
    ("event", "opted_out", "source"),
    [
        (reply(" stop "), True, "keyword"),
        (reply("ARRÊT"), True, "keyword"),
        (reply("start"), False, "keyword"),
        (reply("stop", kind="opt_out"), True, "provider"),
        # A provider STOP opts out whatever the customer wrote.
        (reply("", kind="opt_out"), True, "provider"),
    ],
)
def test_keywords_and_provider_stops_change_the_opt_out(
    event: ProviderEvent, opted_out: bool, source: str
) -> None:
    [routed] = router().route(event, None)
    change = routed.opt_out_change
    assert change is not None
    assert (change.tenant, change.number, change.opted_out, change.source) == (
        "acme",
        "+447700900123",
        opted_out,
        source,
    )
    assert change.at == routed.inbound.sent_at
    assert (routed.inbound.opt_out, routed.inbound.opt_in) == (opted_out, not opted_out)
    assert routed.inbound.text == event.text  # forwarded as written, STOP included
    assert routed.opt_out_source == (source if opted_out else None)


def test_an_opt_out_is_keyed_by_the_number_the_message_went_to() -> None:
    # The sender checks ``tenant:destination``; the provider may spell the number otherwise.
    event = reply("STOP", account="octo-shared", number="0600000001")
    [routed] = router().route(event, dispatch("beta"))
    change = routed.opt_out_change
    assert change is not None and change.number == "+33600000001"


def test_status_events_are_not_replies() -> None:
    with pytest.raises(ValueError, match="not a reply"):
        router().route(reply(kind="status"), None)


# -- replies held for their dispatch record (join.py) -------------------------------------------

JOINER = Joiner(JoinPolicy(unmatched_after_s=600.0, dlr_timeout_s=3600.0))
NOW = T0.timestamp()


def ticket_reply(event_id: str, text: str = "Oui") -> ProviderEvent:
    return reply(text, account="octo-shared", number="+33600000001").model_copy(
        update={
            "event_id": event_id,
            "provider_message_id": "sms_5fa275dbf21dc",
            "correlation_key": "octo-shared:sms_5fa275dbf21dc:+33600000001",
        }
    )


def round_trip(state: JoinState | None) -> JoinState | None:
    return JoinState.from_value(state.to_value()) if state is not None else None


def test_a_held_reply_is_released_by_its_dispatch_once() -> None:
    first = JOINER.hold_reply(None, ticket_reply("e-1"), NOW)
    assert first.changed and first.statuses == []
    assert JOINER.due_at(first.state) == NOW + 600.0
    second = JOINER.hold_reply(round_trip(first.state), ticket_reply("e-2", "STOP"), NOW + 1)
    repeat = JOINER.hold_reply(round_trip(second.state), ticket_reply("e-1"), NOW + 2)
    assert repeat.dropped == ["duplicate"] and not repeat.changed

    joined = JOINER.on_dispatch(round_trip(second.state), dispatch(), NOW + 3)
    assert [e.event_id for e in joined.released_replies] == ["e-1", "e-2"]
    assert [(s.status, s.sub_status) for s in joined.statuses] == [("sent", "Sent")]
    assert joined.state is not None and joined.state.held == []
    # Repeats are recognised by the service's record of forwarded replies from now on.
    assert "e-1" not in joined.state.seen_event_ids
    replayed = JOINER.on_dispatch(round_trip(joined.state), dispatch(), NOW + 4)
    assert replayed.released_replies == [] and not replayed.changed


def test_a_held_reply_whose_dispatch_never_comes_is_dead_lettered_as_a_reply() -> None:
    held = JOINER.hold_reply(None, ticket_reply("e-1"), NOW)
    given_up = JOINER.on_timer(round_trip(held.state), NOW + 600.0)
    assert given_up.state is None and given_up.changed
    assert given_up.unmatched_reply_providers == ["octopush"]
    assert given_up.unmatched_providers == []
    [letter] = given_up.dead_letters
    assert letter.reason == (
        "inbound: no tenant for the reply and no dispatch record for "
        "octo-shared:sms_5fa275dbf21dc:+33600000001"
    )
    assert ProviderEvent.model_validate_json(letter.payload).event_id == "e-1"


def test_a_reply_is_never_held_once_its_dispatch_is_here() -> None:
    joined = JOINER.on_dispatch(None, dispatch(), NOW)
    with pytest.raises(ValueError, match="route the reply"):
        JOINER.hold_reply(round_trip(joined.state), ticket_reply("e-1"), NOW)


# -- shared provider accounts: who a STOP and a reply concern ------------------------------------

NUMBER = "+33600000001"
# acme and beta send to the customer through the shared Octopush account; gamma routes it too but
# sent to the customer only through otpiq-main; delta routes it and never sent to the customer.
SHARED = {
    "acme": tenant("otpiq-main", "octo-shared", sender="ACME"),
    "beta": tenant("octo-shared", sender="BETA", region="FR"),
    "gamma": tenant("octo-shared", "otpiq-main", sender="GAMMA"),
    "delta": tenant("octo-shared", sender="DELTA", region="FR"),
}


def shared_topic() -> Directory:
    topic = Directory()
    topic.write("acme", NUMBER, "0033600000001", T0, {"octo-shared": T0})
    topic.write("beta", NUMBER, "06 00 00 00 01", T0 + timedelta(hours=1), {"octo-shared": T0})
    topic.write("gamma", NUMBER, "+33600000001", T0 + timedelta(hours=2), {"otpiq-main": T0})
    return topic


def shared_router(topic: Directory) -> ReplyRouter:
    directory = NumberDirectory(
        topic.lookup, refresh_s=3600, tenants_by_account=tenants_by_account(SHARED)
    )
    return ReplyRouter(SHARED, RULES, directory)


def test_opt_out_tenants_are_the_replied_to_tenant_and_all_that_sent_through_the_account() -> None:
    seen = {"acme": T0, "beta": T0 + timedelta(hours=1)}
    everyone = ["acme", "beta", "gamma"]
    assert opt_out_tenants("octo-shared", everyone, None, seen.get) == ("beta", "acme")
    assert opt_out_tenants("octo-shared", everyone, "acme", seen.get) == ("acme", "beta")
    # The replied-to message's tenant counts even if the directory has not caught up.
    assert opt_out_tenants("octo-shared", everyone, "gamma", seen.get) == ("gamma", "beta", "acme")
    # An account of one tenant: that tenant, as for any reply.
    assert opt_out_tenants("otpiq-main", ["acme"], None, lambda tenant: None) == ("acme",)
    with pytest.raises(UnroutableReply, match="none of them has sent to this number"):
        opt_out_tenants("octo-shared", everyone, None, lambda tenant: None)
    with pytest.raises(UnroutableReply, match="in no tenant's routes"):
        opt_out_tenants("octo-orphan", [], None, seen.get)


def test_sent_through_reads_the_account_stamp_and_counts_old_records_for_every_account() -> None:
    record = NumberFormat(
        tenant="acme", number=NUMBER, mobile_number="x", seen_at=T0, accounts={"a": T0}
    )
    assert sent_through(record, "a") == T0
    assert sent_through(record, "b") is None
    assert sent_through(record.model_copy(update={"accounts": {}}), "b") == T0
    assert sent_through(None, "a") is None


@pytest.mark.parametrize(
    ("current", "mobile", "rival_later", "due"),
    [
        (None, "06", False, True),
        ({"accounts": {"octo-shared": T0}, "mobile_number": "06"}, "06", False, False),
        ({"accounts": {"octo-shared": T0}, "mobile_number": "06"}, "6", False, True),  # respelt
        ({"accounts": {"otpiq-main": T0}, "mobile_number": "06"}, "06", False, True),  # new account
        ({"accounts": {}, "mobile_number": "06"}, "06", False, True),  # written before accounts
        # Another tenant sharing the account sent to the number after our stamp.
        ({"accounts": {"octo-shared": T0}, "mobile_number": "06"}, "06", True, True),
        # Stale.
        (
            {"accounts": {"octo-shared": T0 - timedelta(hours=2)}, "mobile_number": "06"},
            "06",
            False,
            True,
        ),
    ],
)
def test_stamp_due(
    current: dict[str, Any] | None, mobile: str, rival_later: bool, due: bool
) -> None:
    record = (
        NumberFormat(tenant="beta", number=NUMBER, seen_at=T0, **current)
        if current is not None
        else None
    )
    now = T0 + timedelta(minutes=30)
    assert stamp_due(record, mobile, "octo-shared", now, 3600, lambda stamp: rival_later) is due


def test_the_directory_restamps_a_number_another_tenant_sent_to_since() -> None:
    # beta, then acme, then beta again, all within the refresh period: beta sent last.
    topic = Directory()
    directory = NumberDirectory(
        topic.lookup, refresh_s=24 * 3600, tenants_by_account=tenants_by_account(SHARED)
    )
    beta = dispatch("beta")
    acme = dispatch("acme")
    for sent, moment in ((beta, T0), (acme, T0 + timedelta(minutes=1))):
        record = directory.update_for(sent, moment)
        assert record is not None
        topic.topic[tenant_number_key(record.tenant, record.number)] = record.model_dump(
            mode="json"
        )
    again = directory.update_for(beta, T0 + timedelta(minutes=2))
    assert again is not None and again.accounts == {"octo-shared": T0 + timedelta(minutes=2)}
    # beta sending again with nobody in between: nothing to write.
    assert directory.update_for(beta, T0 + timedelta(minutes=3)) is None

    [routed] = ReplyRouter(SHARED, RULES, directory).route(
        reply("Merci", account="octo-shared", number=NUMBER), None
    )
    assert routed.tenant == "beta"


def test_a_reply_on_a_shared_account_goes_to_the_tenant_that_sent_through_it_last() -> None:
    topic = shared_topic()
    # gamma's record is the newest, but it never sent to the number through octo-shared.
    topic.write("beta", NUMBER, "06 00 00 00 01", T0, {"octo-shared": T0 + timedelta(minutes=5)})
    [routed] = shared_router(topic).route(
        reply("Merci", account="octo-shared", number=NUMBER), None
    )
    assert (routed.tenant, routed.inbound.from_number, routed.opt_out_change) == (
        "beta",
        "06 00 00 00 01",
        None,
    )


@pytest.mark.parametrize("kind", ["opt_out", "inbound"])
def test_a_stop_on_a_shared_account_opts_out_every_tenant_that_sent_there(
    kind: ProviderEventKind,
) -> None:
    topic = shared_topic()
    topic.write("acme", NUMBER, "0033600000001", T0, {"octo-shared": T0 + timedelta(minutes=5)})
    event = reply("STOP", account="octo-shared", number=NUMBER, to="36000", kind=kind)
    routed = shared_router(topic).route(event, None)

    # acme sent there last; gamma (only through otpiq-main) and delta (never) are not concerned.
    assert [(r.tenant, r.number) for r in routed] == [("acme", NUMBER), ("beta", NUMBER)]
    for each in routed:
        change = each.opt_out_change
        assert change is not None
        assert (change.tenant, change.number, change.opted_out) == (each.tenant, NUMBER, True)
        assert change.source == ("provider" if kind == "opt_out" else "keyword")
        # Each tenant's Optimove hears of the STOP, with the number as it wrote it.
        assert (each.inbound.tenant, each.inbound.text, each.inbound.opt_out) == (
            each.tenant,
            "STOP",
            True,
        )
        assert each.last_inbound.tenant == each.tenant
    assert [r.inbound.from_number for r in routed] == ["0033600000001", "06 00 00 00 01"]
    # The first keeps the id a reply always had.
    assert routed[0].inbound.event_id == ids.event_id("inbound", event.event_id)
    assert len({r.inbound.event_id for r in routed}) == 2

    # START opts the same tenants back in.
    start = reply("start", account="octo-shared", number=NUMBER)
    assert [
        (r.tenant, r.opt_out_change.opted_out if r.opt_out_change else None)
        for r in shared_router(topic).route(start, None)
    ] == [("acme", False), ("beta", False)]


def test_a_stop_to_a_known_message_also_opts_out_the_others_that_sent_there() -> None:
    event = reply("STOP", account="octo-shared", number=NUMBER, kind="opt_out")
    routed = shared_router(shared_topic()).route(event, dispatch("beta", sender_id="BETA-PROMO"))
    assert [(r.tenant, r.message_id, r.inbound.to) for r in routed] == [
        ("beta", "m-1", "BETA-PROMO"),
        ("acme", None, "ACME"),
    ]
    # A plain reply to the same message concerns its tenant alone.
    plain = reply("Merci", account="octo-shared", number=NUMBER)
    assert [r.tenant for r in shared_router(shared_topic()).route(plain, dispatch("beta"))] == [
        "beta"
    ]


def test_last_inbound_is_when_we_received_the_message_not_the_providers_time() -> None:
    # Octopush's verbatim STOP example is dated 2020: the provider's clock is no measure.
    event = reply("stop", kind="opt_out", occurred_at=datetime(2020, 11, 4, 10, 11, 45, tzinfo=UTC))
    [routed] = router().route(event, None)
    assert routed.last_inbound == LastInbound(
        tenant="acme", number="+447700900123", at=T0 + timedelta(seconds=5)
    )
    assert routed.inbound.sent_at == datetime(2020, 11, 4, 10, 11, 45, tzinfo=UTC)
