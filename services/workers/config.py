"""The worker's one config; its fields are the flags of `disagg prefill|decode|worker`."""

from __future__ import annotations

import os
from dataclasses import dataclass

from disagg.shared.config import group, option
from disagg.shared.engine.runtime import RuntimeConfig
from disagg.shared.protocol.types import Role, WireDtype, check_id
from disagg.shared.service import ServiceConfig


@dataclass(frozen=True)
class WorkerConfig:
    role: Role
    service: ServiceConfig = group(ServiceConfig)
    runtime: RuntimeConfig = group(RuntimeConfig)
    id: str | None = option(None, help="worker id (default: role + random suffix)")
    zmq_host: str = option("127.0.0.1", help="interface the KV receiver binds")
    zmq_port: int = option(0, help="port of the KV receiver (0: a free one)")
    advertise_host: str | None = option(None, help="host peers dial (default: --zmq-host)")
    kv_transfer_dtype: WireDtype | None = option(
        None, help="KV wire dtype (default: the cache's; int8 quantizes)"
    )
    transfer_deadline_s: float = option(30.0, help="decode: bound on one KV transfer")
    drain_timeout_s: float = option(30.0, help="SIGTERM: finish held requests within")
    max_queued_prefill_tokens: int = option(65536, help="prefill: tokens queued; beyond, 429")
    cpus: str | None = option(None, help="CPU list to pin to, e.g. 0-3 or 0,2")

    def __post_init__(self) -> None:
        if self.id is not None:
            check_id("--id", self.id)
        for name in ("transfer_deadline_s", "drain_timeout_s", "max_queued_prefill_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.cpus is not None:
            parse_cpus(self.cpus)


def parse_cpus(spec: str) -> set[int]:
    """``"0-3,6"`` -> {0, 1, 2, 3, 6}; ValueError naming the flag otherwise."""
    cpus: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"--cpus must look like 0-3 or 0,2, got {spec!r}") from None
    if not cpus:
        raise ValueError(f"--cpus {spec!r} names no CPU")
    return cpus


def pin_cpus(spec: str | None) -> None:
    """Own these cores: affinity plus a matching torch thread count."""
    if spec:
        import torch

        cpus = parse_cpus(spec)
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))
