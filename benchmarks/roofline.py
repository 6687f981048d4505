"""disagg's engine against this machine's rooflines and against Hugging Face transformers.

One run measures, on the same checkpoint and the same threads:

1. **machine**: memory bandwidth (a large tensor copy: bytes read + bytes written / time) and
   matmul FLOP/s (square matmuls in float32, and bfloat16: reported as measured; it is only used
   as a bound when the model runs in bf16).
2. **decode**: one engine step with every sequence decoding, at batch 1, 8 and 32 with
   `--context` tokens already cached, against its roofline max(bytes / bandwidth,
   FLOPs / FLOP/s). Bytes read per step: every weight the step touches (the embedding only
   for the batch's rows) plus every cached K/V of the batch.
3. **prefill**: one `--prompt-len` prompt in one step against max(FLOPs / FLOP/s, weight bytes /
   bandwidth); FLOPs = 2 x matmul parameters x tokens (lm_head once: only the last position
   is sampled) + causal attention 2 x T^2 x heads x head_dim per layer.
4. **generation**: tokens/s of `Engine.generate` and of transformers `generate` (greedy, no
   padding, exactly `--new-tokens` each) at batch 1 and 32.

Ratios: `x bound` = measured time / roofline time (1.0 would be at the roofline) and disagg
tokens/s / transformers tokens/s. Run from the repository root:
`python benchmarks/roofline.py [--device cuda] [--json PATH]`. The default checkpoint is the
~100M-parameter random Llama shared by every benchmark (`~/.cache/disagg/bench/`).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from disagg.benchmarks.harness.checkpoint import bench_checkpoint
from disagg.benchmarks.harness.stack import ForeignCpu
from disagg.shared.engine.runtime import Runtime, RuntimeConfig, build_runtime
from disagg.shared.engine.scheduler import EngineConfig
from disagg.shared.log import configure_logging
from disagg.shared.protocol.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DECODE_BATCHES = (1, 8, 32)
GENERATE_BATCHES = (1, 32)


# -- timing -----------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- machine ----------------------------------------------------------------------------------


def memory_bandwidth(device: str, mib: int, repeats: int) -> float:
    """Bytes/s of copying a `mib` MiB float32 tensor (each byte read once and written once)."""
    src = torch.ones(mib << 18, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * src.element_size() / seconds


def matmul_flops(device: str, dtype: torch.dtype, max_n: int, repeats: int) -> float:
    """FLOP/s of square matmuls (2 n^3 FLOPs), n doubling from 256 up to `max_n` while one call
    takes under 0.2 s, so a dtype without fast kernels here (bf16 on many CPUs) stays quick."""
    n, flops = 256, 0.0
    while True:
        seconds = _matmul_seconds(n, dtype, device, repeats)
        flops = max(flops, 2 * n**3 / seconds)
        if 2 * n > max_n or seconds > 0.2:
            return flops
        n *= 2


def _matmul_seconds(n: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return timed(lambda: a @ b, device, repeats)


def measure_machine(args: argparse.Namespace) -> dict[str, float]:
    machine = {"bandwidth_Bps": memory_bandwidth(args.device, args.copy_mib, args.repeats)}
    for name, dtype in DTYPES.items():
        machine[f"matmul_{name}_flops"] = matmul_flops(args.device, dtype, args.matmul_n, 2)
    return machine


# -- model arithmetic -------------------------------------------------------------------------


def model_shape(rt: Runtime) -> dict[str, Any]:
    """Parameter counts and per-token KV bytes of the loaded model."""
    a, model = rt.model.args, rt.model
    embed = model.embed_tokens.weight
    total = sum(p.numel() for p in model.parameters())
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)
    matmul -= 0 if a.tie_word_embeddings else embed.numel()  # a lookup, not a matmul
    itemsize = embed.element_size()
    kv_token = a.num_layers * 2 * a.num_kv_heads * a.head_dim * rt.cache.data.element_size()
    return {
        "params": total, "matmul_params": matmul, "itemsize": itemsize, "hidden": a.hidden_size,
        "embed_params": 0 if a.tie_word_embeddings else embed.numel(),
        "kv_bytes_per_token": kv_token, "layers": a.num_layers,
        "attn_width": a.num_heads * a.head_dim,
    }  # fmt: skip


def decode_bytes(shape: dict[str, Any], batch: int, context: float) -> float:
    """Bytes one decode step reads: weights (embedding: the batch's rows) + the batch's KV."""
    weights = (shape["params"] - shape["embed_params"]) * shape["itemsize"]
    rows = batch * shape["hidden"] * shape["itemsize"] if shape["embed_params"] else 0
    return weights + rows + batch * context * shape["kv_bytes_per_token"]


def decode_flops(shape: dict[str, Any], batch: int, context: float) -> float:
    attention = 4 * shape["layers"] * shape["attn_width"] * context * batch
    return 2 * shape["matmul_params"] * batch + attention


def prefill_flops(shape: dict[str, Any], tokens: int) -> float:
    lm_head = shape["embed_params"] or 0  # computed for the last position only
    linear = 2 * (shape["matmul_params"] - lm_head) * tokens + 2 * lm_head
    attention = 2 * shape["layers"] * shape["attn_width"] * tokens * tokens  # causal half
    return linear + attention


# -- engine measurements ----------------------------------------------------------------------


_SEEDS = itertools.count(1)


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    """Random prompts never drawn before in this run: the engine's prefix cache must not help."""
    gen = torch.Generator().manual_seed(next(_SEEDS))
    return torch.randint(0, min(vocab, 32000), (n, length), generator=gen).tolist()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def time_decode(rt: Runtime, batch: int, context: int, steps: int, device: str) -> float:
    """Median seconds of one all-decode engine step at `batch` sequences of ~`context` tokens."""
    eng = rt.engine
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, prompts(batch, context, rt.model.args.vocab_size)):
        eng.add_request(rid, prompt, greedy(steps + 4))
    while any(not eng.scheduler.requests[rid].output for rid in ids):
        eng.step()  # the prompts' prefill, chunked by the engine's token budget
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        eng.step()
        sync(device)
        times.append(time.perf_counter() - start)
    while eng.has_unfinished():
        eng.step()
    return statistics.median(times)


