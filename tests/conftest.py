"""Shared fixtures: tiny checkpoints built once per session, and transformers references."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from disagg.cli.tiny import TinySpec, write_tiny_checkpoint
from disagg.shared.engine.block_pool import BlockPool

# Services the tests start compare their tokens with transformers in float32; `--dtype auto`
# would pick bfloat16 on a CPU with fast bf16 (AMX). Tests of bf16 ask for it by name.
os.environ["DISAGG_DTYPE"] = "float32"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("checkpoints"))


class CheckpointFactory:
    """Writes each distinct TinySpec once per session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[str, Path] = {}  # keyed by repr: TinySpec holds a dict

    def __call__(self, **fields) -> Path:
        spec = TinySpec(**fields)
        key = repr(spec)
        if key not in self._made:
            path = self.root / f"ckpt{len(self._made)}-{spec.arch}-{spec.dtype}"
            self._made[key] = write_tiny_checkpoint(path, spec)
        return self._made[key]


@functools.lru_cache(maxsize=16)
def _hf_model(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def hf_greedy(
    path: Path, prompt: list[int], max_new_tokens: int, dtype=torch.float32, **generate_kwargs
) -> list[int]:
    """transformers' own greedy generation, one prompt at a time (no padding involved)."""
    model = _hf_model(str(path), dtype)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **generate_kwargs,
        )
    return out[0, len(prompt) :].tolist()


def hf_logprobs(path: Path, prompt: list[int], output: list[int]) -> torch.Tensor:
    """transformers' log-softmax over the vocabulary at each output position [len(output), V]
    (row i is the distribution of output[i] given prompt + output[:i]), fp32."""
    with torch.no_grad():
        logits = _hf_model(str(path), torch.float32)(torch.tensor([prompt + output])).logits
    return torch.log_softmax(logits[0, len(prompt) - 1 : -1].float(), dim=-1)


def assert_pool_full(pool: BlockPool) -> None:
    pool.check_integrity()
    assert pool.num_free == pool.num_blocks, f"{pool.num_blocks - pool.num_free} blocks leaked"


def bf16_ulp(x: float) -> float:
    """Spacing of bfloat16 numbers at magnitude |x| (8 significant bits)."""
    import math

    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0**-133


def assert_greedy_close(path: Path, prompt: list[int], ours: list[int], dtype=torch.bfloat16):
    """Exact equality with transformers' greedy output, except at a bf16 tie.

    Low-precision runs of two correct implementations may order two logits that bf16 cannot
    tell apart differently (vLLM's tests accept the same). So: tokens must be equal up to the
    first divergence; there, our token must be in transformers' top 2 with a logit at most 2 bf16
    ulps below its top one; what follows continues a different text and is
    not compared. Returns how many tokens matched exactly.
    """
    model = _hf_model(str(path), dtype)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=len(ours),
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ref = out.sequences[0, len(prompt) :].tolist()
    n = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    if n == min(len(ours), len(ref)):
        assert len(ours) == len(ref), f"lengths differ: {len(ours)} vs {len(ref)}"
        return n
    logits = out.logits[n][0].float()
    top = logits.topk(2).values
    ours_logit = float(logits[ours[n]])
    assert ours_logit >= float(top[1]), f"token {n}: ours {ours[n]} is not in HF's top 2"
    margin = float(top[0]) - ours_logit
    assert margin <= 2 * bf16_ulp(float(top[0])), (
        f"token {n}: diverged where HF's margin {margin:.3f} is not a bf16 tie"
    )
    return n
