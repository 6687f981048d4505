"""`disagg bench run` (load generator against a URL) and `disagg bench compare` (the same trace
through an aggregated and a disaggregated stack, side by side).

Heavy imports (httpx, rich, matplotlib) wait until a bench command runs: this module is imported
whenever the `disagg` parser is built.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import signal
import sys
from pathlib import Path
from typing import Any

from disagg.benchmarks.harness.workload import WORKLOADS, WorkloadSpec

COMPARE_DEFAULTS = dict(
    input_len=32, long_input_len=512, long_output_len=8, long_every=4, request_rate=1.0,
    duration_s=60.0, warmup=2, slo="ttft:3000,tpot:250",
)  # fmt: skip
# Defaults that depend on what `compare` compares; None in the parser, filled in by
# `with_compare_defaults`. routing: one shared-prefix trace, a choice of two decode workers.
COMPARISON_DEFAULTS = {
    "modes": dict(workload="mixed", output_len=64, modes="agg,disagg", decode=1),
    "routing": dict(workload="shared-prefix", output_len=16, modes="disagg", decode=2),
}


CONTENDED_SHARE = 0.05  # of all cores: above this, other work visibly slowed the run


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `bench` with its subcommands `run` and `compare` to the `disagg` parser."""
    p = sub.add_parser("bench", help="load generator; aggregated vs disaggregated side by side")
    bench = p.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    run = bench.add_parser("run", help="send a workload to an OpenAI-compatible server")
    run.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    run.add_argument("--model", default=None, help="model name (default: the server's first)")
    run.add_argument("--label", default="run", help="name of this run in the table and plots")
    run.add_argument("--api-key", default=None)
    _add_trace_args(run, {})
    run.set_defaults(run=needs_bench_extra(main_run))
    cmp = bench.add_parser(
        "compare",
        help="start agg and disagg stacks (or prefix routing off and on), same trace, ratios",
        epilog=_comparison_defaults_text(),
    )
    _add_compare_args(cmp)
    _add_trace_args(cmp, COMPARE_DEFAULTS | dict.fromkeys(("workload", "output_len")))
    cmp.set_defaults(run=needs_bench_extra(main_compare))
    _add_sweep(bench)
    _add_phased(bench)


def _add_sweep(bench: argparse._SubParsersAction) -> None:
    from disagg.benchmarks.harness import sweep

    p = bench.add_parser(
        "sweep", help="agg and disagg over a ladder of Poisson rates: SLO attainment, goodput"
    )
    _add_compare_args(p)
    sweep.add_sweep_args(p)
    _add_trace_args(p, COMPARE_DEFAULTS | {"duration_s": 30.0})
    p.set_defaults(run=needs_bench_extra(sweep.main_sweep), **COMPARISON_DEFAULTS["modes"])


def _add_phased(bench: argparse._SubParsersAction) -> None:
    from disagg.benchmarks.harness import phased

    p = bench.add_parser(
        "phased", help="a load that changes phase: fixed worker splits vs --autoscale"
    )
    p.add_argument("--cpus", default=None, help="worker i gets core i mod n (default: first 2)")
    _add_stack_args(p)
    phased.add_phased_args(p)
    p.set_defaults(run=needs_bench_extra(phased.main_phased))


BENCH_EXTRA = ("httpx", "rich", "matplotlib")  # pyproject's `bench` extra


def needs_bench_extra(command):
    """``command``, refusing with one line (exit 2) when the bench extra is not installed."""

    def run(args: argparse.Namespace) -> int:
        missing = [m for m in BENCH_EXTRA if importlib.util.find_spec(m) is None]
        if missing:
            print(
                f"disagg bench: error: {', '.join(missing)} not installed; "
                "pip install 'disagg[bench]'",
                file=sys.stderr,
            )
            return 2
        return command(args)

    return run


def _add_trace_args(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    d = {**vars(WorkloadSpec()), "warmup": 1, "slo": None} | defaults
    d["num_prompts"] = defaults.get("num_prompts")
    d["duration_s"] = defaults.get("duration_s")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--workload", choices=WORKLOADS, default=d["workload"])
    p.add_argument("--input-len", type=int, default=d["input_len"], help="shared-prefix: suffix")
    for name in ("output_len", "long_input_len", "long_output_len", "long_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=d[name])
    p.add_argument("--prefix-len", type=int, default=d["prefix_len"], help="shared ids/group")
    p.add_argument("--num-prefixes", type=int, default=d["num_prefixes"], help="groups")
    p.add_argument("--range-ratio", type=float, default=d["range_ratio"], help="random workload")
    p.add_argument("--vocab-size", type=int, default=d["vocab_size"], help="prompt ids < this")
    p.add_argument("--dataset", type=Path, default=None, help="ShareGPT JSON (sharegpt workload)")
    p.add_argument("--tokenizer", type=Path, default=None, help="HF folder: sharegpt, chat")
    p.add_argument("--request-rate", type=float, default=d["request_rate"], help="Poisson, /s")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=d["num_prompts"], help="default 32")
    p.add_argument("--duration-s", type=float, default=d["duration_s"], help="stop sending after")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="requests before measuring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", default=d["slo"], help="goodput SLOs in ms, e.g. ttft:500,tpot:50")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot-dir", type=Path, default=None, help="write PNG plots here")
    p.add_argument("--no-progress", action="store_true")


