"""Operator commands: the handshake, the tenants check, and dead letters listed and re-driven.

The commands run as plain functions where the test needs their output in detail, and as
``python -m tools.cli ...`` processes where the exit code and the wiring are the point.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services import SERVICES
from services.ingress.app import build as build_ingress
from services.reporter.app import build as build_reporter
from shared.config import Settings
from shared.contract.events import DeadLetter, InboundMessage, MessageContext, StatusEvent
from shared.contract.signing import SIGNATURE_HEADER, verify
from shared.contract.topics import DEAD_LETTERS, INBOUND, RECIPIENTS, STATUSES, Topic
from shared.kafka.broker import EmbeddedBroker, free_port
from shared.kafka.clients import OutRecord, bootstrap
from shared.secrets import RotatingSecret
from simulators.optimove import FailureMode, OptimoveSimulator
from tests.support import (
    AGGREGATOR_API_KEY,
    TENANT,
    TENANT_API_TOKEN,
    TENANT_SECRET,
    make_settings,
    read_topic,
    running,
    wait_for,
)
from tests.support.ops import config_data, publisher, smsbridge, to_toml, write_config
from tests.support.pipeline import simulated_optimove
from tools.dead_letters import dlq_list_command, dlq_redrive_command, mask_key, parse_since
from tools.handshake import (
    EndpointUnreachable,
    campaign_send_url,
    check_campaign_endpoint,
    handshake_command,
)

pytestmark = pytest.mark.integration

# -- handshake -----------------------------------------------------------------------------------


@pytest.fixture
async def optimove() -> AsyncIterator[OptimoveSimulator]:
    simulator = simulated_optimove()
    async with running(simulator):
        yield simulator


def handshake_settings(optimove: OptimoveSimulator, ingress_port: int) -> Settings:
    listen = f"127.0.0.1:{ingress_port}"
    return make_settings(
        optimove_url=optimove.url,
        overrides={
            "ingress": {"listen": listen, "public_url": f"http://{listen}/"},
            # A field name switched by configuration (decisions.md §8).
            "optimove": {"handshake_api_key_field": "aggregatorApiKey"},
        },
    )


async def test_handshake_registers_the_campaign_endpoint_signed(
    kafka: EmbeddedBroker, optimove: OptimoveSimulator
) -> None:
    settings = handshake_settings(optimove, free_port())
    out, err = io.StringIO(), io.StringIO()

    # The same tenant with a key the ingress there does not know.
    stranger = settings.model_copy(deep=True)
    stranger.tenants[TENANT].aggregator_api_key = RotatingSecret("not-the-key")

    async with running(build_ingress(settings)), aiohttp.ClientSession() as session:
        code = await handshake_command(settings, TENANT, out, err)
        with pytest.raises(EndpointUnreachable, match="401: ingress there does not know"):
            await check_campaign_endpoint(session, stranger, TENANT)
        # The operations endpoints are not on the public URL the handshake checks.
        async with session.get(f"{settings.ingress.public_url.rstrip('/')}/readyz") as ready:
            assert ready.status == 404

    assert code == 0, err.getvalue()
    (request,) = optimove.received(endpoint="handshake", tenant=TENANT)
    assert request["status"] == 200  # the simulator checked the API token and the signature
    raw = request["body"].encode("utf-8")
    assert verify(raw, request["headers"][SIGNATURE_HEADER], TENANT_SECRET) is None
    url = f"http://{settings.ingress.listen}/optimove/{TENANT}/campaigns"
    assert campaign_send_url(settings, TENANT) == url
    assert orjson.loads(raw) == {
        "campaignSendUrl": url,
        "aggregatorApiKey": AGGREGATOR_API_KEY,
        "senderId": "ACME",
    }
    assert "Optimove answered 200" in out.getvalue()
    assert '{"success":true}' in out.getvalue()
    assert AGGREGATOR_API_KEY not in out.getvalue() + err.getvalue()


async def test_handshake_refuses_while_the_campaign_endpoint_is_unreachable(
    optimove: OptimoveSimulator, tmp_path: Path
) -> None:
    closed = free_port()  # nothing listens there
    config = tmp_path / "smsbridge.toml"
    config.write_text(
        f"""
