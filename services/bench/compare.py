"""`disagg bench compare`: the same trace through an aggregated and a disaggregated stack.

For each mode it starts `disagg up` (same model, same total worker count, worker i pinned to core
i of `--cpus`), waits until it is ready, sends the identical trace (same seed) in this process,
and stops the stack before starting the next; then it reports each metric as a ratio
disagg / agg.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disagg.services.bench.metrics import RequestRecord, ratios
from disagg.services.bench.runner import RunConfig, RunResult, run_trace
from disagg.services.bench.stack import ForeignCpu, UpProcess
from disagg.services.bench.workload import TraceRequest

MODES = ("agg", "disagg")


@dataclass(frozen=True)
class StackConfig:
    """What both stacks share; only the worker roles differ."""

    model: Path
    prefill: int = 1
    decode: int = 1
    cpus: str | None = None
    kv_memory_gb: float = 0.5
    dtype: str = "auto"
    device: str = "cpu"
    log_dir: Path | None = None
    ready_timeout_s: float = 300.0

    @property
    def workers(self) -> int:
        return self.prefill + self.decode


def up_args(mode: str, cfg: StackConfig) -> list[str]:
    """`disagg up` flags for `mode`: agg gets as many aggregated workers as disagg has P + D."""
    if mode == "agg":
        roles = ["--mode", "agg", "--decode", str(cfg.workers)]
    elif mode == "disagg":
        roles = ["--mode", "disagg", "--prefill", str(cfg.prefill), "--decode", str(cfg.decode)]
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    argv = ["--model", str(cfg.model), *roles, "--kv-memory-gb", str(cfg.kv_memory_gb)]
    argv += ["--dtype", cfg.dtype, "--device", cfg.device, "--log-level", "warning"]
    if cfg.cpus:
        argv += ["--cpus", cfg.cpus]
    if cfg.log_dir is not None:
        argv += ["--log-dir", str(cfg.log_dir / mode)]
    return argv


def default_cpus(workers: int) -> str | None:
    """The first `workers` cores this process may use (None if it has fewer)."""
    cores = sorted(os.sched_getaffinity(0))
    return ",".join(map(str, cores[:workers])) if len(cores) >= workers else None


def run_mode(
    mode: str,
    stack: StackConfig,
    run: RunConfig,
    trace: list[TraceRequest],
    warmup: list[TraceRequest],
    on_done=None,
) -> RunResult:
    """Start the stack for `mode`, send the trace, stop the stack (on every exit path). The
    result says how much CPU other processes on this machine took meanwhile."""
    log = stack.log_dir / mode / "up.log" if stack.log_dir is not None else None
    with UpProcess(up_args(mode, stack), ready_timeout_s=stack.ready_timeout_s, log=log) as up:
        cfg = dataclasses.replace(run, base_url=up.base_url)
        watch = ForeignCpu({os.getpid()})  # this process and everything it started
        result = asyncio.run(run_trace(cfg, trace, warmup=warmup, on_done=on_done))
        result.other_cpu_share = watch.share()
        return result


def compare_document(
    docs: dict[str, dict[str, Any]], base: str = "agg", other: str = "disagg"
) -> dict[str, Any]:
    """`{"modes": {...}, "ratios": other/base}` (ratios only when both modes ran)."""
    out: dict[str, Any] = {"modes": docs}
    if base in docs and other in docs:
        out["ratios"] = ratios(docs[base], docs[other])
        out["ratios_by_kind"] = {
            kind: ratios(docs[base]["by_kind"][kind], docs[other]["by_kind"].get(kind, {}))
            for kind in docs[base].get("by_kind", {})
        }
    return out


def parse_modes(spec: str) -> list[str]:
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        raise ValueError(f"--modes takes a comma list of {MODES}, got {spec!r}")
    return modes


def stack_config(args: argparse.Namespace, model: Path) -> StackConfig:
    workers = args.prefill + args.decode
    return StackConfig(
        model=model, prefill=args.prefill, decode=args.decode,
        cpus=args.cpus or default_cpus(workers), kv_memory_gb=args.kv_memory_gb,
        dtype=args.dtype, device=args.device, log_dir=args.out_dir / "logs",
        ready_timeout_s=args.ready_timeout_s,
    )  # fmt: skip


def records_of(results: dict[str, RunResult]) -> dict[str, tuple[list[RequestRecord], float]]:
    return {mode: (r.records, r.started_at) for mode, r in results.items()}
