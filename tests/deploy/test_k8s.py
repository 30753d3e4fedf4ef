"""deploy/k8s: the manifests parse, agree with the configuration and the CLI, and every consumer
group is scaled by KEDA on its own topics' lag, never past their partition count."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from services.normalizer.app import build as build_normalizer
from services.reporter.app import build as build_reporter
from services.sender.app import build as build_sender
from shared.config import Settings, load_settings, split_listen
from shared.contract.topics import ALL_TOPICS
from shared.kafka.service import ConsumerService
from tests.deploy.promql import DEPLOY
from tools.cli import build_parser

K8S = DEPLOY / "k8s"
CONSUMERS = {"sender": build_sender, "normalizer": build_normalizer, "reporter": build_reporter}
SERVICES = ("ingress", "callbacks", "campaigns", *CONSUMERS)
PARTITIONS = {topic.name: topic.partitions for topic in ALL_TOPICS}


def documents() -> list[dict[str, Any]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                document["_file"] = path.name
                found.append(document)
    return found


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Settings:
    """The ConfigMap's smsbridge.toml, loaded with the example Secret's variables."""
    [config_map] = of_kind("ConfigMap").values()
    [secret] = of_kind("Secret").values()
    for name, value in secret["stringData"].items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "smsbridge.toml"
    path.write_text(config_map["data"]["smsbridge.toml"])
    return load_settings(path)


def port_of(settings: Settings, service: str) -> int:
    """The port the service's Service exposes: the public one of ingress and callbacks."""
    return split_listen(
        {
            "ingress": settings.ingress.listen,
            "callbacks": settings.callbacks.listen,
            "campaigns": settings.campaigns.listen,
            "sender": settings.sender.metrics_listen,
            "normalizer": settings.normalizer.metrics_listen,
            "reporter": settings.reporter.metrics_listen,
        }[service]
    )[1]


def ops_port_of(settings: Settings, service: str) -> int:
    """Where /metrics, /healthz and /readyz answer."""
    ops = {"ingress": settings.ingress.ops_listen, "callbacks": settings.callbacks.ops_listen}
    return split_listen(ops[service])[1] if service in ops else port_of(settings, service)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests - {"secret.example.yaml"}


def test_each_service_has_a_deployment_running_it_and_a_service(settings: Settings) -> None:
    parser = build_parser()
    deployments = of_kind("Deployment")
    services = of_kind("Service")
    assert set(deployments) == set(SERVICES)
    for name in SERVICES:
        pod = deployments[name]["spec"]["template"]
        [container] = pod["spec"]["containers"]
        args = parser.parse_args(container["args"])
        assert args.command == "run" and args.service == name
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        ops = ops_port_of(settings, name)
        assert set(ports.values()) == {port_of(settings, name), ops}, name
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            assert container[probe]["httpGet"]["path"] == path
            assert ports[container[probe]["httpGet"]["port"]] == ops, name
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ops)
        labels = pod["metadata"]["labels"]
        assert deployments[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert services[name]["spec"]["selector"].items() <= labels.items()
        exposed = [port["port"] for port in services[name]["spec"]["ports"]]
        assert exposed == [port_of(settings, name)], name
    job_pod = of_kind("Job")["smsbridge-topics"]["spec"]["template"]["spec"]
    assert parser.parse_args(job_pod["containers"][0]["args"]).command == "topics"


def test_the_internet_facing_services_keep_their_ops_endpoints_off_the_exposed_port(
    settings: Settings,
) -> None:
    services = of_kind("Service")
    for name in ("ingress", "callbacks"):
        assert ops_port_of(settings, name) != port_of(settings, name)
        exposed = {port["port"] for port in services[name]["spec"]["ports"]}
        assert ops_port_of(settings, name) not in exposed, name


def test_the_production_example_speaks_https_only(settings: Settings) -> None:
    assert settings.allow_plain_http is False
    urls = settings.urls_in_use()
    assert set(urls) >= {"ingress.public_url", "callbacks.public_url"}
    assert all(url.startswith("https://") for url in urls.values()), urls


def test_consumers_stop_within_their_grace_period(settings: Settings) -> None:
    deadlines = {
        "sender": settings.sender.runner.shutdown_deadline_s,
        "normalizer": settings.normalizer.runner.shutdown_deadline_s,
        "reporter": settings.reporter.runner.shutdown_deadline_s,
    }
    deployments = of_kind("Deployment")
    for name, deadline in deadlines.items():
        grace = deployments[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > deadline, name


async def test_keda_scales_each_consumer_group_on_its_topics_capped_by_partitions(
    settings: Settings,
) -> None:
    scaled = of_kind("ScaledObject")
    assert set(scaled) == set(CONSUMERS)
    deployments = of_kind("Deployment")
    for name, build in CONSUMERS.items():
        service = build(settings)
        assert isinstance(service, ConsumerService)
        spec = scaled[name]["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        assert "replicas" not in deployments[name]["spec"]  # the HPA owns the count
        triggers = spec["triggers"]
        assert {t["type"] for t in triggers} == {"kafka"}
        assert {t["metadata"]["consumerGroup"] for t in triggers} == {service.group_id}
        assert {t["metadata"]["topic"] for t in triggers} == set(service.topics)
        assert all(t["metadata"]["allowIdleConsumers"] == "false" for t in triggers)
        assert int(triggers[0]["metadata"]["lagThreshold"]) > 0
        cap = min(PARTITIONS[topic] for topic in service.topics)
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] == cap
        bootstrap = {t["metadata"]["bootstrapServers"] for t in triggers}
        assert bootstrap == {settings.kafka.bootstrap_servers}


def test_secrets_reach_the_pods_only_through_the_secret() -> None:
    text = (K8S / "configmap.yaml").read_text()
    [secret] = of_kind("Secret").values()
    for line in text.splitlines():
        key = line.strip().split(" = ")[0]
        secrets = {"api_token", "secret_key", "aggregator_api_key", "api_key", "callback_token"}
        if key in secrets | {"webhook_secret", "admin_token"}:
            assert '"env:' in line, line
            assert line.split('"env:')[1].rstrip('"') in secret["stringData"]
    for deployment in of_kind("Deployment").values():
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
