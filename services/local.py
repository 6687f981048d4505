"""Local tools that need no NATS: `disagg tiny-model` and `disagg generate`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from disagg.services.workers.runtime import RuntimeConfig, build_runtime
from disagg.shared.sampling import SamplingParams
from disagg.shared.tiny import ARCHS, TinySpec, parameter_count, write_tiny_checkpoint
from disagg.shared.tokenizer import Tokenizer


def add_tiny_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="folder to write (created if missing)")
    p.add_argument("--arch", choices=ARCHS, default="llama")
    p.add_argument("--hidden-size", type=int, default=TinySpec.hidden_size)
    p.add_argument("--intermediate-size", type=int, default=TinySpec.intermediate_size)
    p.add_argument("--layers", type=int, default=TinySpec.num_layers)
    p.add_argument("--heads", type=int, default=TinySpec.num_heads)
    p.add_argument("--kv-heads", type=int, default=TinySpec.num_kv_heads)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=TinySpec.vocab_size)
    p.add_argument("--max-position-embeddings", type=int, default=TinySpec.max_position_embeddings)
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)


def run_tiny_model(args: argparse.Namespace) -> int:
    spec = TinySpec(
        arch=args.arch,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie_word_embeddings,
        dtype=args.dtype,
        seed=args.seed,
        shards=args.shards,
    )
    path = write_tiny_checkpoint(args.dir, spec)
    params = parameter_count(spec)
    print(f"wrote {spec.arch} checkpoint with {params / 1e6:.2f}M parameters to {path}")
    return 0


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags every process that loads a model shares."""
    p.add_argument("--model", type=Path, required=True, help="Hugging Face model folder")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--kv-memory-gb", type=float, default=1.0, help="memory for the KV cache")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print token ids and text as JSON lines")


def run_generate(args: argparse.Namespace) -> int:
    tokenizer = Tokenizer(args.model)
    runtime = build_runtime(RuntimeConfig.from_args(args))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    prompts = [tokenizer.encode(text) for text in args.prompt]
    with torch.inference_mode():
        outputs = runtime.engine.generate(prompts, params)
    for text, ids in zip(args.prompt, outputs):
        completion = tokenizer.decode(ids)
        if args.json:
            print(json.dumps({"prompt": text, "token_ids": ids, "text": completion}))
        else:
            print(f"{text}{completion}")
    sys.stdout.flush()
    return 0
