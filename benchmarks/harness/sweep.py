"""`disagg bench sweep`: the seeds' claim measured as DistServe measures it.

For each mode (aggregated, disaggregated: same model, same worker count and cores) one
`disagg up` serves a ladder of Poisson rates (`--rates`), each a trace of the same seed. A
request *attains* when it completed and met every SLO (`--slo`, e.g. `ttft:2000,tpot:200`);
failed requests count as misses. Per rate: the attainment (share of requests). Per mode:
**goodput**, the highest rate with attainment >= 90%, linearly interpolated between the two
ladder rates where it crosses (a lower bound, marked, when every rate attains). And at one rate
(`--scale-rate`, default the ladder's middle) the attainment with every SLO scaled by
0.25 ... 3: how tight an SLO each mode can hold. Prints a table, writes `--json` and two PNGs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from disagg.benchmarks.harness.metrics import RequestRecord, meets_slos

TARGET = 0.9  # DistServe's attainment goal
SLO_SCALES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def attainment(records: Sequence[RequestRecord], slos_ms: Mapping[str, float]) -> float:
    """Share of the requests sent that completed within every SLO (0 for none sent)."""
    if not records:
        return 0.0
    return sum(r.success and meets_slos(r, slos_ms) for r in records) / len(records)


def goodput(points: Sequence[tuple[float, float]], target: float = TARGET) -> tuple[float, bool]:
    """(goodput, bounded) from (rate, attainment) points: the highest rate at >= ``target``,
    interpolated where the curve first falls below it; bounded False when even the highest rate
    attains (the goodput is at least that) and 0.0 when even the lowest does not."""
    points = sorted(points)
    if not points or points[0][1] < target:
        return 0.0, True
    for (r0, a0), (r1, a1) in zip(points, points[1:], strict=False):
        if a1 < target:
            return r0 + (a0 - target) / (a0 - a1) * (r1 - r0), True
    return points[-1][0], False


def slo_scale_curve(
    records: Sequence[RequestRecord], slos_ms: Mapping[str, float], scales=SLO_SCALES
) -> list[dict[str, float]]:
    """Attainment with every SLO multiplied by each scale."""
    return [
        {"scale": s, "attainment": attainment(records, {k: v * s for k, v in slos_ms.items()})}
        for s in scales
    ]


def mode_document(
    by_rate: Mapping[float, Sequence[RequestRecord]], slos_ms: Mapping[str, float], scale_rate
) -> dict[str, Any]:
    """One mode's curve, goodput and SLO-scale curve from its records at each rate."""
    rates = [
        {"rate": rate, "attainment": attainment(recs, slos_ms), "requests": len(recs),
         "completed": sum(r.success for r in recs)}
        for rate, recs in sorted(by_rate.items())
    ]  # fmt: skip
    value, bounded = goodput([(p["rate"], p["attainment"]) for p in rates])
    return {
        "goodput_rps": value,
        "goodput_bounded": bounded,
        "rates": rates,
        "slo_scale": {"rate": scale_rate, "points": slo_scale_curve(by_rate[scale_rate], slos_ms)},
    }


def sweep_document(modes: Mapping[str, dict[str, Any]], slos_ms, config) -> dict[str, Any]:
    out: dict[str, Any] = {"modes": dict(modes), "slos_ms": dict(slos_ms), "config": config}
    agg, dis = modes.get("agg"), modes.get("disagg")
    if agg and dis and agg["goodput_rps"] > 0:
        out["goodput_ratio_disagg_over_agg"] = dis["goodput_rps"] / agg["goodput_rps"]
    return out


def parse_rates(spec: str) -> list[float]:
    rates = sorted({float(r) for r in spec.split(",") if r.strip()})
    if len(rates) < 2 or rates[0] <= 0:
        raise ValueError(f"--rates takes two or more positive rates, got {spec!r}")
    return rates


# -- the shell: stacks, traces, table, plots ---------------------------------------------------