def _add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compare", choices=tuple(COMPARISON_DEFAULTS), default="modes",
        help="modes: one stack per --modes; routing: one --modes stack with the scheduler's "
        "prefix routing off, then on",
    )  # fmt: skip
    p.add_argument("--modes", default=None, help="comma list of agg, disagg")
    p.add_argument("--prefill", type=int, default=1, help="disagg prefill workers")
    p.add_argument("--decode", type=int, default=None, help="disagg decode workers (agg: P + D)")
    p.add_argument("--cpus", default=None, help="worker i gets core i mod n (default: first P + D)")
    _add_stack_args(p)


def _add_stack_args(p: argparse.ArgumentParser) -> None:
    """What every stack a bench command starts takes."""
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: ~100M Llama)")
    p.add_argument("--kv-memory-gb", type=float, default=0.5)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ready-timeout-s", type=float, default=300.0)
    p.add_argument("--out-dir", type=Path, default=Path("bench-out"), help="plots and logs")


def _comparison_defaults_text() -> str:
    return "defaults that depend on --compare: " + "; ".join(
        f"{name}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items())
        for name, d in COMPARISON_DEFAULTS.items()
    )


def with_compare_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the defaults of its --compare filled in where no flag was given."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    return argparse.Namespace(**(vars(args) | COMPARISON_DEFAULTS[args.compare] | given))


# -- shared -----------------------------------------------------------------------------------


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    num_prompts = args.num_prompts
    if num_prompts is None and args.duration_s is None:
        num_prompts = 32
    return WorkloadSpec(
        workload=args.workload, input_len=args.input_len, output_len=args.output_len,
        range_ratio=args.range_ratio, long_input_len=args.long_input_len,
        long_output_len=args.long_output_len, long_every=args.long_every,
        prefix_len=args.prefix_len, num_prefixes=args.num_prefixes, vocab_size=args.vocab_size,
        request_rate=args.request_rate, num_prompts=num_prompts,
        duration_s=args.duration_s, seed=args.seed, dataset_path=args.dataset,
    )  # fmt: skip


def load_tokenizer(folder: Path | None):
    if folder is None:
        return None
    from disagg.shared.tokenizer import Tokenizer

    return Tokenizer(folder)


def run_config(args: argparse.Namespace, base_url: str, model: str | None):
    from disagg.benchmarks.harness.runner import RunConfig

    return RunConfig(
        base_url=base_url, endpoint=args.endpoint, model=model,
        max_concurrency=args.max_concurrency, duration_s=args.duration_s,
        request_timeout_s=args.request_timeout_s, api_key=getattr(args, "api_key", None),
    )  # fmt: skip


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The flags, JSON-ready (infinite rate as the string "inf")."""
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "run"}
    if math.isinf(out.get("request_rate", 0.0)):
        out["request_rate"] = "inf"
    return out


class Progress:
    """A rich progress bar over completed requests (a no-op with --no-progress)."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(transient=True)

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def task(self, label: str, total: int | None):
        """A callback that advances a new bar by one per finished request."""
        if self.bar is None:
            return None
        task = self.bar.add_task(label, total=total)
        return lambda _rec: self.bar.advance(task)


