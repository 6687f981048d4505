"""`disagg bench phased`: a load that changes phase, through fixed worker splits and the
autoscaler, on the same cores.

The trace is a sequence of steady phases of `--phase-s` seconds each (`--phases`, default
`prompts,outputs`): *prompts* sends long prompts with short outputs (prefill-bound), *outputs*
short prompts with long outputs (decode-bound), each a Poisson stream of its own rate and seed.
The same trace goes through each configuration (`--configs`) of the same two workers, one
`disagg up` at a time: `1p1d` (a prefill and a decode worker), `2agg` (two aggregated),
`1p1agg` (a prefill and an aggregated worker) and `autoscale` (started as 1p1d, `--autoscale`:
the planner switches roles as the load moves, its SLOs those of `--slo`). For each it reports
SLO attainment over the whole run and per phase and the failed requests; while a stack serves,
the workers' heartbeats on NATS give each worker's role over time, from which it counts the
role changes in the last `--quiet-s` of each phase (a planner that settles makes none) and
draws the roles-over-time plot.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disagg.benchmarks.harness.metrics import RequestRecord, distribution_ms, tpot_s, ttft_s
from disagg.benchmarks.harness.sweep import attainment
from disagg.benchmarks.harness.workload import TraceRequest, WorkloadSpec, make_trace

CONFIGS: dict[str, list[str]] = {
    "1p1d": ["--mode", "disagg", "--prefill", "1", "--decode", "1"],
    "2agg": ["--mode", "agg", "--decode", "2"],
    "1p1agg": ["--mode", "disagg", "--prefill", "1", "--decode", "0", "--both", "1"],
    "autoscale": ["--mode", "disagg", "--prefill", "1", "--decode", "1", "--autoscale"],
}
PHASE_KINDS = ("prompts", "outputs")
SWITCHING = "switching"  # a worker's state while it drains toward another role


@dataclass(frozen=True)
class Phase:
    kind: str  # one of PHASE_KINDS
    start_s: float
    duration_s: float

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


@dataclass(frozen=True)
class PhaseLoad:
    """Lengths and Poisson rate of each phase kind."""

    prompt_len: dict[str, int]
    output_len: dict[str, int]
    rate: dict[str, float]


def plan_phases(kinds: Sequence[str], duration_s: float) -> list[Phase]:
    bad = set(kinds) - set(PHASE_KINDS)
    if not kinds or bad:
        raise ValueError(f"--phases takes a comma list of {PHASE_KINDS}, got {list(kinds)}")
    return [Phase(k, i * duration_s, duration_s) for i, k in enumerate(kinds)]


def phased_trace(
    phases: Sequence[Phase], load: PhaseLoad, seed: int, vocab_size: int
) -> list[TraceRequest]:
    """Each phase's own fixed-length Poisson trace (seed + its index), shifted to its start."""
    trace: list[TraceRequest] = []
    for i, phase in enumerate(phases):
        spec = WorkloadSpec(
            workload="fixed", input_len=load.prompt_len[phase.kind],
            output_len=load.output_len[phase.kind], request_rate=load.rate[phase.kind],
            num_prompts=None, duration_s=phase.duration_s, seed=seed + i, vocab_size=vocab_size,
        )  # fmt: skip
        for req in make_trace(spec):
            at = phase.start_s + req.arrival_s
            trace.append(dataclasses.replace(req, index=len(trace), kind=phase.kind, arrival_s=at))
    return trace


def phase_of(phases: Sequence[Phase], t: float) -> Phase | None:
    return next((p for p in phases if p.start_s <= t < p.end_s), None)


def late_changes(
    timeline: Mapping[str, Sequence[tuple[float, str]]], phases: Sequence[Phase], quiet_s: float
) -> dict[str, int]:
    """Per phase (by index and kind), role changes of any worker in its last ``quiet_s``."""
    out: dict[str, int] = {}
    for i, phase in enumerate(phases):
        lo = phase.end_s - min(quiet_s, phase.duration_s)
        out[f"{i}:{phase.kind}"] = sum(
            lo <= t < phase.end_s for changes in timeline.values() for t, _ in changes[1:]
        )
    return out


