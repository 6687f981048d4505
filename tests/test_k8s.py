"""deploy/k8s against the CLI, rendered by kubectl (when installed), and the planner's
Kubernetes actuator against a fake API server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from disagg.services.planner.k8s import KubernetesScaler, Targets, actuate
from disagg.services.workers.config import WorkerConfig
from tests.test_compose import _env_flag, _flags, _subparser

yaml = pytest.importorskip("yaml")
BASE = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
EXPECTED = {
    ("Deployment", "disagg-nats"), ("Service", "disagg-nats"),
    ("Deployment", "disagg-scheduler"), ("Deployment", "disagg-gateway"),
    ("Service", "disagg-gateway"), ("Deployment", "disagg-planner"),
    ("Service", "disagg-planner"), ("ServiceAccount", "disagg-planner"),
    ("Role", "disagg-planner"), ("RoleBinding", "disagg-planner"),
    ("Deployment", "disagg-prefill"), ("Deployment", "disagg-decode"),
}  # fmt: skip


def documents() -> list[dict]:
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    return [d for name in listed for d in yaml.safe_load_all((BASE / name).read_text()) if d]


def by_name(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


def containers(deployment: dict) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def test_the_base_holds_every_service_with_its_probes_and_resources():
    assert {(d["kind"], d["metadata"]["name"]) for d in documents()} == EXPECTED
    deployments = by_name("Deployment")
    for name, d in deployments.items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        for c in d["spec"]["template"]["spec"]["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name
    gateway = deployments["disagg-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "tcpSocket" in gateway["livenessProbe"]  # 503 without workers must not kill it
    nats = deployments["disagg-nats"]["spec"]["template"]["spec"]["containers"][0]
    assert nats["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "monitor"}


def test_commands_and_environment_name_real_subcommands_and_flags():
    for name, d in by_name("Deployment").items():
        for c in containers(d):
            if c["image"] != "disagg":
                continue
            flags = _flags(_subparser(c["args"][0]))
            for arg in c["args"][1:]:
                assert not arg.startswith("--") or arg in flags, (name, arg)
            for var in c.get("env", []):
                assert _env_flag(var["name"]) in flags, (name, var["name"])


def test_workers_drain_within_their_grace_period_and_decode_advertises_its_pod_ip():
    deployments = by_name("Deployment")
    drain_s = WorkerConfig.__dataclass_fields__["drain_timeout_s"].default
    for name in (Targets.prefill, Targets.decode):
        spec = deployments[name]["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > drain_s, name
    decode = deployments[Targets.decode]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in decode["env"]}
    assert env["DISAGG_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["DISAGG_ZMQ_HOST"]["value"] == "0.0.0.0"
    assert decode["livenessProbe"]["tcpSocket"]["port"] == "kv"


def test_the_planner_may_scale_exactly_the_two_worker_deployments():
    planner = by_name("Deployment")["disagg-planner"]["spec"]["template"]["spec"]
    assert planner["serviceAccountName"] == "disagg-planner"
    env = {e["name"]: e for e in planner["containers"][0]["env"]}
    assert env["DISAGG_K8S_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    (rule,) = by_name("Role")["disagg-planner"]["rules"]
    assert rule["resources"] == ["deployments/scale"] and set(rule["verbs"]) == {"get", "patch"}
    assert set(rule["resourceNames"]) == {Targets.prefill, Targets.decode}
    binding = by_name("RoleBinding")["disagg-planner"]
    assert binding["subjects"][0]["name"] == "disagg-planner"


def test_kubectl_kustomize_renders_the_base():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (Debian: apt-get install kubectl)")
    out = subprocess.run([kubectl, "kustomize", str(BASE)], capture_output=True, text=True,
                         timeout=60, check=True).stdout  # fmt: skip
    rendered = [d for d in yaml.safe_load_all(out) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == EXPECTED
    for d in rendered:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "disagg"
        if d["kind"] == "Deployment":
            for c in containers(d):
                assert c["image"] in ("disagg:latest", "nats:2.10-alpine"), c["image"]


class FakeApps:
    """The two AppsV1Api calls the scaler makes, over an in-memory table of replicas."""

    def __init__(self, replicas: dict[str, int]) -> None:
        self.replicas, self.patches = dict(replicas), []

    def read_namespaced_deployment_scale(self, name: str, namespace: str):
        assert namespace == "serving"
        return SimpleNamespace(spec=SimpleNamespace(replicas=self.replicas[name]))

    def patch_namespaced_deployment_scale(self, name: str, namespace: str, body: dict):
        self.patches.append((name, namespace, body))
        self.replicas[name] = body["spec"]["replicas"]


def test_the_actuator_sets_only_the_replicas_that_differ():
    apps = FakeApps({"disagg-prefill": 1, "disagg-decode": 1})
    scaler = KubernetesScaler("serving", apps=apps)
    assert actuate(scaler, Targets(), prefill=2, decode=1) == {"disagg-prefill": 2}
    assert apps.patches == [("disagg-prefill", "serving", {"spec": {"replicas": 2}})]
    assert actuate(scaler, Targets(), prefill=2, decode=1) == {}  # nothing to do
    assert actuate(scaler, Targets(), prefill=1, decode=3) == {
        "disagg-prefill": 1, "disagg-decode": 3,
    }  # fmt: skip


def test_the_scaler_reads_the_real_clients_scale_objects():
    client = pytest.importorskip("kubernetes.client")

    class Apps(FakeApps):
        def read_namespaced_deployment_scale(self, name, namespace):
            return client.V1Scale(spec=client.V1ScaleSpec(replicas=self.replicas[name]))

    scaler = KubernetesScaler("serving", apps=Apps({"disagg-decode": 4}))
    assert scaler.replicas("disagg-decode") == 4
