"""Local tools that need no NATS: `disagg tiny-model` and `disagg generate`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from disagg.cli.tiny import TinySpec, parameter_count, write_tiny_checkpoint
from disagg.shared.config import add_flags, from_args, group, option
from disagg.shared.engine.runtime import RuntimeConfig, build_runtime
from disagg.shared.protocol.sampling import SamplingParams
from disagg.shared.tokenizer import Tokenizer


def add_tiny_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="folder to write (created if missing)")
    add_flags(p, TinySpec)


def run_tiny_model(args: argparse.Namespace) -> int:
    spec = from_args(TinySpec, args)
    path = write_tiny_checkpoint(args.dir, spec)
    params = parameter_count(spec)
    print(f"wrote {spec.arch} checkpoint with {params / 1e6:.2f}M parameters to {path}")
    return 0


@dataclass(frozen=True)
class GenerateConfig:
    """`disagg generate`: the model runtime and how to sample."""

    runtime: RuntimeConfig = group(RuntimeConfig)
    max_tokens: int = option(32, help="tokens to generate per prompt")
    temperature: float = option(0.0, help="0 is greedy")
    top_p: float = option(1.0, help="nucleus sampling mass")
    top_k: int = option(0, help="0 or -1: off")
    seed: int | None = option(None, help="seed of sampled generation")
    ignore_eos: bool = option(False, help="generate past the end-of-sequence token")
    json: bool = option(False, help="print token ids and text as JSON lines")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    add_flags(p, GenerateConfig)


def run_generate(args: argparse.Namespace) -> int:
    cfg = from_args(GenerateConfig, args)
    tokenizer = Tokenizer(cfg.runtime.model)
    runtime = build_runtime(cfg.runtime)
    prompts = [tokenizer.encode(text) for text in args.prompt]
    outputs = runtime.engine.generate(prompts, cfg.sampling)
    for text, ids in zip(args.prompt, outputs, strict=True):
        completion = tokenizer.decode(ids)
        if cfg.json:
            print(json.dumps({"prompt": text, "token_ids": ids, "text": completion}))
        else:
            print(f"{text}{completion}")
    sys.stdout.flush()
    return 0
