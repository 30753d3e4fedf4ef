"""deploy/k8s/monitoring: kafka-exporter as compose runs it, a PodMonitor that scrapes every
service where it serves /metrics under the job names compose uses, and a PrometheusRule that is
deploy/prometheus/alerts.yml itself."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.deploy.prometheus_rule import PROMETHEUS_RULE, render
from tests.deploy.promql import ALERTS, DEPLOY, ROOT, rule_expressions

K8S = DEPLOY / "k8s"
MONITORING = K8S / "monitoring"
SERVICES = ("ingress", "callbacks", "sender", "normalizer", "reporter", "campaigns")


def documents(*paths: Any) -> list[dict[str, Any]]:
    return [
        document for path in paths for document in yaml.safe_load_all(path.read_text()) if document
    ]


def one(kind: str, name: str) -> dict[str, Any]:
    [found] = [
        document
        for document in documents(*sorted(K8S.glob("*.yaml")), *sorted(MONITORING.glob("*.yaml")))
        if document["kind"] == kind and document["metadata"]["name"] == name
    ]
    return found


def test_the_prometheus_rule_is_the_rule_file_itself() -> None:
    """One source: the PrometheusRule is generated from alerts.yml (promtool tests that one)."""
    assert PROMETHEUS_RULE.read_text() == render(), (
        "stale: run `.venv/bin/python -m tests.deploy.prometheus_rule`"
    )
    rule = one("PrometheusRule", "sms-bridge")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_the_monitoring_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    manifests = {path.name for path in MONITORING.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    kinds = {document["kind"] for document in documents(*sorted(MONITORING.glob("*.yaml")))}
    assert {"Deployment", "PodMonitor", "PrometheusRule"} <= kinds


def relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus's relabelling (``replace`` and ``keep``) of a target; None when dropped."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule["sourceLabels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if match is None:
                return None
        elif action == "replace":
            if match is not None:
                replacement = re.sub(r"\$(\d+)", r"\\\1", rule.get("replacement", "$1"))
                labels[rule["targetLabel"]] = match.expand(replacement)
        else:
            raise AssertionError(f"relabel action {action} not simulated")
    return labels


def scraped_jobs(pod: dict[str, Any], pod_monitor: dict[str, Any]) -> dict[str, int]:
    """job -> container port of every target the PodMonitor makes of ``pod``."""
    spec = pod_monitor["spec"]
    pod_labels = pod["metadata"]["labels"]
    if not spec["selector"]["matchLabels"].items() <= pod_labels.items():
        return {}
    ports = {
        port["name"]: port["containerPort"]
        for container in pod["spec"]["containers"]
        for port in container.get("ports", [])
    }
    meta = {
        "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", name): value
        for name, value in pod_labels.items()
    }
    jobs: dict[str, int] = {}
    for endpoint in spec["podMetricsEndpoints"]:
        if endpoint["port"] not in ports:
            continue
        assert endpoint["path"] == "/metrics"
        target = relabel(endpoint.get("relabelings", []), {"job": "default", **meta})
        if target is not None:
            jobs[target["job"]] = ports[endpoint["port"]]
    return jobs


def test_the_pod_monitor_scrapes_each_service_once_under_composes_job_name() -> None:
    """Each pod is scraped once, on the port its prometheus.io annotation names (the ops port of
    ingress and callbacks, never their public one), as job ``smsbridge-<service>``: the job
    compose's Prometheus gives it, which SmsbridgeTargetDown selects."""
    pod_monitor = one("PodMonitor", "sms-bridge")
    compose_jobs = {
        job["job_name"]
        for job in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())[
            "scrape_configs"
        ]
    }
    [target_down] = [expr for name, expr in rule_expressions() if name == "SmsbridgeTargetDown"]
    [job_pattern] = re.findall(r'job=~"([^"]+)"', target_down)
    for name in (*SERVICES, "kafka-exporter"):
        pod = one("Deployment", name)["spec"]["template"]
        jobs = scraped_jobs(pod, pod_monitor)
        assert jobs == {
            f"smsbridge-{name}": int(pod["metadata"]["annotations"]["prometheus.io/port"])
        }
        assert f"smsbridge-{name}" in compose_jobs, name
        assert re.fullmatch(job_pattern, f"smsbridge-{name}"), name
    assert (
        pod_monitor["metadata"]["namespace"] == one("Deployment", "sender")["metadata"]["namespace"]
    )


def exporter_flags(args: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in args)


def test_kafka_exporter_runs_as_in_compose_against_the_configured_kafka() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    deployment = one("Deployment", "kafka-exporter")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == compose["kafka-exporter"]["image"]
    ours, theirs = (
        exporter_flags(container["args"]),
        exporter_flags(compose["kafka-exporter"]["command"]),
    )
    [config_map] = [d for d in documents(K8S / "configmap.yaml") if d["kind"] == "ConfigMap"]
    bootstrap = re.search(r'bootstrap_servers = "([^"]+)"', config_map["data"]["smsbridge.toml"])
    assert bootstrap is not None
    assert ours.pop("kafka.server") == bootstrap.group(1)
    assert theirs.pop("kafka.server") == "kafka:9092"
    assert ours == theirs
    assert deployment["spec"]["replicas"] == 1  # two would report every group twice
    # The group filter is unanchored (Go's MatchString): prefixed groups are reported too.
    for group in ("smsbridge-sender", "prod.smsbridge-reporter"):
        assert re.search(ours["group.filter"], group), group
    # The restricted Pod Security profile.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int)
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
