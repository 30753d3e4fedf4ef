"""docker-compose.yml cannot run here (no Docker engine): check what can be checked without one.

The file parses; every sms-bridge container runs a command the CLI accepts; its configuration
loads; the ports the services listen on, publish, health-check and get scraped on agree; the
Kafka address is the broker's; stop grace periods exceed the shutdown deadline.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.config import Settings, load_settings, split_listen
from shared.kafka.broker.distribution import kafka_version
from tests.deploy.promql import DEPLOY, ROOT
from tools.cli import build_parser

COMPOSE = ROOT / "docker-compose.yml"
CONFIG_IN_CONTAINER = "/etc/smsbridge/smsbridge.toml"
SERVICES = ("ingress", "callbacks", "sender", "normalizer", "reporter", "campaigns")
SIMULATORS = ("sim-optimove", "sim-providers")


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


def expand(value: str) -> str:
    """Compose's ``${NAME:-default}`` with the default, as in a clean environment."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """deploy/compose/smsbridge.toml loaded with the environment compose gives the containers."""
    # The folder is mounted, not the file: an edit that replaces the file is seen inside.
    folder = str(Path(CONFIG_IN_CONTAINER).parent)
    [config_mount] = [
        volume for volume in services()["ingress"]["volumes"] if volume.split(":")[1] == folder
    ]
    environment = services()["ingress"]["environment"]
    for name, value in environment.items():
        monkeypatch.setenv(name, expand(str(value)))
    monkeypatch.delenv("SMSBRIDGE_EMBEDDED_BOOTSTRAP", raising=False)
    assert environment["SMSBRIDGE_CONFIG"] == CONFIG_IN_CONTAINER
    return load_settings(ROOT / config_mount.split(":")[0] / Path(CONFIG_IN_CONTAINER).name)


def listeners(value: str) -> dict[str, str]:
    """Kafka's ``NAME://host:port,...`` listener list, by listener name."""
    pairs = (listener.split("://", 1) for listener in value.split(","))
    return {name: address for name, address in pairs}


def listen_port(settings: Settings, service: str) -> int:
    listen = {
        "ingress": settings.ingress.listen,
        "callbacks": settings.callbacks.listen,
        "sender": settings.sender.metrics_listen,
        "normalizer": settings.normalizer.metrics_listen,
        "reporter": settings.reporter.metrics_listen,
        "campaigns": settings.campaigns.listen,
    }[service]
    host, port = split_listen(listen)
    assert host == "0.0.0.0", f"{service} must listen on every interface in a container"
    return port


def ops_port(settings: Settings, service: str) -> int:
    """Where /metrics, /healthz and /readyz answer: ingress's and callbacks' ops_listen."""
    ops = {"ingress": settings.ingress.ops_listen, "callbacks": settings.callbacks.ops_listen}
    if service not in ops:
        return listen_port(settings, service)
    host, port = split_listen(ops[service])
    assert host == "0.0.0.0", f"{service}: Prometheus scrapes ops_listen from another container"
    return port


def test_every_container_runs_a_command_the_cli_accepts() -> None:
    parser = build_parser()
    for name, spec in services().items():
        if spec.get("image", "").startswith(("apache/", "prom/", "grafana/", "danielqsj/")):
            continue
        assert spec["build"] == ".", name
        args = parser.parse_args(["--config", CONFIG_IN_CONTAINER, *spec["command"]])
        assert callable(args.func), name
        if name in SERVICES:
            assert spec["command"] == ["run", name]
    assert set(SERVICES) | {"topics", *SIMULATORS} <= set(services())


def test_kafka_is_apache_kafka_in_kraft_mode_and_topics_are_created_first(
    settings: Settings,
) -> None:
    kafka = services()["kafka"]
    # The same Apache Kafka the tests, the benchmarks and `make dev` run (deploy/kafka/pom.xml).
    assert kafka["image"] == f"apache/kafka:{kafka_version()}"
    environment = kafka["environment"]
    assert "controller" in environment["KAFKA_PROCESS_ROLES"]
    assert "KAFKA_ZOOKEEPER_CONNECT" not in environment
    advertised = listeners(environment["KAFKA_ADVERTISED_LISTENERS"])
    assert settings.kafka.bootstrap_servers == advertised["PLAINTEXT"]
    assert settings.kafka.enable_idempotence  # Apache Kafka has InitProducerId

    topics = services()["topics"]
    assert topics["command"] == ["topics", "ensure"]
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in SERVICES:
        assert services()[name]["depends_on"]["topics"]["condition"] == (
            "service_completed_successfully"
        )


def test_ports_agree_between_config_compose_and_prometheus(settings: Settings) -> None:
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    for name in SERVICES:
        port, ops = listen_port(settings, name), ops_port(settings, name)
        spec = services()[name]
        assert f":{ops}/healthz" in " ".join(spec["healthcheck"]["test"]), name
        [discovery] = jobs[f"smsbridge-{name}"]["dns_sd_configs"]
        assert discovery["names"] == [name] and discovery["port"] == ops, name
        for published in spec.get("ports", []):
            assert published.endswith(f":{port}"), name
    for name in ("ingress", "callbacks"):  # the host gets the public port, not the ops one
        port = listen_port(settings, name)
        assert ops_port(settings, name) != port
        assert services()[name]["ports"] == [f"{port}:{port}"], name
    for simulator, base_url in (
        ("sim-optimove", next(iter(settings.tenants.values())).optimove_base_url),
        ("sim-providers", next(iter(settings.providers.values())).base_url),
    ):
        spec = services()[simulator]
        assert spec["profiles"] == ["simulators"]
        listen = spec["command"][spec["command"].index("--listen") + 1]
        assert base_url.startswith(f"http://{simulator}:{split_listen(listen)[1]}/")
    assert settings.callbacks.public_url == f"http://callbacks:{listen_port(settings, 'callbacks')}"
    exporter = jobs["smsbridge-kafka-exporter"]["static_configs"][0]["targets"]
    assert exporter == ["kafka-exporter:9308"]
    assert (
        f"--kafka.server={settings.kafka.bootstrap_servers}"
        in (services()["kafka-exporter"]["command"])
    )