allow_plain_http = true

[ingress]
public_url = "http://127.0.0.1:{closed}"

[tenants.{TENANT}]
optimove_base_url = "{optimove.base_url(TENANT)}"
api_token = "{TENANT_API_TOKEN}"
secret_key = "{TENANT_SECRET}"
aggregator_api_key = "{AGGREGATOR_API_KEY}"
routes = [{{ provider = "otpiq-main" }}]

[providers.otpiq-main]
kind = "otpiq"
base_url = "http://127.0.0.1:9/otpiq/api"
api_key = "sk_test"
callback_token = "cb"
""",
        encoding="utf-8",
    )

    code, _, err = await smsbridge("--config", str(config), "handshake", "--tenant", TENANT)
    unknown, _, unknown_err = await smsbridge(
        "--config", str(config), "handshake", "--tenant", "ghost"
    )

    assert code == 1
    assert f"refusing the handshake for {TENANT}" in err
    assert f"127.0.0.1:{closed} is not reachable" in err
    assert optimove.received() == []  # Optimove was never asked
    assert (unknown, "unknown tenant 'ghost'") == (2, unknown_err.strip().split(" (")[0])


async def test_handshake_refuses_to_register_plain_http_unless_allowed(
    kafka: EmbeddedBroker, optimove: OptimoveSimulator, tmp_path: Path
) -> None:
    settings = handshake_settings(optimove, free_port())
    assert settings.allow_plain_http  # the test configuration's loopback URLs are http://
    settings.allow_plain_http = False  # as if the check at load time had been passed by
    out, err = io.StringIO(), io.StringIO()

    async with running(build_ingress(settings)):
        code = await handshake_command(settings, TENANT, out, err)

    assert code == 1
    assert err.getvalue().strip() == (
        f"refusing the handshake for {TENANT}: ingress.public_url, "
        f"tenants.{TENANT}.optimove_base_url must be https:// (allow_plain_http = true permits "
        "http://, for development and tests only)"
    )
    assert optimove.received() == []  # Optimove was never asked

    # Through the command line the configuration itself is refused, naming the key.
    config = tmp_path / "smsbridge.toml"
    data = config_data(optimove_url="https://optimove.example")
    data["ingress"]["public_url"] = "http://sms.example.com"
    data["callbacks"]["public_url"] = "https://callbacks.example.com"
    del data["allow_plain_http"]
    config.write_text(to_toml(data), encoding="utf-8")
    code, _, cli_err = await smsbridge("--config", str(config), "handshake", "--tenant", TENANT)
    assert code == 2
    assert cli_err.strip() == (
        f"invalid configuration in {config}: ingress.public_url: must be https:// "
        "(allow_plain_http = true permits http://, for development and tests only)"
    )


# -- a Kafka that cannot be reached, a bad log level ----------------------------------------------


@pytest.mark.parametrize(
    "argv", [["run", service] for service in SERVICES] + [["topics", "ensure"]], ids=" ".join
)
async def test_a_kafka_that_cannot_be_reached_is_one_clear_line(
    tmp_path: Path, argv: list[str]
) -> None:
    closed = free_port()  # nothing listens there
    kafka = {"bootstrap_servers": f"127.0.0.1:{closed}", "request_timeout_ms": 2000}
    config = tmp_path / "smsbridge.toml"
    write_config(config, config_data(overrides={"kafka": kafka}))

    code, _, err = await smsbridge("--config", str(config), *argv)

    assert code == 1, err
    assert "Traceback" not in err and "Unclosed" not in err, err
    # `run` logs as JSON (aiokafka's own line about the refused connection among them);
    # besides the log, one line.
    plain = [line for line in err.splitlines() if not line.startswith("{")]
    assert plain == [
        f"cannot reach Kafka at 127.0.0.1:{closed}: check [kafka] bootstrap_servers and that "
        "the broker is up"
    ]


async def test_an_unknown_log_level_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "smsbridge.toml"
    config.write_text(to_toml({**config_data(), "log_level": "LOUD"}), encoding="utf-8")

    code, _, err = await smsbridge("--config", str(config), "run", "sender")

    assert code == 2
    assert err.strip() == (
        f"invalid configuration in {config}: log_level: unknown log level 'LOUD' "
        "(one of DEBUG, INFO, WARNING, ERROR, CRITICAL)"
    )


# -- tenants check ---------------------------------------------------------------------------------

INLINE_SECRET = "inline-secret-never-printed"
ENV_SECRET = "env-secret-never-printed"


def tenants_config(path: Path) -> Path:
    path.write_text(
        f"""
