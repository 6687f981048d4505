"""The planner's one config; its fields are its flags (``disagg planner --help``)."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.services.planner.core import PlannerPolicy
from disagg.shared.config import group, option
from disagg.shared.protocol.types import check_id
from disagg.shared.service import ServiceConfig


@dataclass(frozen=True)
class PlannerConfig:
    service: ServiceConfig = group(ServiceConfig)
    id: str | None = option(None, help="planner id in decisions and metrics (default: random)")
    policy: PlannerPolicy = group(PlannerPolicy)
    rate_window_s: float = option(10.0, help="window of the measured per-phase rates")
    interval_s: float = option(1.0, help="one decision this often")
    metrics_host: str = option("127.0.0.1", help="interface of the Prometheus /metrics endpoint")
    metrics_port: int = option(9400, help="port of the Prometheus /metrics endpoint (0: none)")
    k8s_namespace: str | None = option(
        None, help="act: set the prefill/decode Deployments' replicas in this namespace"
    )
    act_roles: bool = option(
        False, help="act: switch live workers' roles to the desired counts (a fixed budget)"
    )
    role_drain_s: float = option(2.0, help="a switching worker's drain; then its requests move")
    k8s_prefill: str = option("disagg-prefill", help="the prefill workers' Deployment")
    k8s_decode: str = option("disagg-decode", help="the decode workers' Deployment")

    def __post_init__(self) -> None:
        if self.id is not None:
            check_id("--id", self.id)
        if self.act_roles and self.k8s_namespace is not None:
            raise ValueError("--act-roles and --k8s-namespace are two actuators: choose one")
        for name in ("rate_window_s", "interval_s", "role_drain_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
