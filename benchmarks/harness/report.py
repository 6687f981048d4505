"""Results out: the rich table, the JSON document and the PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from disagg.benchmarks.harness.metrics import (
    RequestRecord,
    itl_timeline,
    itls_s,
    per_request,
    summarize,
    ttft_s,
)

# (label, key, scale, format) of the rows the table shows; the JSON has every key.
ROWS: tuple[tuple[str, str, float, str], ...] = (
    ("completed", "completed", 1, "{:.0f}"),
    ("failed", "failed", 1, "{:.0f}"),
    ("duration s", "duration", 1, "{:.1f}"),
    ("input tokens", "total_input_tokens", 1, "{:.0f}"),
    ("output tokens", "total_output_tokens", 1, "{:.0f}"),
    ("request throughput /s", "request_throughput", 1, "{:.3f}"),
    ("output throughput tok/s", "output_throughput", 1, "{:.2f}"),
    ("goodput req/s", "request_goodput", 1, "{:.3f}"),
    *(
        (f"{stat} {name.upper()} ms", f"{key}_{name}_ms", 1, "{:.1f}")
        for name in ("ttft", "tpot", "itl", "e2el")
        for stat, key in (
            ("mean", "mean"),
            ("p50", "median"),
            ("p90", "p90"),
            ("p99", "p99"),
            ("p99.9", "p99.9"),
        )
    ),
    ("prefix cache hit %", "prefix_cache_hit_rate", 100, "{:.1f}"),
)
OPTIONAL_ROWS = frozenset({"prefix_cache_hit_rate"})  # shown only when some run has a value


def result_document(
    records: Sequence[RequestRecord],
    slos_ms: Mapping[str, float],
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON of one run: vLLM's keys, per-request lists, per-kind summaries, the config."""
    summary = summarize(records, slos_ms)
    kinds = sorted({r.kind for r in records})
    by_kind = {
        k: summarize([r for r in records if r.kind == k], slos_ms, summary["duration"])
        for k in kinds
    }
    extra = {"slos_ms": dict(slos_ms), "by_kind": by_kind, "config": dict(config)}
    return summary | per_request(records) | extra | {"machine": machine_info()}


def machine_info() -> dict[str, Any]:
    """When and where this ran."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def _cell(value: Any, fmt: str, scale: float) -> str:
    return "-" if value is None else fmt.format(value * scale)


def render_table(
    summaries: Mapping[str, Mapping[str, Any]],
    ratios: Mapping[str, float | None] | None = None,
    title: str = "disagg bench",
):
    """A rich Table: one column per run, plus a ratio column (last run / first) if given."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for label in summaries:
        table.add_column(label, justify="right")
    if ratios is not None:
        labels = list(summaries)
        table.add_column(f"{labels[-1]}/{labels[0]}", justify="right")
    for label, key, scale, fmt in ROWS:
        if key in OPTIONAL_ROWS and all(s.get(key) is None for s in summaries.values()):
            continue
        cells = [_cell(s.get(key), fmt, scale) for s in summaries.values()]
        if ratios is not None:
            cells.append(_cell(ratios.get(key), "{:.3f}", 1))
        table.add_row(label, *cells)
    return table


def print_failures(docs: Mapping[str, Mapping[str, Any]]) -> None:
    """One line per run with failed requests: how many, and the most common error."""
    for label, doc in docs.items():
        errors = [e for e in doc.get("errors", []) if e]
        if errors:
            common = max(set(errors), key=errors.count)
            print(f"{label}: {len(errors)} requests failed, e.g. {common[:200]}")


def print_table(table) -> None:
    from rich.console import Console

    Console(width=max(100, Console().width)).print(table)


# -- plots ------------------------------------------------------------------------------------


def write_plots(
    runs: Mapping[str, tuple[Sequence[RequestRecord], float]], out_dir: Path, prefix: str
) -> list[Path]:
    """ITL over time, TTFT CDF and ITL CDF, one line per run; `runs` maps a label to
    (records, the run's start time). Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        _plot(plt, out_dir / f"{prefix}itl-over-time.png", _itl_over_time, runs),
        _plot(plt, out_dir / f"{prefix}ttft-cdf.png", _ttft_cdf, runs),
        _plot(plt, out_dir / f"{prefix}itl-cdf.png", _itl_cdf, runs),
    ]
    return paths


def _plot(plt, path: Path, draw, runs) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    try:
        draw(ax, runs)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _itl_over_time(ax, runs) -> None:
    longs: list[float] = []
    for label, (records, origin) in runs.items():
        points = [p for r in records if r.success for p in itl_timeline(r, origin)]
        if points:
            xs, ys = zip(*points)
            ax.scatter(xs, [1e3 * y for y in ys], s=4, alpha=0.5, label=label)
        # The same trace in every run: its long prompts are sent at the same offsets.
        longs = longs or [r.sent_at - origin for r in records if r.kind == "long"]
    if longs:
        ax.vlines(longs, 0, 1, transform=ax.get_xaxis_transform(), colors="grey",
                  linestyles=":", linewidth=0.8, label="long prompt sent")  # fmt: skip
    ax.set(xlabel="time since the first request (s)", ylabel="inter-token latency (ms)")
    ax.set_yscale("log")
    ax.set_title("ITL over time")


def _cdf(ax, label: str, values_ms: list[float]) -> None:
    if values_ms:
        xs = sorted(values_ms)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)


def _ttft_cdf(ax, runs) -> None:
    for label, (records, _) in runs.items():
        _cdf(ax, label, [1e3 * ttft_s(r) for r in records if r.success])
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF")


def _itl_cdf(ax, runs) -> None:
    for label, (records, _) in runs.items():
        _cdf(ax, label, [1e3 * x for r in records if r.success for x in itls_s(r)])
    ax.set_xscale("log")
    ax.set(xlabel="inter-token latency (ms)", ylabel="fraction of tokens", title="ITL CDF")
