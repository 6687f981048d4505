"""The entry point of `disagg prefill | decode | worker`: one shell class per role."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from disagg.services.workers.config import WorkerConfig, pin_cpus
from disagg.services.workers.decode_service import DecodeService
from disagg.services.workers.prefill_service import PrefillService
from disagg.services.workers.service import WorkerService, log
from disagg.shared.protocol.types import Role
from disagg.shared.service import run_service

SHELLS: dict[Role, type[WorkerService]] = {
    Role.PREFILL: PrefillService,
    Role.DECODE: DecodeService,
    Role.BOTH: DecodeService,  # its core prefills locally when no prefill worker is placed
}


def main(cfg: WorkerConfig) -> int:
    """Run one worker of ``cfg.role`` until SIGTERM; a RoleRequest drains it and goes on as
    the new role over the same weights and KV cache (and the same worker id)."""
    pin_cpus(cfg.cpus)

    async def serve(stop: asyncio.Event) -> None:
        shell = SHELLS[cfg.role](cfg)
        while True:
            await shell.run(stop)
            if shell.next_role is None or stop.is_set():
                return
            switched = replace(cfg, role=shell.next_role, id=shell.worker_id)
            log.info("role_switched", worker_id=shell.worker_id, role=shell.next_role)
            shell = SHELLS[shell.next_role](switched, shell.runtime)

    return run_service(cfg.service, serve)
