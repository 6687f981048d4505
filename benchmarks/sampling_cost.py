"""What logprobs, penalties and structured output cost a decode step, as ratios to plain
sampling, in one run.

At batch `--batch` (32) with `--context`-token prompts (64), it times `--steps` decode steps of
the engine (forward pass + sampler) for each mode, and the sampler alone on the same logits:

- **plain**: temperature 1.0, top-p 0.9, seeded (the reference of every ratio);
- **logprobs**: plain + `logprobs=20` (the sampled token's and the top 20);
- **penalties**: plain + presence 0.5, frequency 0.5, repetition 1.2 (over prompt and output);
- **all**: both, plus min_p 0.05;
- **json**: plain under a JSON schema (an array of objects with an enum, a bounded integer and
  a string, 10000 items at least: the grammar cannot end within the steps), the grammar's mask
  every step.

And one `--prompt-len` (512) prefill step, plain and under the JSON schema: the first token's
mask (on a prefill worker) against the whole prompt's compute.

Modes are interleaved over `--repeats` rounds and the median step kept, so a busy machine
slows every mode alike. Run: `python benchmarks/sampling_cost.py [--json PATH]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from disagg.benchmarks.harness.checkpoint import bench_checkpoint
from disagg.shared.engine.engine import Engine
from disagg.shared.engine.runtime import RuntimeConfig, build_runtime
from disagg.shared.engine.sampler import Row, SeqState, sample
from disagg.shared.engine.scheduler import EngineConfig
from disagg.shared.log import configure_logging
from disagg.shared.protocol.sampling import SamplingParams, Structured

PLAIN = dict(temperature=1.0, top_p=0.9, ignore_eos=True)
PENALTIES = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2)
SCHEMA = {
    "type": "array",
    "minItems": 10_000,
    "items": {
        "type": "object",
        "properties": {"kind": {"enum": ["a", "b", "c"]}, "n": {"type": "integer", "minimum": 0},
                       "note": {"type": "string"}},
        "required": ["kind", "n", "note"],
        "additionalProperties": False,
    },
}  # fmt: skip
MODES = {
    "plain": PLAIN,
    "logprobs": PLAIN | {"logprobs": 20},
    "penalties": PLAIN | PENALTIES,
    "all": PLAIN | PENALTIES | {"logprobs": 20, "min_p": 0.05},
    "json": PLAIN | {"ignore_eos": False, "structured": Structured("json", json.dumps(SCHEMA))},
}
PREFILL_MODES = ("plain", "json")


def decode_steps(engine: Engine, mode: str, args: argparse.Namespace, vocab: int) -> float:
    """Median seconds of one decode step with `args.batch` requests of `mode` running."""
    gen = torch.Generator().manual_seed(0)
    ids = [f"{mode}-{i}" for i in range(args.batch)]
    for i, rid in enumerate(ids):
        prompt = torch.randint(0, vocab, (args.context,), generator=gen).tolist()
        params = SamplingParams(max_tokens=args.steps + 8, seed=i, **MODES[mode])
        engine.add_request(rid, prompt, params)
    while any(not engine.scheduler.requests[r].output for r in ids):
        engine.step()  # the prefills
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    return statistics.median(times)


def prefill_step(engine: Engine, mode: str, args: argparse.Namespace, vocab: int) -> float:
    """Seconds of the one engine step that prefills a `--prompt-len` prompt and samples its
    first token."""
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
    engine.add_request(f"prefill-{mode}", prompt, SamplingParams(max_tokens=1, **MODES[mode]))
    start = time.perf_counter()
    engine.step()
    elapsed = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    return elapsed


def sampler_only(mode: str, args: argparse.Namespace, vocab: int, grammars) -> float:
    """Median seconds of `sample` alone on [batch, vocab] float32 logits."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(args.batch, vocab, generator=gen) * 3
    params = [SamplingParams(seed=i, **MODES[mode]) for i in range(args.batch)]
    prompt = torch.randint(0, vocab, (args.context,), generator=gen).tolist()
    states = [SeqState.new(p, prompt, grammars) for p in params]
    output = list(range(32))
    times = []
    for _ in range(args.steps):
        rows = [Row(s, output) for s in states]
        start = time.perf_counter()
        sample(logits, rows)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: ~100M Llama)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    configure_logging("warning")
    torch.set_num_threads(args.threads)
    model = args.model or bench_checkpoint()
    blocks = args.batch * (-(-(args.context + args.steps + 8) // 16)) + args.prompt_len // 16 + 16
    cfg = RuntimeConfig(
        model=model, num_blocks=blocks, block_size=16,
        engine=EngineConfig(max_num_seqs=args.batch, enable_prefix_caching=False,
                            max_num_batched_tokens=max(4096, args.prompt_len)),
    )  # fmt: skip
    rt = build_runtime(cfg)
    vocab = rt.model.args.vocab_size
    step: dict[str, list[float]] = {m: [] for m in MODES}
    alone: dict[str, list[float]] = {m: [] for m in MODES}
    prefill: dict[str, list[float]] = {m: [] for m in PREFILL_MODES}
    rt.engine.prepare(SamplingParams(**MODES["json"]))  # compiled once, before any timing
    grammars = rt.engine.runner.grammars
    for _ in range(args.repeats):
        for mode in MODES:
            step[mode].append(decode_steps(rt.engine, mode, args, vocab))
            alone[mode].append(sampler_only(mode, args, vocab, grammars))
        for mode in PREFILL_MODES:
            prefill[mode].append(prefill_step(rt.engine, mode, args, vocab))
    rows = {
        m: {"step_ms": 1e3 * statistics.median(step[m]),
            "sampler_ms": 1e3 * statistics.median(alone[m])}
        for m in MODES
    }  # fmt: skip
    for row in rows.values():
        row["step_over_plain"] = row["step_ms"] / rows["plain"]["step_ms"]
    print(
        f"sampling cost: {model.name}, vocab {vocab}, batch {args.batch}, context "
        f"{args.context}, {args.threads} thread(s), medians of {args.repeats} x {args.steps}"
    )
    print(f"{'mode':<10}{'step ms':>10}{'sampler ms':>12}{'step / plain':>14}")
    for mode, row in rows.items():
        print(f"{mode:<10}{row['step_ms']:>10.2f}{row['sampler_ms']:>12.2f}"
              f"{row['step_over_plain']:>14.3f}")  # fmt: skip
    first = {m: 1e3 * statistics.median(prefill[m]) for m in PREFILL_MODES}
    print(f"prefill {args.prompt_len} tok: plain {first['plain']:.1f} ms, json "
          f"{first['json']:.1f} ms ({first['json'] / first['plain']:.3f}x)")  # fmt: skip
    if args.json:
        doc = {"config": vars(args) | {"model": str(model)}, "modes": rows, "prefill_ms": first}
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
