"""The printed table and run metadata of benchmarks/kv_transfer.py."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from typing import Any

import torch
import zmq

from disagg.benchmarks.kv_transfer_decode import BLOCK_SIZE
from disagg.shared.transfer.sender import DEFAULT_MAX_CHUNK_BYTES

MODE_LABELS = {"fp32": "fp32->fp32", "bf16": "bf16->bf16", "int8": "fp32->int8"}
CONTENDED_CPU_SHARE = 0.9  # prefill thread CPU time / wall time below this: the core was shared

COLUMNS = (
    ("mode", "{:<11}", None),
    ("prefill ms", "{:>10.0f}", ("prefill_s", 1e3)),
    ("pack ms", "{:>8.1f}", ("pack_s", 1e3)),
    ("KV MB", "{:>7.2f}", ("payload_bytes", 1e-6)),
    ("wire MB", "{:>8.2f}", ("wire_bytes", 1e-6)),
    ("exposed ms", "{:>10.1f}", ("exposed_s", 1e3)),
    ("exposed %", "{:>9.3f}", ("exposed_frac", 100)),
    ("eff GB/s", "{:>8.3f}", ("effective_gbps", 1)),
    ("pipe pack ms", "{:>12.1f}", ("pipe_pack_s", 1e3)),
    ("pipe GB/s", "{:>9.3f}", ("pipe_gbps", 1)),
    ("raw GB/s", "{:>8.3f}", ("raw_gbps", 1)),
    ("eff/raw", "{:>7.3f}", ("eff_over_raw", 1)),
    ("pipe/raw", "{:>8.3f}", ("pipe_over_raw", 1)),
)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per mode of the medians."""
    widths = [len(fmt.format(0 if key else "")) for _, fmt, key in COLUMNS]
    lines = ["  ".join(f"{name:>{w}}" for (name, _, _), w in zip(COLUMNS, widths))]
    for mode, result in results.items():
        median = result["median"]
        cells = [
            fmt.format(MODE_LABELS[mode]) if key is None else fmt.format(median[key[0]] * key[1])
            for _, fmt, key in COLUMNS
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def machine_info(args: argparse.Namespace, cores: tuple[int, int]) -> dict[str, Any]:
    """Where and when this ran."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zmq": zmq.zmq_version(),
        "device": args.device,
        "cores": {"prefill": cores[0], "decode": cores[1]},
        "torch_threads_per_process": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def print_header(info: dict[str, Any], args: argparse.Namespace, params: int | None) -> None:
    size = f"{params / 1e6:.0f}M params" if params else "parameters unknown"
    print(f"disagg KV transfer benchmark  {info['date']}")
    print(
        f"machine: {info['host_cpus']} cpus ({info['cpu']}), prefill on core "
        f"{info['cores']['prefill']}, decode on core {info['cores']['decode']}, "
        f"{info['torch_threads_per_process']} torch thread each, device {info['device']}, "
        f"load avg {info['load_average'][0]:.2f}"
    )
    print(
        f"model: {args.model} ({size}); prompt {args.prompt_len} tokens, block {BLOCK_SIZE}, "
        f"max chunk {DEFAULT_MAX_CHUNK_BYTES >> 20} MiB; "
        f"medians of {args.repeats} runs after 1 warm-up"
    )


def print_contention(results: dict[str, dict[str, Any]]) -> None:
    """Warn when the prefill thread did not have its core: its compute times are then inflated."""
    for mode, result in results.items():
        shares = [run["cpu_share"] for run in result["runs"]["prefill"]]
        if min(shares) < CONTENDED_CPU_SHARE:
            print(
                f"warning: {MODE_LABELS[mode]}: the prefill thread got "
                f"{', '.join(f'{s:.0%}' for s in shares)} of its core per run (other processes "
                "or its own sender thread competed for it); its prefill/pack times are inflated"
            )