def config_document(
    records: Sequence[RequestRecord],
    started_at: float,
    phases: Sequence[Phase],
    slos_ms: Mapping[str, float],
    timeline: Mapping[str, Sequence[tuple[float, str]]],
    quiet_s: float,
) -> dict[str, Any]:
    """Attainment over the run and per phase (by sending time), failures, the roles' timeline."""
    by_phase: dict[str, list[RequestRecord]] = {}
    for rec in records:
        phase = phase_of(phases, rec.sent_at - started_at)
        key = f"{phases.index(phase)}:{phase.kind}" if phase else "after"
        by_phase.setdefault(key, []).append(rec)
    failed = [r for r in records if not r.success]
    return {
        "attainment": attainment(records, slos_ms),
        "requests": len(records),
        "failed": len(failed),
        "first_error": failed[0].error if failed else None,
        "phases": {k: _phase_stats(v, slos_ms) for k, v in sorted(by_phase.items())},
        "roles": {w: [[round(t, 2), role] for t, role in ch] for w, ch in timeline.items()},
        "late_role_changes": late_changes(timeline, phases, quiet_s),
    }


def _phase_stats(records: Sequence[RequestRecord], slos_ms) -> dict[str, Any]:
    ok = [r for r in records if r.success]
    tpots = [t for r in ok if (t := tpot_s(r)) is not None]
    return {
        "attainment": attainment(records, slos_ms),
        "requests": len(records),
        "failed": len(records) - len(ok),
        **distribution_ms("ttft", [ttft_s(r) for r in ok]),
        **distribution_ms("tpot", tpots),
    }


