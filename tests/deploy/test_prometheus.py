"""The Prometheus configuration and alert rules, checked and unit-tested with promtool.

promtool comes with the Debian package ``prometheus``; ``make test`` installs it where apt-get can
(see the Makefile). Without it these tests are skipped, saying so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from shared.kafka.clients import group_name
from shared.metrics import CONSUMER_LAG, CONSUMER_LAG_SECONDS
from tests.deploy.promql import (
    ALERTS,
    DASHBOARDS,
    DEPLOY,
    dashboard_expressions,
    dashboard_panels,
    metric_names,
    rule_expressions,
)
from tests.support import make_settings

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus')"
)
PROMETHEUS = DEPLOY / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS
    )


@needs_promtool
def test_scrape_config_is_valid_and_loads_the_rules() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


@needs_promtool
def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_required_alerts_exist_and_each_has_a_unit_test() -> None:
    alerts = {name: expr for name, expr in rule_expressions()}
    wanted = {
        # Burrow's stall: committed offsets that do not move while lag > 0 (broker side).
        "SmsbridgeConsumerStalled": {
            "kafka_consumergroup_current_offset",
            "kafka_consumergroup_lag",
            "kafka_consumergroup_members",
        },
        # A group with no members while its topics have lag.
        "SmsbridgeConsumerGroupEmpty": {"kafka_consumergroup_lag", "kafka_consumergroup_members"},
        # Broker-side lag, there whether or not the consumers still export theirs.
        "SmsbridgeConsumerGroupBehind": {
            "kafka_consumergroup_lag_sum",
            "kafka_consumergroup_current_offset_sum",
        },
        "SmsbridgeConsumerLagHigh": {"smsbridge_consumer_lag_seconds"},
        "SmsbridgeTargetDown": {"up"},
        "SmsbridgeSignatureFailures": {"smsbridge_signature_failures_total"},
        "SmsbridgeOptimoveUnauthorized": {"smsbridge_optimove_unauthorized_total"},
        "SmsbridgeReportSuccessRateLow": {"smsbridge_reports_total"},
        "SmsbridgeDeadLettersGrowing": {"smsbridge_dead_letters_total"},
        "SmsbridgeProviderCircuitOpen": {"smsbridge_provider_circuit_open"},
    }
    for name, metrics in wanted.items():
        assert name in alerts, f"missing alert {name}"
        assert metrics <= metric_names(alerts[name]), name
    # The stall no longer asks for growing lag: a consumer stuck after its input stopped counts.
    assert "deriv" not in alerts["SmsbridgeConsumerStalled"]
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(wanted) <= tested, f"alerts without a firing unit test: {set(wanted) - tested}"


def test_the_consumer_alerts_select_every_consumer_group_prefix_or_not() -> None:
    """The rules' ``consumergroup=~`` selectors (anchored, as PromQL anchors them) match the
    groups our consumer services join, with or without ``[kafka] group_prefix``."""
    groups = {
        group_name(make_settings(overrides={"kafka": {"group_prefix": prefix}}).kafka, group_id)
        for prefix in ("", "prod.", "eu-")
        for group_id in ("smsbridge-sender", "smsbridge-normalizer", "smsbridge-reporter")
    }
    selectors = {
        pattern
        for _, expr in [*rule_expressions(), *dashboard_expressions()]
        for pattern in re.findall(r'consumergroup=~"([^"]+)"', expr)
    }
    assert selectors
    for pattern in selectors:
        for group in groups:
            assert re.fullmatch(pattern, group), (pattern, group)
        assert not re.fullmatch(pattern, "billing-consumers")


def test_our_lag_gauges_join_the_exporters_on_its_labels() -> None:
    """Our lag gauges carry kafka-exporter's labels (the group's name as ``consumergroup``),
    beside the ``consumer`` that dashboards already use; every ``on (...)`` of a query that
    joins the two names only labels both sides carry."""
    ours = set(CONSUMER_LAG._labelnames) & set(CONSUMER_LAG_SECONDS._labelnames)
    assert {"consumer", "consumergroup", "topic", "partition"} <= ours
    theirs = {
        "kafka_consumergroup_lag": {"consumergroup", "topic", "partition"},
        "kafka_consumergroup_current_offset": {"consumergroup", "topic", "partition"},
        "kafka_consumergroup_lag_sum": {"consumergroup", "topic"},
        "kafka_consumergroup_current_offset_sum": {"consumergroup", "topic"},
        "kafka_consumergroup_members": {"consumergroup"},
    }
    joins = 0
    for where, expr in [*rule_expressions(), *dashboard_expressions()]:
        names = metric_names(expr)
        ours_queried = {name for name in names if name.startswith("smsbridge_consumer_lag_")}
        if not ours_queried or not names & set(theirs):
            continue
        for on in re.findall(r"\bon\s*\(([^)]*)\)", expr):
            labels = {label.strip() for label in on.split(",") if label.strip()}
            assert labels <= ours, where
            assert all(labels <= theirs[name] for name in names & set(theirs)), where
            joins += 1
    assert joins, "no rule or panel joins our lag with kafka-exporter's"


def test_every_alert_has_a_severity_and_a_summary() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


def test_the_dashboard_covers_the_pipeline() -> None:
    queried: dict[str, set[str]] = {}
    for _, panel in dashboard_panels():
        names: set[str] = set()
        for target in panel["targets"]:
            names |= metric_names(target["expr"])
        queried[panel["title"]] = names
    everything = set().union(*queried.values())
    for metric in (
        "smsbridge_records_processed_total",  # throughput per stage
        "smsbridge_consumer_lag_messages",  # lag in messages
        "smsbridge_consumer_lag_seconds",  # lag in seconds
        "smsbridge_provider_send_total",  # provider send rate and errors
        "smsbridge_provider_send_duration_seconds_bucket",  # provider latency
        "smsbridge_status_changes_total",  # delivery status mix
        "smsbridge_reports_total",  # reports success rate
        "smsbridge_signature_failures_total",
        "smsbridge_dead_letters_total",
    ):
        assert metric in everything, f"no dashboard panel queries {metric}"
    # Every query picks its data source through the dashboard's variable, never a fixed uid.
    variables = [
        variable
        for path in sorted(DASHBOARDS.glob("*.json"))
        for variable in json.loads(path.read_text())["templating"]["list"]
        if variable["type"] == "datasource"
    ]
    assert [(v["name"], v["query"]) for v in variables] == [("datasource", "prometheus")]
    for _, panel in dashboard_panels():
        for source in (panel["datasource"], *(t["datasource"] for t in panel["targets"])):
            assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


# Grafana units and what a query must be to be shown in them.
RATE_UNITS = {"reqps", "ops", "rps", "wps"}
SECONDS_UNITS = {"s", "ms"}


def test_every_panel_shows_its_queries_in_their_unit() -> None:
    """A rate panel (req/s, ops/s) holds rates only; a quantile of a duration histogram is
    shown in seconds, on a panel of its own."""
    for _, panel in dashboard_panels():
        unit = panel["fieldConfig"]["defaults"]["unit"]
        for target in panel["targets"]:
            expr = target["expr"]
            durations = any(
                name.endswith("_seconds_bucket") for name in metric_names(expr)
            ) and expr.startswith("histogram_quantile(")
            if durations:
                assert unit in SECONDS_UNITS, f"{panel['title']}: {expr} shown in {unit}"
            if unit in RATE_UNITS:
                assert "histogram_quantile" not in expr, f"{panel['title']}: {expr}"
                assert re.search(r"\b(rate|irate)\(", expr), f"{panel['title']}: {expr}"
