"""The Prometheus configuration and alert rules, checked and unit-tested with promtool.

promtool comes with the Debian package ``prometheus``; ``make test`` installs it where apt-get can
(see the Makefile). Without it these tests are skipped, saying so.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.deploy.promql import ALERTS, DEPLOY, dashboard_panels, metric_names, rule_expressions

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
        "SmsbridgeConsumerStalled": {
            "smsbridge_consumer_lag_messages",
            "smsbridge_records_processed_total",
        },
        "SmsbridgeConsumerLagHigh": {"smsbridge_consumer_lag_seconds"},
        "SmsbridgeSignatureFailures": {"smsbridge_signature_failures_total"},
        "SmsbridgeOptimoveUnauthorized": {"smsbridge_optimove_unauthorized_total"},
        "SmsbridgeReportSuccessRateLow": {"smsbridge_reports_total"},
        "SmsbridgeDeadLettersGrowing": {"smsbridge_dead_letters_total"},
        "SmsbridgeProviderCircuitOpen": {"smsbridge_provider_circuit_open"},
    }
    for name, metrics in wanted.items():
        assert name in alerts, f"missing alert {name}"
        assert metrics <= metric_names(alerts[name]), name
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(wanted) <= tested, f"alerts without a firing unit test: {set(wanted) - tested}"


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
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    [provisioned] = datasources["datasources"]
    for _, panel in dashboard_panels():
        assert panel["datasource"]["uid"] == provisioned["uid"], panel["title"]