def main_sweep(args: argparse.Namespace) -> int:
    from disagg.benchmarks.harness import compare, report
    from disagg.benchmarks.harness.checkpoint import bench_checkpoint
    from disagg.benchmarks.harness.cli import load_tokenizer
    from disagg.benchmarks.harness.metrics import parse_slos

    slos, rates = parse_slos(args.slo), parse_rates(args.rates)
    if not slos:
        raise ValueError("--slo is needed: attainment is measured against it")
    scale_rate = args.scale_rate or rates[len(rates) // 2]
    if scale_rate not in rates:
        raise ValueError(f"--scale-rate {scale_rate} is not one of --rates {rates}")
    model = args.model or bench_checkpoint()
    tokenizer = load_tokenizer(args.tokenizer or model)
    stack = compare.stack_config(args, model)
    docs = {}
    for mode in compare.parse_modes(args.modes):
        by_rate = _run_mode(args, mode, stack, rates, tokenizer)
        docs[mode] = mode_document(by_rate, slos, scale_rate)
    out = sweep_document(docs, slos, {"model": str(model), "cpus": stack.cpus,
                                      "rates": rates, "seed": args.seed})  # fmt: skip
    _print(out)
    if args.json is not None:
        report.write_json(args.json, out)
        print(f"results: {args.json}")
    print("plots: " + ", ".join(map(str, write_plots(out, args.plot_dir or args.out_dir))))
    return 0


def _run_mode(args, mode: str, stack, rates, tokenizer) -> dict[float, list[RequestRecord]]:
    """One stack for the whole ladder; each rate's trace has the same seed (same prompts)."""
    from disagg.benchmarks.harness import compare
    from disagg.benchmarks.harness.cli import run_config, workload_spec
    from disagg.benchmarks.harness.runner import run_trace
    from disagg.benchmarks.harness.stack import UpProcess
    from disagg.benchmarks.harness.workload import make_trace, warmup_trace

    print(f"{mode}: starting disagg up ...", file=sys.stderr, flush=True)
    argv, out = compare.up_args(mode, stack, mode), {}
    with UpProcess(argv, env=dict(os.environ), ready_timeout_s=stack.ready_timeout_s) as up:
        cfg = run_config(args, up.base_url, None)
        for i, rate in enumerate(rates):
            spec = dataclasses.replace(workload_spec(args), request_rate=rate)
            trace = make_trace(spec, tokenizer)
            warmup = warmup_trace(spec, args.warmup) if i == 0 else []
            result = asyncio.run(run_trace(cfg, trace, warmup=warmup))
            out[rate] = result.records
            print(f"{mode}: {rate:g} req/s done", file=sys.stderr, flush=True)
    return out


def _print(out: dict[str, Any]) -> None:
    modes = out["modes"]
    rates = [p["rate"] for p in next(iter(modes.values()))["rates"]]
    print("attainment (share of requests within every SLO " + str(out["slos_ms"]) + ")")
    print("rate req/s  " + "  ".join(f"{m:>8}" for m in modes))
    for i, rate in enumerate(rates):
        print(
            f"{rate:10g}  "
            + "  ".join(f"{d['rates'][i]['attainment']:8.2f}" for d in modes.values())
        )
    for mode, d in modes.items():
        bound = "" if d["goodput_bounded"] else " (at least: every rate attained)"
        print(f"{mode} goodput {d['goodput_rps']:.3f} req/s{bound}")
    if "goodput_ratio_disagg_over_agg" in out:
        print(f"goodput disagg / agg: {out['goodput_ratio_disagg_over_agg']:.2f}")


def write_plots(out: dict[str, Any], out_dir: Path) -> list[Path]:
    """Attainment vs rate, and vs SLO scale, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, key, xlabel in (
        ("sweep-attainment-vs-rate.png", "rates", "request rate (req/s)"),
        ("sweep-attainment-vs-slo-scale.png", "slo_scale", "SLO scale"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        try:
            for mode, d in out["modes"].items():
                pts = d["rates"] if key == "rates" else d["slo_scale"]["points"]
                xs = [p["rate" if key == "rates" else "scale"] for p in pts]
                ax.plot(xs, [p["attainment"] for p in pts], marker="o", label=mode)
            ax.axhline(TARGET, color="grey", linestyle="--", label=f"{TARGET:.0%}")
            ax.set(xlabel=xlabel, ylabel="SLO attainment", ylim=(0, 1.05))
            ax.grid(True, alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(out_dir / name)
        finally:
            plt.close(fig)
        paths.append(out_dir / name)
    return paths


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", default="0.25,0.5,1,2", help="Poisson rates, req/s (the ladder)")
    p.add_argument("--scale-rate", type=float, default=None, help="rate of the SLO-scale curve")
