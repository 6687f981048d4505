"""`disagg bench compare`: the same trace through several stacks, side by side.

Two comparisons: `modes` runs an aggregated and a disaggregated stack (same model, same total
worker count); `routing` runs one mode twice, with the scheduler's prefix-aware routing off
(`DISAGG_NO_PREFIX_ROUTING=1` in the environment of `disagg up`, which its scheduler reads) and
then on. For each run it starts `disagg up` (worker i pinned to core i mod n of `--cpus`), waits
until it is ready, warms up, sends the identical trace (same seed) in this process while reading
the gateway's prefix-cache counters before and after, and stops the stack before starting the
next; then it reports each metric as a ratio last run / first.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disagg.benchmarks.harness.client import fetch_metrics
from disagg.benchmarks.harness.metrics import RequestRecord, prefix_cache_stats, ratios
from disagg.benchmarks.harness.runner import RunConfig, RunResult, run_trace
from disagg.benchmarks.harness.stack import ForeignCpu, UpProcess
from disagg.benchmarks.harness.workload import TraceRequest

MODES = ("agg", "disagg")


@dataclass(frozen=True)
class StackConfig:
    """What every stack of a comparison shares; only the worker roles or the routing differ."""

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


def up_args(
    mode: str, cfg: StackConfig, label: str | None = None, roles: list[str] | None = None
) -> list[str]:
    """`disagg up` flags for `mode`: agg gets as many aggregated workers as disagg has P + D;
    `roles`, when given, are the role flags instead. Logs go to `cfg.log_dir / label`
    (default: the mode)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if roles is None and mode == "agg":
        roles = ["--mode", "agg", "--decode", str(cfg.workers)]
    elif roles is None:
        roles = ["--mode", "disagg", "--prefill", str(cfg.prefill), "--decode", str(cfg.decode)]
    argv = ["--model", str(cfg.model), *roles, "--kv-memory-gb", str(cfg.kv_memory_gb)]
    argv += ["--dtype", cfg.dtype, "--device", cfg.device, "--log-level", "warning"]
    if cfg.cpus:
        argv += ["--cpus", cfg.cpus]
    if cfg.log_dir is not None:
        argv += ["--log-dir", str(cfg.log_dir / (label or mode))]
    return argv


def default_cpus(workers: int) -> str:
    """The first `workers` cores this process may use; all of them when it has fewer (`disagg
    up` gives worker i core i mod n, so workers then share cores, one torch thread each)."""
    cores = sorted(os.sched_getaffinity(0))
    return ",".join(map(str, cores[:workers]))


NO_PREFIX_ROUTING_ENV = "DISAGG_NO_PREFIX_ROUTING"


@dataclass(frozen=True)
class StackRun:
    """One stack of a comparison: its label in the table, its `disagg up` mode and whether the
    scheduler routes by cached prefix (None: as this process's environment says)."""

    label: str
    mode: str
    prefix_routing: bool | None = None

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The environment of its `disagg up` (passed on to every child, the scheduler too)."""
        env = dict(base)
        if self.prefix_routing is not None:
            env.pop(NO_PREFIX_ROUTING_ENV, None)
        if self.prefix_routing is False:
            env[NO_PREFIX_ROUTING_ENV] = "1"
        return env


def plan_runs(comparison: str, modes: list[str], prefill: int, decode: int) -> list[StackRun]:
    """The stacks to run, in order: one per mode, or prefix routing off then on in one mode (it
    needs a choice: at least two decode workers, or two aggregated ones)."""
    if comparison == "modes":
        return [StackRun(mode, mode) for mode in modes]
    if comparison != "routing":
        raise ValueError(f"compare must be modes or routing, got {comparison!r}")
    if len(modes) != 1:
        raise ValueError(f"--compare routing runs one mode twice: give one of {MODES} in --modes")
    mode = modes[0]
    choices = prefill + decode if mode == "agg" else decode
    if choices < 2:
        raise ValueError(f"prefix routing needs a choice: {mode} has {choices} decode worker(s)")
    return [StackRun("routing-off", mode, False), StackRun("routing-on", mode, True)]


def run_stack(
    run: StackRun,
    stack: StackConfig,
    cfg: RunConfig,
    trace: list[TraceRequest],
    warmup: list[TraceRequest],
    on_done=None,
) -> RunResult:
    """Start the stack of `run`, send the trace, stop the stack (on every exit path). The
    result says how much CPU other processes on this machine took meanwhile and, when the
    gateway counts them, the prefix-cache lookups of the trace."""
    argv, env = up_args(run.mode, stack, run.label), run.env(os.environ)
    log = stack.log_dir / run.label / "up.log" if stack.log_dir is not None else None
    with UpProcess(argv, env=env, ready_timeout_s=stack.ready_timeout_s, log=log) as up:
        cfg = dataclasses.replace(cfg, base_url=up.base_url)
        watch = ForeignCpu({os.getpid()})  # this process and everything it started
        result = asyncio.run(_measure(cfg, trace, warmup, on_done))
        result.other_cpu_share = watch.share()
        return result


async def _measure(cfg: RunConfig, trace, warmup, on_done) -> RunResult:
    """Warm up, then send the trace between two /metrics reads, so the prefix-cache counters
    cover the trace alone."""
    await run_trace(cfg, [], warmup=warmup)
    before = await fetch_metrics(cfg.base_url, cfg.api_key)
    result = await run_trace(cfg, trace, on_done=on_done)
    result.server_stats = prefix_cache_stats(before, await fetch_metrics(cfg.base_url, cfg.api_key))
    return result


def compare_document(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`{"modes": {label: doc}, "ratios": last/first}` (ratios only when two or more ran; the
    key stays "modes" for routing runs too, so readers of earlier results keep working)."""
    out: dict[str, Any] = {"modes": docs}
    labels = list(docs)
    if len(labels) > 1:
        base, other = labels[0], labels[-1]
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
