"""The scheduler's one config; its fields are its flags (``disagg scheduler --help``)."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.services.scheduler.hold import HoldPolicy
from disagg.services.scheduler.placement import PlacementPolicy
from disagg.shared.config import group, option
from disagg.shared.protocol.types import check_id
from disagg.shared.service import ServiceConfig


@dataclass(frozen=True)
class SchedulerConfig:
    service: ServiceConfig = group(ServiceConfig)
    id: str | None = option(None, help="scheduler id in stats and metrics (default: random)")
    policy: PlacementPolicy = group(PlacementPolicy)
    hold: HoldPolicy = group(HoldPolicy)
    rate_window_s: float = option(
        10.0, help="window of the measured P:D rates and of the prefill-queue trend"
    )

    def __post_init__(self) -> None:
        if self.id is not None:
            check_id("--id", self.id)
        if self.rate_window_s <= 0:
            raise ValueError(f"--rate-window-s must be positive, got {self.rate_window_s}")