def verdict(docs: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The autoscaler against the best fixed configuration that ran."""
    fixed = {k: d["attainment"] for k, d in docs.items() if k != "autoscale"}
    if "autoscale" not in docs or not fixed:
        return {}
    best = max(fixed, key=fixed.get)
    auto = docs["autoscale"]
    return {
        "best_fixed": best,
        "best_fixed_attainment": fixed[best],
        "autoscale_attainment": auto["attainment"],
        "autoscale_at_least_best_fixed": auto["attainment"] >= fixed[best],
        "autoscale_failed": auto["failed"],
        "autoscale_late_role_changes": sum(auto["late_role_changes"].values()),
    }


# -- the shell: stacks, the roles recorder, table, plot ----------------------------------------


class RoleRecorder:
    """Each worker's role over time from the heartbeats on NATS: (perf_counter, role) at each
    change, "switching" while it drains toward another role."""

    def __init__(self, nats_url: str, namespace: str = "disagg") -> None:
        self.nats_url, self.namespace = nats_url, namespace
        self.changes: dict[str, list[tuple[float, str]]] = {}
        self._nc = None

    async def start(self) -> None:
        import nats

        from disagg.shared.protocol.subjects import Subjects

        self._nc = await asyncio.wait_for(nats.connect(self.nats_url), 10)
        await self._nc.subscribe(Subjects(self.namespace).heartbeat, cb=self._on_beat)

    async def stop(self) -> None:
        if self._nc is not None:
            await self._nc.close()

    async def _on_beat(self, msg) -> None:
        from disagg.shared.protocol.codec import decode
        from disagg.shared.protocol.messages import Heartbeat
        from disagg.shared.protocol.types import MessageError

        try:
            beat = decode(Heartbeat, msg.data)
        except MessageError:
            return
        role = SWITCHING if beat.switching_to else str(beat.role)
        changes = self.changes.setdefault(beat.worker_id, [])
        if not changes or changes[-1][1] != role:
            changes.append((time.perf_counter(), role))

    def timeline(self, origin: float) -> dict[str, list[tuple[float, str]]]:
        """Changes relative to ``origin``, each worker's first role from 0 (the role held at
        ``origin``, or its first heard after: heartbeats come once a second)."""
        out = {}
        for worker, changes in sorted(self.changes.items()):
            before = [c for c in changes if c[0] <= origin][-1:]
            after = [(t - origin, r) for t, r in changes if t > origin]
            if not before:  # first heard after the origin: that role from 0
                before, after = after[:1], after[1:]
            out[worker] = [(0.0, before[0][1]), *after] if before else []
        return out


def main_phased(args: argparse.Namespace) -> int:
    from disagg.benchmarks.harness import compare, report
    from disagg.benchmarks.harness.checkpoint import bench_checkpoint
    from disagg.benchmarks.harness.metrics import parse_slos

    slos = parse_slos(args.slo)
    if not {"ttft", "tpot"} <= set(slos):
        raise ValueError("--slo needs ttft and tpot: the planner is given both")
    phases = plan_phases([k.strip() for k in args.phases.split(",")], args.phase_s)
    load = PhaseLoad(
        prompt_len={"prompts": args.long_prompt_len, "outputs": args.short_prompt_len},
        output_len={"prompts": args.short_output_len, "outputs": args.long_output_len},
        rate={"prompts": args.prompts_rate, "outputs": args.outputs_rate},
    )
    trace = phased_trace(phases, load, args.seed, args.vocab_size)
    configs = [c.strip() for c in args.configs.split(",")]
    if not configs or set(configs) - set(CONFIGS):
        raise ValueError(f"--configs takes a comma list of {tuple(CONFIGS)}")
    model = args.model or bench_checkpoint()
    stack = compare.StackConfig(
        model=model, prefill=1, decode=1, cpus=args.cpus or compare.default_cpus(2),
        kv_memory_gb=args.kv_memory_gb, dtype=args.dtype, device=args.device,
        log_dir=args.out_dir / "logs", ready_timeout_s=args.ready_timeout_s,
    )  # fmt: skip
    print(f"{len(trace)} requests over {[p.kind for p in phases]}, {args.phase_s:g} s each; "
          f"cores {stack.cpus}; logs in {stack.log_dir}", flush=True)  # fmt: skip
    docs = {}
    for label in configs:
        roles = CONFIGS[label] + (_planner_flags(args, slos) if label == "autoscale" else [])
        result, timeline = _run_config(args, label, roles, stack, trace)
        doc = config_document(result.records, result.started_at, phases, slos, timeline,
                              args.quiet_s)  # fmt: skip
        docs[label] = doc | {"other_cpu_share": result.other_cpu_share}
    config = {"model": str(model), "cpus": stack.cpus, "seed": args.seed,
              "load": dataclasses.asdict(load), "machine": report.machine_info()}  # fmt: skip
    out = {"configs": docs, "verdict": verdict(docs), "slos_ms": slos,
           "phases": [dataclasses.asdict(p) for p in phases], "config": config}  # fmt: skip
    _print(out)
    if args.json is not None:
        report.write_json(args.json, out)
        print(f"results: {args.json}")
    print(f"plot: {write_plot(out, args.plot_dir or args.out_dir)}")
    return 0 if not any(d["failed"] for d in docs.values()) else 1


def _planner_flags(args: argparse.Namespace, slos: Mapping[str, float]) -> list[str]:
    return ["--planner-ttft-slo-ms", str(slos["ttft"]), "--planner-itl-slo-ms", str(slos["tpot"]),
            *args.planner_flags.split()]  # fmt: skip


def _run_config(args, label: str, roles: list[str], stack, trace):
    from disagg.benchmarks.harness import compare
    from disagg.benchmarks.harness.cli import run_config
    from disagg.benchmarks.harness.runner import run_trace
    from disagg.benchmarks.harness.stack import ForeignCpu, UpProcess
    from disagg.benchmarks.harness.workload import warmup_trace

    argv = compare.up_args("disagg", stack, label, roles=roles)
    print(f"{label}: starting disagg up ...", file=sys.stderr, flush=True)
    log, env = stack.log_dir / label / "up.log", dict(os.environ)
    with UpProcess(argv, env=env, ready_timeout_s=stack.ready_timeout_s, log=log) as up:
        cfg = dataclasses.replace(run_config(args, up.base_url, None), duration_s=None)
        warmup = warmup_trace(WorkloadSpec(input_len=32, vocab_size=args.vocab_size), args.warmup)

        async def measure():
            recorder = RoleRecorder(f"nats://127.0.0.1:{up.nats_port}")
            await recorder.start()
            try:
                result = await run_trace(cfg, trace, warmup=warmup)
            finally:
                await recorder.stop()
            return result, recorder

        watch = ForeignCpu({os.getpid()})  # this process and everything it started
        result, recorder = asyncio.run(measure())
        result.other_cpu_share = watch.share()
    print(f"{label}: done", file=sys.stderr, flush=True)
    return result, recorder.timeline(result.started_at)


def _print(out: dict[str, Any]) -> None:
    docs = out["configs"]
    keys = list(next(iter(docs.values()))["phases"])
    print("SLO attainment " + str(out["slos_ms"]) + " (share of requests, by sending phase)")
    print(f"{'config':>10}  {'all':>6}  " + "  ".join(f"{k:>12}" for k in keys)
          + f"  {'failed':>6}  late changes")  # fmt: skip
    for label, d in docs.items():
        cells = "  ".join(f"{d['phases'].get(k, {}).get('attainment', 0):12.2f}" for k in keys)
        late = sum(d["late_role_changes"].values())
        share = d.get("other_cpu_share")
        other = "" if share is None else f"  (other processes: {share:.0%} of the CPU)"
        print(f"{label:>10}  {d['attainment']:6.2f}  {cells}  {d['failed']:6d}  {late}{other}")
    v = out["verdict"]
    if v:
        word = "at least" if v["autoscale_at_least_best_fixed"] else "BELOW"
        print(f"autoscale {v['autoscale_attainment']:.2f} is {word} the best fixed "
              f"({v['best_fixed']} {v['best_fixed_attainment']:.2f})")  # fmt: skip


ROLE_COLORS = {"prefill": "tab:orange", "decode": "tab:blue", "both": "tab:green",
               SWITCHING: "tab:grey"}  # fmt: skip


def write_plot(out: dict[str, Any], out_dir: Path) -> Path:
    """Each worker's role over time, one panel per configuration, phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs, phases = out["configs"], out["phases"]
    end = phases[-1]["start_s"] + phases[-1]["duration_s"]
    fig, axes = plt.subplots(len(docs), 1, figsize=(9, 1.3 + 1.1 * len(docs)), dpi=110,
                             sharex=True, squeeze=False)  # fmt: skip
    try:
        for ax, (label, doc) in zip(axes[:, 0], docs.items(), strict=True):
            for i, p in enumerate(phases):
                ax.axvspan(p["start_s"], p["start_s"] + p["duration_s"], alpha=0.08 * (1 + i % 2),
                           color="k")  # fmt: skip
            for row, changes in enumerate(doc["roles"].values()):
                for (t, role), nxt in zip(changes, [*changes[1:], [end, None]], strict=True):
                    ax.barh(row, max(0.0, nxt[0] - t), left=t, color=ROLE_COLORS.get(role, "k"))
            ax.set_yticks(range(len(doc["roles"])), list(doc["roles"]), fontsize=7)
            ax.set_title(f"{label}: attainment {doc['attainment']:.2f}", fontsize=9, loc="left")
        axes[-1, 0].set_xlabel("seconds into the trace (phases shaded)")
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ROLE_COLORS.values()]
        fig.legend(handles, list(ROLE_COLORS), loc="upper right", ncol=4, fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "phased-roles.png"
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def add_phased_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {tuple(CONFIGS)}")
    p.add_argument("--phases", default="prompts,outputs", help="comma list of prompts, outputs")
    p.add_argument("--phase-s", type=float, default=60.0, help="each phase lasts this long")
    p.add_argument("--quiet-s", type=float, default=30.0, help="a phase's end with no change")
    p.add_argument("--long-prompt-len", type=int, default=512, help="prompts phase")
    p.add_argument("--short-output-len", type=int, default=8, help="prompts phase")
    p.add_argument("--prompts-rate", type=float, default=0.8, help="prompts phase, req/s")
    p.add_argument("--short-prompt-len", type=int, default=32, help="outputs phase")
    p.add_argument("--long-output-len", type=int, default=128, help="outputs phase")
    p.add_argument("--outputs-rate", type=float, default=3.0, help="outputs phase, req/s")
    p.add_argument("--planner-flags", default="--planner-cooldown-s 5",
                   help="more `disagg up --planner-*` flags for the autoscale run")  # fmt: skip
    p.add_argument("--vocab-size", type=int, default=256, help="prompt ids < this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", default="ttft:3000,tpot:150", help="ms: ttft and tpot (planner's too)")
    p.add_argument("--warmup", type=int, default=2, help="requests before measuring")
    p.add_argument("--endpoint", choices=("completions",), default="completions")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--duration-s", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot-dir", type=Path, default=None, help="write the PNG here")
