"""The Kubernetes actuator: the planner's desired counts as the replicas of the prefill and
decode Deployments (``disagg planner --k8s-namespace NS``).

Scaling a Deployment down deletes pods, which Kubernetes stops with SIGTERM: a worker then
drains (no new work, what it holds finishes within its --drain-timeout-s), so the pods'
``terminationGracePeriodSeconds`` must exceed that (``deploy/k8s`` sets 60 s for 30 s).
Only the replicas are written (the ``scale`` subresource): images, resources and probes stay
the manifests' own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from disagg.shared.log import get_logger

log = get_logger("disagg.planner")


class Scaler(Protocol):
    def replicas(self, deployment: str) -> int: ...
    def scale(self, deployment: str, replicas: int) -> None: ...


@dataclass(frozen=True)
class Targets:
    prefill: str = "disagg-prefill"
    decode: str = "disagg-decode"


def actuate(scaler: Scaler, targets: Targets, prefill: int, decode: int) -> dict[str, int]:
    """Set each Deployment to its desired replicas where it differs; returns what changed."""
    changed = {}
    for deployment, want in ((targets.prefill, prefill), (targets.decode, decode)):
        have = scaler.replicas(deployment)
        if have != want:
            scaler.scale(deployment, want)
            changed[deployment] = want
            log.info("k8s_scaled", deployment=deployment, replicas=want, was=have)
    return changed


class KubernetesScaler:
    """``Scaler`` over the Kubernetes API (the ``kubernetes`` client: ``pip install
    disagg[k8s]``): in-cluster credentials when run as a pod, else ~/.kube/config. ``apps``:
    an ``AppsV1Api`` (tests pass a fake)."""

    def __init__(self, namespace: str, apps=None) -> None:
        self.namespace = namespace
        if apps is None:
            try:
                from kubernetes import client, config
            except ImportError:
                raise SystemExit("--k8s-namespace needs the kubernetes client: "
                                 "pip install 'disagg[k8s]'") from None  # fmt: skip
            try:
                config.load_incluster_config()
            except config.ConfigException:
                try:
                    config.load_kube_config()
                except config.ConfigException as err:
                    message = f"--k8s-namespace: no Kubernetes credentials ({err})"
                    raise SystemExit(message) from None
            apps = client.AppsV1Api()
        self.apps = apps

    def replicas(self, deployment: str) -> int:
        scale = self.apps.read_namespaced_deployment_scale(deployment, self.namespace)
        return int(scale.spec.replicas or 0)

    def scale(self, deployment: str, replicas: int) -> None:
        body = {"spec": {"replicas": replicas}}
        self.apps.patch_namespaced_deployment_scale(deployment, self.namespace, body)
