"""The campaigns service's admin API on a real broker: bearer token or 401, controls on
sms.campaign-control with the right key before the 202, counts and controls in force served."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client import REGISTRY

from services.campaigns.app import build as build_campaigns
from shared.config import Settings
from shared.contract.campaign_controls import AUTO_REPLIES
from shared.contract.events import CampaignControl, MessageContext, StatusEvent
from shared.contract.topics import CAMPAIGN_CONTROL, STATUSES
from shared.kafka.broker import EmbeddedBroker
from shared.kafka.clients import OutRecord
from tests.support import TENANT, make_settings, read_topic, running, wait_for
from tests.support.campaigns_api import ADMIN_TOKEN, admin_call, campaign_status, campaigns_section
from tests.support.ops import REPO, config_data, publisher, smsbridge, write_config

pytestmark = pytest.mark.integration


def campaigns_settings(token: str | None = ADMIN_TOKEN) -> Settings:
    return make_settings(overrides={"campaigns": campaigns_section(token)})


call = admin_call


def unauthorized(reason: str) -> float:
    value = REGISTRY.get_sample_value("smsbridge_admin_unauthorized_total", {"reason": reason})
    return value or 0.0


async def test_every_admin_call_needs_the_bearer_token(kafka: EmbeddedBroker) -> None:
    settings = campaigns_settings()
    async with running(build_campaigns(settings)) as service:
        await wait_for(service.ready, what="the campaigns service ready")
        before = unauthorized("missing"), unauthorized("mismatch")
        for method, path in (
            ("GET", "/admin/campaigns"),
            ("GET", f"/admin/campaigns/{TENANT}/spring"),
            ("POST", f"/admin/campaigns/{TENANT}/pause"),
            ("POST", f"/admin/campaigns/{TENANT}/spring/cancel"),
            ("GET", "/admin/no-such-thing"),
        ):
            status, answer, headers = await call(settings, method, path, token=None)
            assert status == 401, (method, path, answer)
            assert headers["WWW-Authenticate"].startswith("Bearer")
            status, answer, _ = await call(settings, method, path, token="wrong-token")
            assert status == 401 and answer["error"] == "wrong admin token", (method, path)
        status, _, _ = await call(
            settings, "GET", "/admin/campaigns", authorization=f"Basic {ADMIN_TOKEN}"
        )
        assert status == 401
        assert unauthorized("missing") - before[0] == 6
        assert unauthorized("mismatch") - before[1] == 5

        status, answer, _ = await call(settings, "GET", "/admin/campaigns")
        assert status == 200 and answer["campaigns"] == []
        # The ops endpoints stay open, for probes and Prometheus.
        async with aiohttp.ClientSession() as session:
            for path in ("/healthz", "/readyz", "/metrics"):
                url = f"http://{settings.campaigns.listen}{path}"
                async with session.get(url) as response:
                    assert response.status == 200, path
        # Nothing was published by the refused calls.
        assert await read_topic(settings, CAMPAIGN_CONTROL, CampaignControl, settle_s=0.3) == []


async def test_without_a_configured_token_every_admin_call_is_401(kafka: EmbeddedBroker) -> None:
    settings = campaigns_settings(token=None)
    async with running(build_campaigns(settings)):
        before = unauthorized("not_configured")
        for token in (None, "", "anything", ADMIN_TOKEN):
            status, answer, _ = await call(settings, "GET", "/admin/campaigns", token=token)
            assert status == 401, token
            assert "admin_token" in answer["error"]
        status, _, _ = await call(settings, "POST", f"/admin/campaigns/{TENANT}/pause")
        assert status == 401
        assert unauthorized("not_configured") - before == 5


def status_event(campaign_id: str, status: str = "sent") -> StatusEvent:
    return StatusEvent(
        event_id=f"e-{campaign_id}-{status}",
        context=MessageContext(
            tenant=TENANT,
            message_id=f"m-{campaign_id}",
            batch_id="b",
            campaign_id=campaign_id,
            mobile_number="07911 123456",
            metadata_json="{}",
        ),
        status=status,  # type: ignore[arg-type]
        sub_status=status.capitalize(),
    )


async def test_controls_reach_the_control_topic_with_their_key_and_show_in_the_status(
    kafka: EmbeddedBroker,
) -> None:
    settings = campaigns_settings()
    async with running(build_campaigns(settings)):
        status, answer, _ = await call(
            settings,
            "POST",
            f"/admin/campaigns/{TENANT}/spring/pause",
            body=b'{"reason": "wrong text", "requested_by": "ops@example.com"}',
        )
        assert status == 202, answer
        assert (answer["key"], answer["scope"], answer["campaign"]) == (
            f"{TENANT}|spring",
            "campaign",
            "spring",
        )
        status, answer, _ = await call(settings, "POST", f"/admin/campaigns/{TENANT}/cancel")
        assert status == 202 and answer["key"] == TENANT
        auto_replies = f"/admin/campaigns/{TENANT}/%28auto%20replies%29/resume"
        status, answer, _ = await call(settings, "POST", auto_replies)
        assert status == 202 and answer["key"] == f"{TENANT}|{AUTO_REPLIES}"

        # 202 means it is on Kafka already: read it back.
        found = await read_topic(settings, CAMPAIGN_CONTROL, CampaignControl, expect=3)
        assert [(key, c.campaign_id, c.action) for key, c in found] == [
            (f"{TENANT}|spring", "spring", "pause"),
            (TENANT, None, "cancel"),
            (f"{TENANT}|{AUTO_REPLIES}", "", "resume"),
        ]
        paused = found[0][1]
        assert (paused.reason, paused.requested_by) == ("wrong text", "ops@example.com")

        for method, path, body, expected in (
            ("POST", "/admin/campaigns/nobody/pause", None, 404),
            ("POST", "/admin/campaigns/nobody/spring/pause", None, 404),
            ("POST", f"/admin/campaigns/{TENANT}/spring/pause", b"{not json", 400),
            ("POST", f"/admin/campaigns/{TENANT}/spring/pause", b'{"reason": 7}', 400),
            ("POST", f"/admin/campaigns/{TENANT}/%28replies%29/pause", None, 400),
            ("POST", f"/admin/campaigns/{TENANT}/spring/explode", None, 404),
            ("GET", f"/admin/campaigns/{TENANT}/spring", None, 404),  # nothing counted yet
            ("DELETE", "/admin/campaigns", None, 405),
        ):
            status, answer, _ = await call(settings, method, path, body=body)
            assert status == expected, (method, path, answer)
            assert isinstance(answer["error"], str) and answer["error"]

        async with publisher(settings) as out:
            await out.publish(
                [
                    OutRecord(STATUSES, "m-spring", status_event("spring")),
                    OutRecord(STATUSES, "m-auto", status_event("", "delivered")),
                ]
            )

        async def counted() -> bool:
            return await campaign_status(settings, TENANT, "spring") is not None

        await wait_for(counted, what="the spring campaign counted")
        spring = await campaign_status(settings, TENANT, "spring")
        assert spring is not None
        assert spring["sent"] == 1 and spring["delivered"] == 0
        control = spring["control"]
        assert control["campaign"]["action"] == "pause"
        assert control["tenant"]["action"] == "cancel"
        assert control["effect"] == "cancel"  # cancel outranks pause, whatever its scope
        auto = await campaign_status(settings, TENANT, "%28auto%20replies%29")
        assert auto is not None and auto["delivered"] == 1
        assert auto["control"]["campaign"]["action"] == "resume"

        status, listed, _ = await call(settings, "GET", f"/admin/campaigns?tenant={TENANT}")
        assert [(c["tenant"], c["campaign"]) for c in listed["campaigns"]] == [
            (TENANT, AUTO_REPLIES),
            (TENANT, "spring"),
        ]
        published = REGISTRY.get_sample_value(
            "smsbridge_campaign_controls_published_total", {"action": "cancel", "scope": "tenant"}
        )
        assert published is not None and published >= 1


# -- the command line ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def campaigns_from_config_file(tmp_path: Path) -> AsyncIterator[tuple[Path, Settings]]:
    """A running campaigns service and the configuration file the command line reads."""
    config = tmp_path / "smsbridge.toml"
    settings = write_config(config, config_data(overrides={"campaigns": campaigns_section()}))
    async with running(build_campaigns(settings)) as service:
        await wait_for(service.ready, what="the campaigns service ready")
        yield config, settings


async def test_the_campaign_command_line_controls_campaigns_through_the_api(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    """``smsbridge campaign pause|resume|cancel|status`` as an operator types them."""
    async with campaigns_from_config_file(tmp_path) as (config, settings):
        base = ("--config", str(config), "campaign")
        code, out, err = await smsbridge(
            *base, "pause", "--tenant", TENANT, "--campaign", "spring", "--reason", "wrong text"
        )
        assert code == 0, err
        assert f"pause of campaign spring of {TENANT} stored on {CAMPAIGN_CONTROL.name}" in out
        code, out, err = await smsbridge(*base, "resume", "--tenant", TENANT, "--campaign", "")
        assert code == 0, err
        code, out, err = await smsbridge(*base, "cancel", "--tenant", TENANT)
        assert code == 0, err
        assert f"cancel of {TENANT} stored on" in out

        found = await read_topic(settings, CAMPAIGN_CONTROL, CampaignControl, expect=3)
        assert [(key, c.campaign_id, c.action) for key, c in found] == [
            (f"{TENANT}|spring", "spring", "pause"),
            (f"{TENANT}|{AUTO_REPLIES}", "", "resume"),
            (TENANT, None, "cancel"),
        ]
        assert found[0][1].reason == "wrong text"
        assert all(c.requested_by.startswith("cli") for _, c in found)

        # Refusals are an exit status and the API's reason, and publish nothing.
        code, out, err = await smsbridge(*base, "pause", "--tenant", TENANT, "--token", "wrong")
        assert code == 1 and "wrong admin token" in err and out == ""
        code, _, err = await smsbridge(*base, "pause", "--tenant", "nobody")
        assert code == 1 and "nobody" in err
        code, _, err = await smsbridge(*base, "explode", "--tenant", TENANT)
        assert code == 2 and "invalid choice" in err
        assert len(await read_topic(settings, CAMPAIGN_CONTROL, CampaignControl, settle_s=0.3)) == 3

        code, out, err = await smsbridge(*base, "status", "--json")
        assert code == 0, err
        assert orjson.loads(out) == []


async def test_status_follow_redraws_as_the_counts_move_and_ends_on_ctrl_c(
    kafka: EmbeddedBroker, tmp_path: Path
) -> None:
    async with campaigns_from_config_file(tmp_path) as (config, settings):
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "tools.cli", "--config", str(config), "campaign"),
            *("status", "--follow", "--interval", "0.2", "--tenant", TENANT),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # As at a terminal: a shell starting the suite in the background ignores SIGINT, and
            # a Python started with SIGINT ignored never turns Ctrl-C into KeyboardInterrupt.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert process.stdout is not None
        shown = ""

        async def shows(text: str) -> bool:
            nonlocal shown
            assert process.stdout is not None
            with contextlib.suppress(TimeoutError):
                shown += (await asyncio.wait_for(process.stdout.read(4096), 0.5)).decode()
            return text in shown

        try:
            await wait_for(lambda: shows("no campaign counted yet"), 30, "the first frame")
            async with publisher(settings) as out:
                await out.publish([OutRecord(STATUSES, "m-spring", status_event("spring"))])
            await wait_for(lambda: shows("spring"), 30, "a frame with the spring campaign")
            frames = shown.count("Ctrl-C to stop")

            async def redrawn() -> bool:
                await shows("")
                return shown.count("Ctrl-C to stop") >= frames + 2

            await wait_for(redrawn, 10, "two more frames")
        finally:
            process.send_signal(signal.SIGINT)
            try:
                _, err = await asyncio.wait_for(process.communicate(), 30)
            except TimeoutError:
                process.kill()
                _, err = await process.communicate()
                raise AssertionError(
                    f"no exit within 30 s of Ctrl-C; shown: {shown[-2000:]!r}; "
                    f"stderr: {err.decode()[-2000:]}"
                ) from None
        assert process.returncode == 0, err.decode()
        last = shown.rsplit("Ctrl-C to stop)", 1)[0].rsplit(settings.campaigns.listen, 2)[-2]
        assert "spring" in last  # the frame stays up to date, not only once


async def test_a_rotated_admin_token_accepts_both_values_until_the_old_one_expires(
    kafka: EmbeddedBroker,
) -> None:
    expired = "2000-01-01T00:00:00Z"
    section = campaigns_section(None) | {
        "admin_token": {
            "current": "token-2",
            "previous": [ADMIN_TOKEN, {"value": "token-0", "expires": expired}],
        }
    }
    settings = make_settings(overrides={"campaigns": section})
    async with running(build_campaigns(settings)) as service:
        await wait_for(service.ready, what="the campaigns service ready")
        answers = [
            (await call(settings, "GET", "/admin/campaigns", token=token))[0]
            for token in ("token-2", ADMIN_TOKEN, "token-0")
        ]
    assert answers == [200, 200, 401]  # current, previous, previous but expired