def _stop_on_sigterm() -> None:
    # SIGTERM unwinds like Ctrl-C, so every `finally` (and so every stack stop) runs.
    def handler(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


# -- run --------------------------------------------------------------------------------------


def main_run(args: argparse.Namespace) -> int:
    """`disagg bench run`: send the trace to --url, print the table, write JSON and plots."""
    from disagg.benchmarks.harness import report
    from disagg.benchmarks.harness.metrics import parse_slos
    from disagg.benchmarks.harness.runner import run_trace
    from disagg.benchmarks.harness.workload import make_trace, warmup_trace

    slos, spec = parse_slos(args.slo), workload_spec(args)
    tokenizer = load_tokenizer(args.tokenizer)
    trace, warmup = make_trace(spec, tokenizer), warmup_trace(spec, args.warmup)
    detok = tokenizer.decode if tokenizer is not None else None
    with Progress(not args.no_progress) as progress:
        on_done = progress.task(args.label, len(trace))
        cfg = run_config(args, args.url, args.model)
        coro = run_trace(cfg, trace, warmup=warmup, detokenize=detok, on_done=on_done)
        result = asyncio.run(coro)
    doc = report.result_document(result.records, slos, config_of(args) | {"model": result.model})
    report.print_table(report.render_table({args.label: doc}, title=f"disagg bench {args.url}"))
    report.print_failures({args.label: doc})
    _write_outputs(args, doc, {args.label: (result.records, result.started_at)})
    return 0 if doc["completed"] else 1


def _write_outputs(args: argparse.Namespace, doc: dict, runs: dict) -> None:
    from disagg.benchmarks.harness import report

    if args.json is not None:
        report.write_json(args.json, doc)
        print(f"results: {args.json}")
    if args.plot_dir is not None:
        paths = report.write_plots(runs, args.plot_dir, prefix="")
        print("plots: " + ", ".join(map(str, paths)))


# -- compare ----------------------------------------------------------------------------------


def main_compare(args: argparse.Namespace) -> int:
    """`disagg bench compare`: one stack per run (each mode, or prefix routing off and on), the
    same trace through each, ratios last run / first."""
    from disagg.benchmarks.harness import compare, report
    from disagg.benchmarks.harness.checkpoint import bench_checkpoint
    from disagg.benchmarks.harness.metrics import parse_slos
    from disagg.benchmarks.harness.workload import make_trace, warmup_trace

    _stop_on_sigterm()
    args = with_compare_defaults(args)
    runs = compare.plan_runs(
        args.compare, compare.parse_modes(args.modes), args.prefill, args.decode
    )
    slos, spec = parse_slos(args.slo), workload_spec(args)
    model = args.model or bench_checkpoint()
    tokenizer = load_tokenizer(args.tokenizer or model)
    trace, warmup = make_trace(spec, tokenizer), warmup_trace(spec, args.warmup)
    stack = compare.stack_config(args, model)
    print(_describe(stack, trace), flush=True)
    results = _run_stacks(args, runs, stack, trace, warmup)
    config = config_of(args) | {"model": str(model), "cpus": stack.cpus}
    docs = {label: _run_document(r, slos, config) for label, r in results.items()}
    out = compare.compare_document(docs)
    report.print_table(report.render_table(docs, out.get("ratios"), title=_title(args, runs)))
    report.print_failures(docs)
    _warn_contention(docs)
    _write_compare_outputs(args, out, compare.records_of(results))
    return 0 if all(d["completed"] for d in docs.values()) else 1


def _run_document(result, slos: dict, config: dict) -> dict:
    from disagg.benchmarks.harness import report

    doc = report.result_document(result.records, slos, config)
    return doc | {"other_cpu_share": result.other_cpu_share} | result.server_stats


def _title(args: argparse.Namespace, runs) -> str:
    if args.compare == "routing":
        return f"disagg bench compare: prefix routing ({runs[0].mode})"
    return "disagg bench compare"


def _describe(stack, trace) -> str:
    kinds = {k: sum(r.kind == k for r in trace) for k in sorted({r.kind for r in trace})}
    return (
        f"model {stack.model}; {len(trace)} requests {kinds}; worker i pinned to core i mod n of "
        f"{stack.cpus}; gateway, scheduler, NATS and this load generator are not pinned; "
        f"logs in {stack.log_dir}"
    )


def _warn_contention(docs: dict) -> None:
    for label, doc in docs.items():
        share = doc.get("other_cpu_share")
        if share is not None:
            note = "; its latencies are inflated" if share > CONTENDED_SHARE else ""
            print(f"{label}: other processes used {share:.0%} of this machine's CPU{note}")


def _run_stacks(args, runs, stack, trace, warmup) -> dict:
    from disagg.benchmarks.harness import compare

    results = {}
    with Progress(not args.no_progress) as progress:
        for run in runs:
            print(f"{run.label}: starting disagg up ...", file=sys.stderr, flush=True)
            on_done = progress.task(run.label, len(trace))
            cfg = run_config(args, "http://unset", None)
            results[run.label] = compare.run_stack(run, stack, cfg, trace, warmup, on_done)
    return results


def _write_compare_outputs(args: argparse.Namespace, out: dict, runs: dict) -> None:
    from disagg.benchmarks.harness import report

    if args.json is not None:
        report.write_json(args.json, out)
        print(f"results: {args.json}")
    plot_dir = args.plot_dir or args.out_dir
    paths = report.write_plots(runs, plot_dir, prefix="compare-")
    print("plots: " + ", ".join(map(str, paths)))