[tenants.acme]
optimove_base_url = "https://optimove.example/acme"
api_token = "env:CHECK_ACME_TOKEN"
secret_key = "{INLINE_SECRET}"
aggregator_api_key = "file:{path.parent / "acme-key"}"
default_sender_id = "ACME"
routes = [{{ provider = "otpiq-main" }}]

[tenants.beta]
optimove_base_url = "https://optimove.example/beta"
api_token = "env:CHECK_BETA_TOKEN_MISSING"
secret_key = "{INLINE_SECRET}"
aggregator_api_key = "file:{path.parent / "missing-key"}"
routes = [{{ provider = "nowhere" }}, {{ provider = "octo" }}]

[providers.otpiq-main]
kind = "otpiq"
base_url = "https://otpiq.example/api"
api_key = "{INLINE_SECRET}"
callback_token = "env:CHECK_ACME_TOKEN"

[providers.octo]
kind = "octopush"
base_url = "https://octopush.example/api"
api_key = "env:CHECK_OCTO_KEY_MISSING"
callback_token = "{INLINE_SECRET}"
""",
        encoding="utf-8",
    )
    (path.parent / "acme-key").write_text("file-secret-never-printed\n", encoding="utf-8")
    return path


async def test_tenants_check_names_each_missing_secret_and_prints_none(tmp_path: Path) -> None:
    config = tenants_config(tmp_path / "smsbridge.toml")

    code, out, err = await smsbridge(
        "--config", str(config), "tenants", "check", env={"CHECK_ACME_TOKEN": ENV_SECRET}
    )

    assert code == 1, err
    lines = out.splitlines()
    assert lines[0].startswith("tenant acme: ok (api_token, secret_key, aggregator_api_key")
    assert "routes: otpiq-main" in lines[0]
    beta = out[out.index("tenant beta") : out.index("\nprovider ")]
    assert "tenant beta: 4 problems" in beta
    assert "api_token: environment variable CHECK_BETA_TOKEN_MISSING is not set" in beta
    assert "aggregator_api_key: cannot read secret file" in beta
    assert "routes.0.provider: unknown provider 'nowhere' (known: octo, otpiq-main)" in beta
    assert "routes.1.provider: provider 'octo' has problems (see below)" in beta
    assert "provider octo: 1 problem" in out
    assert "api_key: environment variable CHECK_OCTO_KEY_MISSING is not set" in out
    assert "provider otpiq-main: ok" in out
    assert out.rstrip().endswith("5 problems found")
    for secret in (INLINE_SECRET, ENV_SECRET, "file-secret-never-printed"):
        assert secret not in out + err


async def test_tenants_check_passes_a_complete_configuration(tmp_path: Path) -> None:
    config = tenants_config(tmp_path / "smsbridge.toml")
    text = config.read_text(encoding="utf-8")
    config.write_text(text[: text.index("[tenants.beta]")] + text[text.index("[providers.") :])

    code, out, _ = await smsbridge(
        "--config",
        str(config),
        "tenants",
        "check",
        env={"CHECK_ACME_TOKEN": ENV_SECRET, "CHECK_OCTO_KEY_MISSING": "x" * 12},
    )

    assert code == 0, out
    assert "tenant acme: ok" in out
    assert out.rstrip().endswith("1 tenant ready")
    assert ENV_SECRET not in out


# -- dead letters ----------------------------------------------------------------------------------

OLD = datetime(2026, 1, 1, tzinfo=UTC)
NEW = datetime(2026, 3, 1, tzinfo=UTC)


def status_event(message_id: str) -> StatusEvent:
    return StatusEvent(
        event_id=f"e-{message_id}",
        context=MessageContext(
            tenant=TENANT,
            message_id=message_id,
            batch_id="b",
            mobile_number="+447911123456",
            metadata_json="{}",
        ),
        status="delivered",
        sub_status="Delivered",
    )


def letter(
    source: Topic, key: str | None, payload: str, at: datetime, status_code: int | None = None
) -> DeadLetter:
    return DeadLetter(
        source_topic=source.name,
        stage="reporter" if source in (STATUSES, INBOUND) else "sender",
        reason=f"gave up after 9 attempts in 86400s; last: HTTP {status_code or 503}",
        key=key,
        payload=payload,
        attempts=9,
        status_code=status_code,
        redrive_topic=source.name,
        at=at,
    )


async def publish_letters(settings: Settings, letters: list[DeadLetter]) -> None:
    async with publisher(settings) as out:
        await out.publish(OutRecord(DEAD_LETTERS, d.key or "none", d) for d in letters)


async def read_raw(settings: Settings, topic: Topic) -> list[tuple[bytes | None, bytes | None]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap(settings.kafka))
    await consumer.start()
    try:
        partitions = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found: list[tuple[bytes | None, bytes | None]] = []
        quiet = 0
        while quiet < 5:
            batches = await consumer.getmany(timeout_ms=100)
            quiet = 0 if batches else quiet + 1
            found += [(r.key, r.value) for records in batches.values() for r in records]
        return found
    finally:
        await consumer.stop()


def test_keys_holding_a_number_are_masked() -> None:
    assert mask_key("acme:+447911123456") == "acme:+4479******56"
    assert mask_key("octo:ticket-9:33612345678") == "octo:ticket-9:3361*****78"
    assert mask_key("m-1a2b3c") == "m-1a2b3c"
    assert mask_key("acme") == "acme"
    assert mask_key(None) == "-"
    assert parse_since("2026-02-01") == datetime(2026, 2, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_since("yesterday")


async def test_dead_letters_are_listed_and_re_driven_once(kafka: EmbeddedBroker) -> None:
    settings = make_settings()
    statuses = [status_event(f"m-{i}") for i in range(3)]
    reply = InboundMessage(
        event_id="e-in",
        tenant=TENANT,
        to="ACME",
        from_number="447911123456",
        text="STOP",
        sent_at=OLD,
    )
    await publish_letters(
        settings,
        [
            letter(STATUSES, "m-0", statuses[0].model_dump_json(), OLD, 503),
            letter(STATUSES, "m-1", statuses[1].model_dump_json(), OLD, 503),
            letter(STATUSES, "m-2", statuses[2].model_dump_json(), NEW, 400),
            letter(RECIPIENTS, f"{TENANT}:+447911123456", '{"not": "checked"}', NEW),
            letter(INBOUND, TENANT, reply.model_dump_json(), NEW, 401),
        ],
    )

    listed = io.StringIO()
    assert (
        await dlq_list_command(settings, source_topic=None, since=None, limit=50, out=listed) == 0
    )
    table = listed.getvalue().splitlines()
    assert table[0].split() == [
        "ID", "TIME", "STAGE", "SOURCE", "TOPIC", "REASON", "ATTEMPTS", "STATUS", "KEY", "REDRIVEN"
    ]  # fmt: skip
    assert len(table) == 6
    assert "2026-01-01T00:00:00Z" in table[1]
    recipients_row = next(line for line in table if RECIPIENTS.name in line)
    assert "acme:+4479******56" in recipients_row
    assert "447911123456" not in listed.getvalue()

    only_new = io.StringIO()
    await dlq_list_command(
        settings,
        source_topic=STATUSES.name,
        since=parse_since("2026-02-01"),
        limit=50,
        out=only_new,
    )
    assert [line.split()[-2] for line in only_new.getvalue().splitlines()[1:]] == ["m-2"]
    newest = io.StringIO()
    await dlq_list_command(settings, source_topic=None, since=None, limit=2, out=newest)
    assert "(the newest 2 of 5; see --limit)" in newest.getvalue()

    # A dry run counts and publishes nothing.
    dry = io.StringIO()
    await dlq_redrive_command(
        settings, source_topic=STATUSES.name, since=None, dry_run=True, out=dry, err=io.StringIO()
    )
    assert dry.getvalue().startswith("would re-drive 3; already re-driven 0")
    assert await read_raw(settings, STATUSES) == []

    # --since first, then the rest; a third run finds nothing left to send.
    progress = io.StringIO()
    for since, expected in (
        ("2026-02-01", "re-drove 1;"),
        (None, "re-drove 2; already re-driven 1"),
    ):
        done = io.StringIO()
        await dlq_redrive_command(
            settings,
            source_topic=STATUSES.name,
            since=parse_since(since) if since else None,
            dry_run=False,
            out=done,
            err=progress,
        )
        assert done.getvalue().startswith(expected)
    assert f"redrive {STATUSES.name} [" in progress.getvalue()
    assert "2/2" in progress.getvalue()
    code, out, err = await smsbridge("dlq", "redrive", "--topic", STATUSES.base)
    assert code == 0, err
    assert out.startswith("re-drove 0; already re-driven 3")

    redriven = await read_raw(settings, STATUSES)
    assert sorted(redriven) == sorted(
        (s.context.message_id.encode(), s.model_dump_json().encode()) for s in statuses
    )
    assert await read_raw(settings, INBOUND) == []  # only the topic asked for

    code, out, err = await smsbridge("dlq", "list", "--topic", STATUSES.base)
    assert code == 0, err
    rows = out.splitlines()[1:]
    assert len(rows) == 3
    assert all(row.split()[-1] == "yes" for row in rows)


async def redrive_statuses(settings: Settings) -> str:
    """``smsbridge dlq redrive --topic sms.statuses``, in this process; what it printed."""
    out = io.StringIO()
    await dlq_redrive_command(
        settings, source_topic=STATUSES.name, since=None, dry_run=False, out=out, err=io.StringIO()
    )
    return out.getvalue()


async def test_a_re_driven_report_reaches_optimove_once_after_its_refusal_was_fixed(
    kafka: EmbeddedBroker,
) -> None:
    """Optimove refuses (a tenant misconfigured there); the reports are dead-lettered; once it
    is fixed, a re-drive gets each report to Optimove, once, through the running reporter."""
    statuses = [status_event(f"m-fix-{i}") for i in range(3)]
    ids = {s.context.message_id for s in statuses}
    optimove = simulated_optimove()
    async with running(optimove):
        settings = make_settings(optimove_url=optimove.url)
        optimove.set_mode(FailureMode(status=400))
        async with publisher(settings) as out:
            await out.publish([OutRecord(STATUSES, s.context.message_id, s) for s in statuses])
        async with running(build_reporter(settings)):
            letters = await read_topic(settings, DEAD_LETTERS, DeadLetter, expect=3)
            assert {letter.key for _, letter in letters} == ids
            assert all(letter.status_code == 400 for _, letter in letters)
            optimove.set_mode(FailureMode())  # fixed on Optimove's side

            assert (await redrive_statuses(settings)).startswith("re-drove 3;")

            def accepted() -> list[str]:
                return [
                    orjson.loads(r["body"])["messageId"]
                    for r in optimove.received(endpoint="delivery-report", tenant=TENANT)
                    if r["status"] == 200
                ]

            await wait_for(lambda: len(accepted()) >= 3, 30, "the re-driven reports")
            assert (await redrive_statuses(settings)).startswith("re-drove 0; already re-driven 3")
            await asyncio.sleep(1.0)  # a report sent twice would arrive now
        assert sorted(accepted()) == sorted(ids)
        assert len(await read_topic(settings, DEAD_LETTERS, DeadLetter, settle_s=0.3)) == 3
