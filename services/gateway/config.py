"""The gateway's one config; its fields are its flags (``disagg gateway --help``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from disagg.services.gateway.backend import Timeouts
from disagg.shared.config import group, option
from disagg.shared.protocol.types import check_id
from disagg.shared.service import ServiceConfig


@dataclass(frozen=True)
class GatewayConfig:
    model: Path = option(help="model folder (tokenizer, chat template, config.json)")
    service: ServiceConfig = group(ServiceConfig)
    served_model_name: tuple[str, ...] = option(
        (), help="name(s) clients use, comma separated (default: the folder's name)"
    )
    host: str = option("127.0.0.1", help="interface the HTTP API binds")
    port: int = option(8000, help="port of the HTTP API")
    id: str | None = option(None, help="gateway id (default: random)")
    max_model_len: int | None = option(None, help="longest sequence (default: the model's)")
    max_concurrent_requests: int = option(256, help="requests in flight; beyond, 429")
    max_body_bytes: int = option(4 << 20, help="largest request body; beyond, 413")
    max_stop_strings: int = option(32, help="stop strings one request may give (OpenAI: 4)")
    timeouts: Timeouts = group(Timeouts)
    migration_limit: int = option(3, help="moves of one request to new workers")
    drain_timeout_s: float = option(30.0, help="SIGTERM: finish requests within")
    api_key: tuple[str, ...] = option((), help="required Bearer key(s), comma separated",
                                      secret=True)  # fmt: skip

    def __post_init__(self) -> None:
        if self.id is not None:
            check_id("--id", self.id)
        for name in ("max_concurrent_requests", "max_body_bytes", "drain_timeout_s",
                     "max_stop_strings"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.migration_limit < 0:
            raise ValueError(f"--migration-limit must be >= 0, got {self.migration_limit}")

    @property
    def served_models(self) -> tuple[str, ...]:
        return self.served_model_name or (Path(self.model).resolve().name,)
