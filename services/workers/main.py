"""The entry point of `disagg prefill | decode | worker`: one shell class per role."""

from __future__ import annotations

from disagg.services.workers.config import WorkerConfig, pin_cpus
from disagg.services.workers.decode_service import DecodeService
from disagg.services.workers.prefill_service import PrefillService
from disagg.services.workers.service import WorkerService
from disagg.shared.protocol.types import Role
from disagg.shared.service import run_service

SHELLS: dict[Role, type[WorkerService]] = {
    Role.PREFILL: PrefillService,
    Role.DECODE: DecodeService,
    Role.BOTH: DecodeService,  # its core prefills locally when no prefill worker is placed
}


def main(cfg: WorkerConfig) -> int:
    """Run one worker of ``cfg.role`` until SIGTERM."""
    pin_cpus(cfg.cpus)
    return run_service(cfg.service, SHELLS[cfg.role](cfg).run)
