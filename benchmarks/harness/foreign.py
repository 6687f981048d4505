"""What the benchmarks against other servers share (`vs_vllm.py`, `vs_llamacpp.py`): their venvs
beside the repository's, their server in a process group of its own, the same trace sent to
each with the CPU other processes took meanwhile, and how far greedy outputs agree."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from disagg.benchmarks.harness import report
from disagg.benchmarks.harness.checkpoint import cache_root
from disagg.benchmarks.harness.metrics import parse_slos, ratios
from disagg.benchmarks.harness.runner import RunConfig, RunResult, run_trace
from disagg.benchmarks.harness.stack import ForeignCpu
from disagg.benchmarks.harness.workload import TraceRequest

TORCH = "torch==2.13.0"  # the local CPU wheel: installed first, so nothing pulls CUDA torch
INSTALL_TIMEOUT_S = 3600


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def probe(venv: Path, code: str) -> str | None:
    """The last line ``code`` prints in ``venv``'s python, or None if it fails."""
    if not venv_python(venv).is_file():
        return None
    done = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout else None


def make_venv(venv: Path) -> list[str]:
    """A fresh venv with the CPU torch and a constraints file pinning it; returns its pip."""
    pip = [str(venv_python(venv)), "-m", "pip"]
    run_logged(["python3", "-m", "venv", str(venv)])
    run_logged([*pip, "install", "-q", "--upgrade", "pip"])
    run_logged([*pip, "install", TORCH])
    (venv / "constraints.txt").write_text(TORCH + "\n")
    return pip


def run_logged(argv: list[str], env: Mapping[str, str] | None = None) -> None:
    print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
    subprocess.run(argv, check=True, timeout=INSTALL_TIMEOUT_S, env=env)


class ServerProcess:
    """Another project's OpenAI server in its own process group (it may spawn more), ready once
    ``/v1/models`` answers, stopped by signalling that group: SIGTERM, then SIGKILL."""

    name = "server"

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log: Path, port: int) -> None:
        self.argv, self.env, self.log_path, self.port = list(argv), dict(env), log, port
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 (the child writes it until stopped)
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            url = self.base_url + "/v1/models"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready within {timeout_s} s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait_s)
                return


def send(
    base_url: str, trace, warmup, max_concurrency: int | None, extra_body: dict | None = None
) -> RunResult:
    """Run the trace against ``base_url`` (``extra_body`` added to each request); note how much
    CPU processes outside this benchmark's tree took meanwhile."""
    extra = tuple((extra_body or {}).items())
    cfg = RunConfig(base_url=base_url, max_concurrency=max_concurrency, extra_body=extra)
    watch = ForeignCpu({os.getpid()})
    result = asyncio.run(run_trace(cfg, trace, warmup=warmup))
    result.other_cpu_share = watch.share()
    return result


# -- greedy agreement ---------------------------------------------------------------------------


def agreement(a: list[list[Any]], b: list[list[Any]]) -> dict[str, Any]:
    """How many outputs are identical, and the mean fraction of each that matches before the
    first difference (in a random model near-tied logits can flip a token, then all after it)."""
    pairs = [(x, y) for x, y in zip(a, b) if x and y]
    if not pairs:
        return {"compared": 0}
    prefix = [_common_prefix(x, y) / max(len(x), len(y)) for x, y in pairs]
    return {
        "compared": len(pairs),
        "identical": sum(x == y for x, y in pairs),
        "mean_matching_prefix": sum(prefix) / len(prefix),
    }


def ids_of(result: RunResult) -> list[list[int]]:
    """Each request's streamed token ids ([] for a failed one)."""
    return [r.token_ids if r.success else [] for r in result.records]


def hf_greedy(model: Path, trace: list[TraceRequest]) -> list[list[int]]:
    """transformers' greedy ids for each request, one prompt at a time (no padding), fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    for req in trace:
        ids = torch.tensor([req.prompt_ids])
        n = req.output_len
        with torch.no_grad():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False)  # fmt: skip
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# -- arguments and report -----------------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser, venv: str, ready_timeout_s: float) -> None:
    """The arguments every comparison takes: model, venv, cores, the trace, outputs."""
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: ~100M Llama)")
    p.add_argument("--venv", type=Path, default=cache_root() / venv)
    p.add_argument("--disagg-args", default="--mode agg --decode 1", help="extra `disagg up` flags")
    p.add_argument("--core", type=int, default=min(os.sched_getaffinity(0)), help="engine core")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", default=None, help="goodput SLOs in ms, e.g. ttft:2000,tpot:200")
    p.add_argument("--ready-timeout-s", type=float, default=ready_timeout_s)
    p.add_argument("--out-dir", type=Path, default=Path("bench-out"), help="servers' logs")
    p.add_argument("--json", type=Path, default=None)


def report_pair(
    args, theirs_label: str, ours: RunResult, theirs: RunResult, config: dict, title: str
) -> dict[str, Any]:
    """Print every metric of both runs as disagg / theirs and the CPU others took; returns the
    JSON document (``modes``, ``ratios``), written by the caller once it has added to it."""
    slos = parse_slos(args.slo)
    config = {k: str(v) for k, v in vars(args).items()} | config
    docs = {
        theirs_label: report.result_document(theirs.records, slos, config),
        "disagg": report.result_document(ours.records, slos, config),
    }
    out = {"modes": docs, "ratios": ratios(docs[theirs_label], docs["disagg"])}
    report.print_table(report.render_table(docs, out["ratios"], title=title))
    report.print_failures(docs)
    for label, result in ((theirs_label, theirs), ("disagg", ours)):
        docs[label]["other_cpu_share"] = share = result.other_cpu_share
        if share is not None:
            print(f"{label}: other processes used {share:.0%} of this machine's CPU meanwhile")
    return out


def finish(args, out: dict[str, Any]) -> int:
    if args.json:
        report.write_json(args.json, out)
    return 0 if all(d["completed"] for d in out["modes"].values()) else 1