def test_consumers_scale_by_replicas_and_stop_gracefully(settings: Settings) -> None:
    deadlines = {
        "sender": settings.sender.runner.shutdown_deadline_s,
        "normalizer": settings.normalizer.runner.shutdown_deadline_s,
        "reporter": settings.reporter.runner.shutdown_deadline_s,
    }
    for name, deadline in deadlines.items():
        spec = services()[name]
        assert re.fullmatch(rf"\$\{{{name.upper()}_REPLICAS:-1\}}", str(spec["deploy"]["replicas"]))
        assert "ports" not in spec  # replicas would fight over a host port
        grace = int(spec["stop_grace_period"].rstrip("s"))
        assert grace > deadline, f"{name}: grace {grace}s <= shutdown deadline {deadline}s"


def test_every_secret_is_an_env_reference_that_compose_provides() -> None:
    text = (DEPLOY / "compose" / "smsbridge.toml").read_text()
    references = set(re.findall(r'"env:([A-Z0-9_]+)"', text))
    assert references
    provided = set(services()["ingress"]["environment"])
    assert references <= provided
    keys = ("api_token", "secret_key", "aggregator_api_key", "api_key", "callback_token")
    for key in (*keys, "admin_token"):
        for line in text.splitlines():
            if line.startswith(f"{key} ="):
                assert '"env:' in line, line


def test_prometheus_and_grafana_are_provisioned() -> None:
    prometheus = services()["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    grafana = services()["grafana"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in grafana["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_in_container = mounts["./deploy/grafana/dashboards"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "smsbridge.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == dashboards_in_container
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (DEPLOY / "grafana" / "dashboards" / home.name).exists()
    assert str(home.parent) == dashboards_in_container
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_the_image_holds_only_what_the_services_need() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["smsbridge"]' in dockerfile
    assert "STOPSIGNAL SIGTERM" in dockerfile
    assert re.search(r"^USER \S+", dockerfile, re.MULTILINE)
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.MULTILINE))
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert copied <= allowed


def test_the_admin_api_has_a_token_and_is_published_on_the_hosts_loopback_only(
    settings: Settings,
) -> None:
    assert settings.campaigns.admin_token is not None
    port = listen_port(settings, "campaigns")
    assert services()["campaigns"]["ports"] == [f"127.0.0.1:{port}:{port}"]


def test_the_header_says_how_to_start_the_stack_with_its_simulated_peers() -> None:
    """deploy/compose/smsbridge.toml sends to the simulators: without the profile nothing
    answers the sender and the reporter, so the first line, and every `up` shown, names it."""
    header = COMPOSE.read_text().split("\n\n", 1)[0].splitlines()
    assert "--profile simulators" in header[0]
    ups = [line for line in header if "docker compose" in line and " up" in line]
    assert ups and all("--profile simulators" in line for line in ups), ups


def test_kafka_is_reachable_from_the_host_on_its_loopback() -> None:
    kafka = services()["kafka"]
    environment = kafka["environment"]
    bound = listeners(environment["KAFKA_LISTENERS"])
    advertised = listeners(environment["KAFKA_ADVERTISED_LISTENERS"])
    protocols = listeners(environment["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].replace(":", "://"))
    assert set(advertised) <= set(bound) <= set(protocols)
    assert environment.get("KAFKA_INTER_BROKER_LISTENER_NAME", "PLAINTEXT") == "PLAINTEXT"
    # The host's listener advertises the address the host reaches, on the port it publishes.
    [(name, address)] = [(n, a) for n, a in advertised.items() if a.startswith("localhost:")]
    port = address.split(":")[1]
    assert bound[name] == f":{port}"
    assert f"127.0.0.1:{port}:{port}" in kafka["ports"]  # loopback only: no auth on it
    assert f"--bootstrap-server localhost:{port}" in COMPOSE.read_text().split("services:")[0]


def test_the_kafka_healthcheck_starts_no_jvm() -> None:
    """Kafka's tools (kafka-*.sh) start a JVM each: every 5 s that was a second broker-sized
    process. Bash writes the ApiVersions request such a tool sends and waits for an answer
    (tests/integration/test_compose_healthcheck.py runs it against a broker)."""
    check = services()["kafka"]["healthcheck"]
    test = " ".join(check["test"])
    assert ".sh" not in test and "java" not in test and "/opt/kafka" not in test
    assert "/dev/tcp/127.0.0.1/9092" in test and check["test"][:2] == ["CMD", "bash"]
    [written] = re.findall(r"printf '((?:\\x[0-9a-f]{2})+)'", test)
    request = bytes.fromhex(written.replace("\\x", ""))
    size, api_key, version = struct.unpack(">iHH", request[:8])
    assert size == len(request) - 4 and (api_key, version) == (18, 0)  # ApiVersions v0
    assert int(check["interval"].rstrip("s")) >= 10