def time_prefill(rt: Runtime, length: int, repeats: int, device: str) -> float:
    """Median seconds of one engine step that prefills a whole `length`-token prompt."""
    vocab = rt.model.args.vocab_size
    counter = iter(range(10**6))

    def one() -> None:
        rid = f"prefill-{next(counter)}"
        rt.engine.add_request(rid, prompts(1, length, vocab)[0], greedy(1))
        while rt.engine.has_unfinished():
            rt.engine.step()

    return timed(one, device, repeats)


def engine_tokens_per_s(rt: Runtime, batch: int, args: argparse.Namespace) -> float:
    vocab = rt.model.args.vocab_size
    run = lambda: rt.engine.generate(prompts(batch, args.context, vocab), greedy(args.new_tokens))  # noqa: E731
    return batch * args.new_tokens / timed(run, args.device, 1)


def load_hf(args: argparse.Namespace):
    """The same checkpoint in transformers, same dtype and device."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval()
    return hf.to(args.device)


def hf_tokens_per_s(hf, batch: int, args: argparse.Namespace, vocab: int) -> float:
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def run() -> None:
        ids = torch.tensor(prompts(batch, args.context, vocab), device=args.device)
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)

    return batch * args.new_tokens / timed(run, args.device, 1)


# -- report -----------------------------------------------------------------------------------


def roofline_rows(rt: Runtime, machine: dict[str, float], args) -> list[dict[str, Any]]:
    shape, flops = model_shape(rt), machine[f"matmul_{args.dtype}_flops"]
    bw, rows = machine["bandwidth_Bps"], []
    for batch in DECODE_BATCHES:
        ctx = args.context + args.steps / 2
        measured = time_decode(rt, batch, args.context, args.steps, args.device)
        mem, comp = decode_bytes(shape, batch, ctx) / bw, decode_flops(shape, batch, ctx) / flops
        rows.append(_row(f"decode batch {batch}", measured, mem, comp))
    n = args.prompt_len
    measured = time_prefill(rt, n, args.repeats, args.device)
    mem, comp = decode_bytes(shape, n, 0) / bw, prefill_flops(shape, n) / flops
    rows.append(_row(f"prefill {n} tok", measured, mem, comp))
    return rows


def _row(name: str, measured: float, mem_s: float, compute_s: float) -> dict[str, Any]:
    bound = max(mem_s, compute_s)
    return {
        "phase": name, "measured_ms": 1e3 * measured, "memory_bound_ms": 1e3 * mem_s,
        "compute_bound_ms": 1e3 * compute_s, "x_bound": measured / bound,
        "bound_by": "memory" if mem_s >= compute_s else "compute",
    }  # fmt: skip


def generation_rows(rt: Runtime, args: argparse.Namespace) -> list[dict[str, Any]]:
    hf, rows = load_hf(args), []
    for batch in GENERATE_BATCHES:
        ours = engine_tokens_per_s(rt, batch, args)
        theirs = hf_tokens_per_s(hf, batch, args, rt.model.args.vocab_size)
        rows.append({"batch": batch, "disagg_tok_s": ours, "hf_tok_s": theirs})
        rows[-1]["ratio"] = ours / theirs
    return rows


def print_report(info: dict, machine: dict, roof: list[dict], gen: list[dict]) -> None:
    bf16_slow = machine["matmul_bfloat16_flops"] < machine["matmul_float32_flops"]
    print(
        f"disagg roofline benchmark  {info['date']}  ({info['cpu']}, {info['threads']} "
        f"thread(s), device {info['device']}, {info['params_m']:.0f}M params, {info['dtype']})"
    )
    print(
        f"memory bandwidth {machine['bandwidth_Bps'] / 1e9:.2f} GB/s; matmul "
        f"fp32 {machine['matmul_float32_flops'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {machine['matmul_bfloat16_flops'] / 1e9:.1f} GFLOP/s"
        + (" (no fast bf16 kernels here)" if bf16_slow else "")
    )
    head = ("measured ms", 12), ("memory ms", 11), ("compute ms", 12), ("bound", 9), ("x bound", 9)
    print(f"{'phase':<18}" + "".join(f"{name:>{w}}" for name, w in head))
    for r in roof:
        print(
            f"{r['phase']:<18}{r['measured_ms']:>12.1f}{r['memory_bound_ms']:>11.1f}"
            f"{r['compute_bound_ms']:>12.1f}{r['bound_by']:>9}{r['x_bound']:>9.2f}"
        )
    print(f"{'generate':<18}{'disagg tok/s':>13}{'HF tok/s':>10}{'disagg/HF':>11}")
    for g in gen:
        label = f"batch {g['batch']}"
        print(f"{label:<18}{g['disagg_tok_s']:>13.1f}{g['hf_tok_s']:>10.1f}{g['ratio']:>11.2f}")


def machine_info(args: argparse.Namespace, rt: Runtime) -> dict[str, Any]:
    from disagg.benchmarks.harness.report import cpu_model

    cpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu, "threads": torch.get_num_threads(), "device": args.device,
        "dtype": args.dtype, "torch": torch.__version__, "load_average": os.getloadavg(),
        "params_m": sum(p.numel() for p in rt.model.parameters()) / 1e6,
    }  # fmt: skip


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: ~100M Llama)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--cpus", default=None, help="pin to these cores, e.g. 1 or 0-3")
    p.add_argument("--context", type=int, default=128, help="cached tokens per decode sequence")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per batch size")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    p.add_argument("--copy-mib", type=int, default=512)
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def setup(args: argparse.Namespace) -> Runtime:
    if args.cpus:
        from disagg.services.workers.config import parse_cpus

        os.sched_setaffinity(0, parse_cpus(args.cpus))
    torch.set_num_threads(args.threads)
    configure_logging("warning")
    args.model = args.model or bench_checkpoint()
    tokens = max(DECODE_BATCHES) * (args.context + args.steps + 8)
    cfg = RuntimeConfig(
        model=args.model, dtype=args.dtype, device=args.device, kv_memory_gb=1.0,
        engine=EngineConfig(
            max_num_seqs=max(DECODE_BATCHES + GENERATE_BATCHES),
            max_num_batched_tokens=max(args.prompt_len, 512),
        ),
    )  # fmt: skip
    rt = build_runtime(cfg)
    if rt.capacity_tokens < tokens:
        raise SystemExit(f"the KV cache holds {rt.capacity_tokens} tokens, need {tokens}")
    return rt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rt = setup(args)
    watch = ForeignCpu({os.getpid()})
    machine = measure_machine(args)
    roof = roofline_rows(rt, machine, args)
    gen = generation_rows(rt, args)
    info = machine_info(args, rt) | {"other_cpu_share": watch.share()}
    print_report(info, machine, roof, gen)
    if info["other_cpu_share"] is not None:
        print(f"other processes used {info['other_cpu_share']:.0%} of this machine's CPU meanwhile")
    if args.json:
        config = {k: str(v) for k, v in vars(args).items()}
        doc = {"machine": info | machine, "config": config, "roofline": roof, "generate": gen}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
