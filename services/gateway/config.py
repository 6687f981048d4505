"""The gateway's one config; its fields are its flags (``disagg gateway --help``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from disagg.services.gateway.openai.tools import PARSERS
from disagg.shared.config import group, option
from disagg.shared.protocol.messages import MAX_FORKS
from disagg.shared.protocol.types import Role, check_id
from disagg.shared.service import ServiceConfig

ANY_ROLE = "any"


@dataclass(frozen=True)
class Timeouts:
    """Every bounded wait of a request, in seconds."""

    # Above the scheduler's --max-hold-s (20 s): a placement held for decode room gets the
    # scheduler's answer (placed, or 429 after the hold), not a 504 from giving up first.
    place_s: float = option(
        30.0, help="placement; keep it above the schedulers' --max-hold-s",
        flag="--place-timeout-s",
    )  # fmt: skip
    admit_s: float = option(10.0, help="decode worker reserving blocks", flag="--admit-timeout-s")
    job_s: float = option(10.0, help="prefill worker accepting a job", flag="--job-timeout-s")
    first_token_s: float = option(120.0, help="first token", flag="--first-token-timeout-s")
    inter_token_s: float = option(60.0, help="gap between tokens", flag="--inter-token-timeout-s")
    resync_s: float = option(
        5.0, help="stream silence after a NATS reconnection that means chunks were lost",
        flag="--resync-timeout-s",
    )  # fmt: skip

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"{f.metadata['option']['flag']} must be positive")


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
    max_choices: int = option(
        16, help=f"choices one request may ask for (prompts x n), at most {MAX_FORKS + 1}"
    )
    timeouts: Timeouts = group(Timeouts)
    migration_limit: int = option(3, help="moves of one request to new workers")
    nats_probe_s: float = option(
        5.0, help="probe a streamed NATS API request's inbox this often; abort when none is left"
    )
    drain_timeout_s: float = option(30.0, help="SIGTERM: finish requests within")
    api_key: tuple[str, ...] = option((), help="required Bearer key(s), comma separated",
                                      secret=True)  # fmt: skip
    tool_call_parser: str | None = option(
        None, help="how 'auto' tool calls are read from the output: hermes, or none "
        "(default: hermes when the chat template writes <tool_call>, else none)",
    )  # fmt: skip
    expect_workers: str | None = option(
        None, help="live workers the stack should have, e.g. prefill=1,decode=2 (or both=2; "
        "any=2 counts every role): /health says which are short (degraded)",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.id is not None:
            check_id("--id", self.id)
        for name in ("max_concurrent_requests", "max_body_bytes", "drain_timeout_s",
                     "max_stop_strings", "nats_probe_s"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if not 1 <= self.max_choices <= MAX_FORKS + 1:
            raise ValueError(f"--max-choices must be in [1, {MAX_FORKS + 1}]")
        if self.migration_limit < 0:
            raise ValueError(f"--migration-limit must be >= 0, got {self.migration_limit}")
        if self.tool_call_parser not in (None, "none", *PARSERS):
            raise ValueError(f"--tool-call-parser must be one of none, {', '.join(PARSERS)}")
        self.expected_workers()  # raises on a bad spec

    def expected_workers(self) -> dict[str, int]:
        """--expect-workers as {role: count} ("worker", as `disagg up` names it, is "both";
        "any" counts workers of every role: roles that switch)."""
        expected: dict[str, int] = {}
        for item in filter(None, (self.expect_workers or "").split(",")):
            role, _, count = item.partition("=")
            role = {"worker": "both"}.get(role.strip(), role.strip())
            if role not in {r.value for r in Role} | {ANY_ROLE} or not count.strip().isdigit():
                raise ValueError(f"--expect-workers: {item!r} is not role=count")
            expected[role] = int(count)
        return expected

    @property
    def served_models(self) -> tuple[str, ...]:
        return self.served_model_name or (Path(self.model).resolve().name,)
