"""deploy/k8s: the manifests parse, agree with the configuration and the CLI, and every consumer
group is scaled by KEDA on its own topics' lag, never past their partition count."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from services.normalizer.app import build as build_normalizer
from services.reporter.app import build as build_reporter
from services.sender.app import build as build_sender
from shared.config import Settings, load_settings, split_listen
from shared.contract.topics import ALL_TOPICS
from shared.kafka.clients import make_consumer
from shared.kafka.service import ConsumerService
from tests.deploy.promql import DEPLOY, metric_names
from tools.cli import build_parser

K8S = DEPLOY / "k8s"
SECRETS_MOUNT = "/run/secrets/smsbridge"
CONSUMERS = {"sender": build_sender, "normalizer": build_normalizer, "reporter": build_reporter}
SERVICES = ("ingress", "callbacks", "campaigns", *CONSUMERS)
PARTITIONS = {topic.name: topic.partitions for topic in ALL_TOPICS}
PROMTOOL = shutil.which("promtool")


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
    """The ConfigMap's smsbridge.toml, loaded with the example Secret's files where the pods
    mount them."""
    [config_map] = of_kind("ConfigMap").values()
    [secret] = of_kind("Secret").values()
    mount = tmp_path / "secrets"
    mount.mkdir()
    for name, value in secret["stringData"].items():
        (mount / name).write_text(value)
    path = tmp_path / "smsbridge.toml"
    path.write_text(config_map["data"]["smsbridge.toml"].replace(SECRETS_MOUNT, str(mount)))
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


async def test_keda_scales_each_consumer_group_capped_by_partitions_the_others_on_lag(
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
        cap = min(PARTITIONS[topic] for topic in service.topics)
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] == cap
        if name == "sender":
            continue  # on saturation: test_the_sender_scales_on_saturation_not_on_lag
        triggers = spec["triggers"]
        assert {t["type"] for t in triggers} == {"kafka"}
        assert {t["metadata"]["consumerGroup"] for t in triggers} == {service.group_id}
        assert {t["metadata"]["topic"] for t in triggers} == set(service.topics)
        assert all(t["metadata"]["allowIdleConsumers"] == "false" for t in triggers)
        assert int(triggers[0]["metadata"]["lagThreshold"]) > 0
        bootstrap = {t["metadata"]["bootstrapServers"] for t in triggers}
        assert bootstrap == {settings.kafka.bootstrap_servers}


def test_secrets_reach_the_pods_only_through_the_secret_mounted_as_files() -> None:
    """As files, not variables: kubelet updates a mounted Secret in place (a symlink swap) and
    the services reload it (issue 18); a variable, or a subPath mount, never changes."""
    text = (K8S / "configmap.yaml").read_text()
    [secret] = of_kind("Secret").values()
    for line in text.splitlines():
        key = line.strip().split(" = ")[0]
        secrets = {"api_token", "secret_key", "aggregator_api_key", "api_key", "callback_token"}
        if key in secrets | {"webhook_secret", "admin_token"}:
            assert f'"file:{SECRETS_MOUNT}/' in line, line
            assert line.split(f"{SECRETS_MOUNT}/")[1].rstrip('"') in secret["stringData"]
    workloads = [*of_kind("Deployment").values(), *of_kind("Job").values()]
    assert len(workloads) == 7
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert "envFrom" not in container
        [volume] = [v for v in pod["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
        [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == SECRETS_MOUNT and mount["readOnly"] and "subPath" not in mount


def test_the_sender_scales_on_saturation_not_on_lag() -> None:
    """A lag trigger would add senders that only split the accounts' rate limits: the one trigger
    asks Prometheus how busy the in-flight slots are, from metrics the sender exports."""
    import services.sender.metrics  # noqa: F401  (registers the sender's metrics)

    [trigger] = of_kind("ScaledObject")["sender"]["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    assert 0 < float(trigger["metadata"]["threshold"]) < 1  # a share of each replica's slots
    query = trigger["metadata"]["query"]
    assert 'state="busy"' in query  # time waiting for rate-limit budget asks for no replica
    families = list(REGISTRY.collect())
    exported = {family.name for family in families if family.type == "gauge"} | {
        family.name + "_total" for family in families if family.type == "counter"
    }
    assert metric_names(query) == {
        "smsbridge_sender_slot_seconds_total",
        "smsbridge_sender_call_slots",
    }
    assert metric_names(query) <= exported


def _evaluates_to(query: str, series: dict[str, str], value: float, tmp_path: Path) -> None:
    """promtool evaluates ``query`` over ``series`` (per-minute samples) at 10 minutes to
    ``value``."""
    tests = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": name, "values": values} for name, values in series.items()
                ],
                "promql_expr_test": [
                    {"expr": query, "eval_time": "10m", "exp_samples": [{"value": value}]}
                ],
            }
        ],
    }
    path = tmp_path / "saturation.test.yml"
    path.write_text(yaml.safe_dump(tests))
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package 'prometheus')")
def test_the_saturation_query_counts_working_slots_not_rate_limit_waits(tmp_path: Path) -> None:
    """Two instances with 4 slots per account, counters rising per minute (60 s = one slot):
    instance a works all 4 slots of otpiq (saturated, whatever its other account does); b holds
    all 4 of its slots too, but 3 of them wait for rate-limit budget."""
    [trigger] = of_kind("ScaledObject")["sender"]["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    threshold = float(trigger["metadata"]["threshold"])

    def slot_seconds(instance: str, provider: str, state: str) -> str:
        return (
            f'smsbridge_sender_slot_seconds_total{{instance="{instance}",'
            f'provider="{provider}",state="{state}"}}'
        )

    def slots(instance: str, provider: str) -> str:
        return f'smsbridge_sender_call_slots{{instance="{instance}",provider="{provider}"}}'

    series = {
        slot_seconds("a", "otpiq", "busy"): "0+240x10",
        slot_seconds("a", "otpiq", "rate_limited"): "0+0x10",
        slot_seconds("a", "octopush", "busy"): "0+60x10",
        slots("a", "otpiq"): "4x10",
        slots("a", "octopush"): "4x10",
        slot_seconds("b", "otpiq", "busy"): "0+60x10",
        slot_seconds("b", "otpiq", "rate_limited"): "0+180x10",
        slots("b", "otpiq"): "4x10",
    }
    # a: 1.0 (its busiest account), b: 0.25: the rate-limited slots count for nothing.
    _evaluates_to(query, series, 1.25, tmp_path)
    assert math.ceil(1.25 / threshold) == 2  # the HPA's answer: no more than 2 replicas
    # The same two instances, their slots mostly waiting for budget: the HPA wants one replica.
    series[slot_seconds("a", "otpiq", "busy")] = "0+30x10"
    series[slot_seconds("a", "otpiq", "rate_limited")] = "0+210x10"
    series[slot_seconds("a", "octopush", "busy")] = "0+0x10"
    _evaluates_to(query, series, 0.375, tmp_path)
    assert math.ceil(0.375 / threshold) == 1


def test_every_scaled_object_limits_how_fast_the_group_changes() -> None:
    """Each change of members rebalances the whole group: the HPA adds a few pods per period,
    removes them one at a time, and only after a longer quiet window than it waits to add."""
    for name, scaled in of_kind("ScaledObject").items():
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        up, down = behavior["scaleUp"], behavior["scaleDown"]
        assert 0 < up["stabilizationWindowSeconds"] < down["stabilizationWindowSeconds"], name
        for direction in (up, down):
            assert direction["policies"], name
            for policy in direction["policies"]:
                assert policy["type"] == "Pods" and policy["value"] >= 1, name
                assert 15 <= policy["periodSeconds"] <= 1800, name
        assert max(p["value"] for p in down["policies"]) == 1, name
        assert down["stabilizationWindowSeconds"] >= 300, name


async def test_consumer_pods_join_their_group_as_static_members_named_after_the_pod(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """group.instance.id comes from the pod's name (the downward API), so a restarted container
    takes its partitions back; every consumer service's deployment sets it."""
    deployments = of_kind("Deployment")
    for name in (*CONSUMERS, "campaigns"):
        [container] = deployments[name]["spec"]["template"]["spec"]["containers"]
        env = {item["name"]: item for item in container["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", name
        reference = env["SMSBRIDGE_KAFKA__GROUP_INSTANCE_ID"]["value"]
        monkeypatch.setenv("POD_NAME", f"{name}-7d9c-x2k4z")
        monkeypatch.setenv("SMSBRIDGE_KAFKA__GROUP_INSTANCE_ID", reference)
        path = tmp_path / "smsbridge.toml"  # the ConfigMap's, written by the settings fixture
        kafka = load_settings(path).kafka
        assert kafka.group_instance_id == f"{name}-7d9c-x2k4z", name
        consumer = make_consumer(kafka, "smsbridge-x", role=name)
        assert consumer._coordinator is None  # made at start; the id is kept until then
        assert consumer._group_instance_id == f"{name}-7d9c-x2k4z", name
    assert settings.kafka.group_instance_id is None  # the file alone: dynamic membership


# Pod Security Standards, "restricted" profile (with "baseline" under it): volume types allowed.
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet", "Pod"}


def pod_specs() -> dict[str, dict[str, Any]]:
    """Every pod spec in deploy/k8s and its subdirectories (monitoring/), by kind/name."""
    found = {}
    for path in sorted(K8S.rglob("*.yaml")):
        for document in filter(None, yaml.safe_load_all(path.read_text())):
            kind = document["kind"]
            if kind == "Pod":
                spec = document["spec"]
            elif kind == "CronJob":
                spec = document["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            elif kind in WORKLOADS:
                spec = document["spec"]["template"]["spec"]
            else:
                continue
            found[f"{kind}/{document['metadata']['name']}"] = spec
    return found


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What the "restricted" Pod Security profile refuses in a pod spec, plus our own rules: a
    read-only root filesystem, and for our image /tmp (where temporary files and an unset
    state_dir go) on an emptyDir."""
    wrong = [f"{key}: true" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for name, volume in volumes.items():
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            wrong.append(f"volume {name}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    pod_context = pod.get("securityContext", {})
    containers = [
        *pod.get("initContainers", []),
        *pod.get("containers", []),
        *pod.get("ephemeralContainers", []),
    ]
    assert containers
    for container in containers:
        name = container["name"]
        context = container.get("securityContext", {})

        def effective(key: str, context: dict[str, Any] = context) -> Any:
            return context.get(key, pod_context.get(key))

        if context.get("privileged"):
            wrong.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            wrong.append(f"{name}: allowPrivilegeEscalation is not false")
        if effective("runAsNonRoot") is not True:
            wrong.append(f"{name}: runAsNonRoot is not true")
        if effective("runAsUser") == 0 or not isinstance(effective("runAsUser"), int):
            wrong.append(f"{name}: runAsUser is not a non-zero UID")
        seccomp = effective("seccompProfile") or {}
        if seccomp.get("type") not in {"RuntimeDefault", "Localhost"}:
            wrong.append(f"{name}: seccompProfile is not RuntimeDefault")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            wrong.append(f"{name}: capabilities do not drop ALL")
        if not set(capabilities.get("add", [])) <= {"NET_BIND_SERVICE"}:
            wrong.append(f"{name}: adds capabilities {capabilities['add']}")
        if any("hostPort" in port for port in container.get("ports", [])):
            wrong.append(f"{name}: hostPort")
        if context.get("readOnlyRootFilesystem") is not True:
            wrong.append(f"{name}: the root filesystem is writable")
        mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
        if "sms-bridge" in container["image"] and "emptyDir" not in volumes.get(
            mounts.get("/tmp", ""), {}
        ):
            wrong.append(f"{name}: /tmp is not an emptyDir")
    return wrong


def test_every_pod_passes_the_restricted_pod_security_profile() -> None:
    pods = pod_specs()
    ours = {f"Deployment/{name}" for name in SERVICES} | {"Job/smsbridge-topics"}
    assert ours | {"Deployment/kafka-exporter"} <= set(pods)
    violations = {
        name: wrong for name, pod in pods.items() if (wrong := restricted_violations(pod))
    }
    assert not violations
    # The namespace enforces the profile, so a pod that does not pass is refused, not run.
    [namespace] = of_kind("Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_check_refuses_what_the_profile_refuses() -> None:
    """restricted_violations itself: each of these pod specs breaks one rule."""
    [good] = [pod for name, pod in pod_specs().items() if name == "Deployment/sender"]
    assert restricted_violations(good) == []
    breakages = {
        "root": lambda pod: pod["securityContext"].update(runAsUser=0),
        "escalation": lambda pod: pod["containers"][0]["securityContext"].pop(
            "allowPrivilegeEscalation"
        ),
        "capabilities": lambda pod: pod["containers"][0]["securityContext"].pop("capabilities"),
        "seccomp": lambda pod: pod["securityContext"].pop("seccompProfile"),
        "writable root": lambda pod: pod["containers"][0]["securityContext"].update(
            readOnlyRootFilesystem=False
        ),
        "hostPath": lambda pod: pod["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "no /tmp": lambda pod: pod["containers"][0]["volumeMounts"].pop(),
    }
    for name, breakage in breakages.items():
        [pod] = [spec for key, spec in pod_specs().items() if key == "Deployment/sender"]
        breakage(pod)
        assert restricted_violations(pod), name


def test_pods_run_as_the_images_numeric_user() -> None:
    """The Dockerfile's USER is numeric (runAsNonRoot cannot check a user name) and the pods
    run as that same UID and GID, which owns the image's home directory."""
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    [user] = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    uid, gid = (int(part) for part in user.split(":"))
    assert uid != 0 and f"--uid {uid} " in dockerfile and f"--gid {gid} " in dockerfile
    for name, pod in pod_specs().items():
        for container in pod["containers"]:
            if "sms-bridge" not in container["image"]:
                continue
            context = {**pod["securityContext"], **container.get("securityContext", {})}
            assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid), name


def test_the_consumers_local_state_is_on_a_writable_volume(settings: Settings) -> None:
    deployments = of_kind("Deployment")
    state_dirs = {
        "sender": settings.sender.state_dir,
        "normalizer": settings.normalizer.state_dir,
        "reporter": settings.reporter.state_dir,
    }
    for name, state_dir in state_dirs.items():
        pod = deployments[name]["spec"]["template"]["spec"]
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        [container] = pod["containers"]
        writable = [
            Path(m["mountPath"]) for m in container["volumeMounts"] if m["name"] in empty_dirs
        ]
        # Unset, the store makes a private directory with tempfile, under /tmp in the image.
        directory = Path(state_dir or "/tmp/smsbridge-state")
        assert any(directory.is_relative_to(mount) for mount in writable), name


def test_the_topics_job_can_be_applied_again_with_a_new_image() -> None:
    """A Job's pod template is immutable: the finished Job deletes itself (TTL), so the next
    `kubectl apply -k` creates it with the new image; the file says what to do before then."""
    [(name, job)] = of_kind("Job").items()
    assert "generateName" not in job["metadata"]  # `kubectl apply` needs a fixed name
    ttl = job["spec"]["ttlSecondsAfterFinished"]
    assert 0 < ttl <= 3600
    namespace = job["metadata"]["namespace"]
    text = (K8S / job["_file"]).read_text()
    assert f"kubectl -n {namespace} delete job {name}" in text
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"OnFailure", "Never"}
