"""Tiny random Llama-family checkpoints in Hugging Face layout, for tests and `make up`.

Nothing here imports `transformers`: the files are written by hand (config JSON, safetensors,
a `tokenizers` byte-level BPE tokenizer) so that `transformers` stays an independent reference
that disagg's own model runtime is compared against, token for token.

Weights are drawn larger than a trained model's so that greedy logits are peaked: near-ties
would make token-for-token comparisons between implementations (or dtypes) flaky.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from safetensors.torch import save_file

from disagg.cli.tiny_tokenizer import (
    EOS_TOKEN,
    MIN_TOKENIZER_VOCAB_SIZE,
    SPECIAL_TOKENS,
    TOKENIZER_VOCAB_SIZE,
    build_tokenizer,
    tokenizer_config,
)
from disagg.shared.config import option

ARCHS = ("llama", "mistral", "qwen2", "qwen3")  # TinySpec.arch
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCH_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# The RoPE scalings a TinySpec may ask for, with the keys each one needs.
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# Scale of the non-linear-layer tensors; see `_init_tensor`.
EMBED_STD = 1.0
NORM_NOISE_STD = 0.1


@dataclass(frozen=True)
class TinySpec:
    """Shape, initialisation and storage of a tiny random checkpoint.

    `vocab_size` is the model's vocabulary; the tokenizer has min(vocab_size, 384) tokens and the
    rows beyond it are zero padding (like Qwen's padded vocabularies), so their logit is 0 and
    in practice never the greedy choice. `init_std` is the std of every linear weight and bias;
    embeddings are N(0, 1) and norm weights 1 + N(0, 0.1), so a runtime that ignores a norm weight
    does not match.
    """

    arch: Literal["llama", "mistral", "qwen2", "qwen3"] = option("llama", help="architecture")
    vocab_size: int = option(512, help="model vocabulary (the tokenizer has at most 384)")
    hidden_size: int = option(64, help="hidden size")
    intermediate_size: int = option(128, help="MLP size")
    num_layers: int = option(2, help="decoder layers", flag="--layers")
    num_heads: int = option(4, help="attention heads", flag="--heads")
    num_kv_heads: int = option(2, help="key/value heads", flag="--kv-heads")
    head_dim: int | None = option(None, help="head size (default: hidden / heads)")
    max_position_embeddings: int = option(1024, help="context length")
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = option(False, help="share embedding and lm_head weights")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", help="stored dtype")
    init_std: float = 0.15
    rms_norm_eps: float = 1e-6
    seed: int = option(0, help="weights' random seed")
    shards: int = option(1, help="safetensors files to split the weights into")

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        self._check_positive()
        self._check_shapes()
        self._check_rope_scaling()
        if self.shards > len(weight_shapes(self)):
            raise ValueError(f"shards ({self.shards}) exceeds the number of tensors")

    def _check_positive(self) -> None:
        names = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
        names += ("num_kv_heads", "max_position_embeddings", "shards")
        names += ("rope_theta", "init_std", "rms_norm_eps")
        for name in names:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ValueError(f"head_dim must be positive or None, got {self.head_dim}")

    def _check_shapes(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.hidden_size % self.num_heads:
            # LlamaConfig in transformers 5 refuses this even when head_dim is explicit.
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_heads ({self.num_heads})"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")
        if self.vocab_size < MIN_TOKENIZER_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be at least {MIN_TOKENIZER_VOCAB_SIZE} "
                f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {self.vocab_size}"
            )

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling is None:
            return
        rope_type = (
            self.rope_scaling.get("rope_type") if isinstance(self.rope_scaling, dict) else None
        )
        if rope_type not in ROPE_SCALING_KEYS:
            raise ValueError(
                f"rope_scaling must be None or a dict whose rope_type is one of "
                f"{tuple(ROPE_SCALING_KEYS)}, got {self.rope_scaling!r}"
            )
        missing = set(ROPE_SCALING_KEYS[rope_type]) - set(self.rope_scaling)
        if missing:
            raise ValueError(f"rope_scaling of type {rope_type} lacks {sorted(missing)}")
        if "rope_theta" in self.rope_scaling:
            raise ValueError("put rope_theta in TinySpec.rope_theta, not in rope_scaling")

    @property
    def resolved_head_dim(self) -> int:
        """Per-head width: `head_dim`, or hidden_size // num_heads when it is None."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def tokenizer_vocab_size(self) -> int:
        """Number of real tokens; the embedding rows beyond it are zero padding."""
        return min(self.vocab_size, TOKENIZER_VOCAB_SIZE)


def weight_shapes(spec: TinySpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, by its Hugging Face name, in the order it is written."""
    h, d = spec.hidden_size, spec.resolved_head_dim
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for proj, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (out, h)
            if spec.arch == "qwen2":
                shapes[p + f"self_attn.{proj}_proj.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        if spec.arch == "qwen3":
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (spec.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (spec.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, spec.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def parameter_count(spec: TinySpec) -> int:
    """Number of parameters of the model `spec` describes (tied embeddings counted once)."""
    return sum(math.prod(shape) for shape in weight_shapes(spec).values())


def write_tiny_checkpoint(path: str | os.PathLike, spec: TinySpec = TinySpec()) -> pathlib.Path:
    """Write a random checkpoint for `spec` into folder `path` (created if missing) and return it.

    Files: config.json, generation_config.json, model.safetensors (or model-0000k-of-0000N
    shards plus model.safetensors.index.json), tokenizer.json, tokenizer_config.json. The same
    spec always writes byte-identical files.
    """
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.tokenizer_vocab_size, nfc=spec.arch == "qwen2")
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        tokenizer_config(spec.tokenizer_vocab_size, spec.max_position_embeddings),
    )
    _write_json(out / "config.json", model_config(spec, eos_id))
    _write_json(out / "generation_config.json", {"bos_token_id": eos_id, "eos_token_id": eos_id})
    _write_weights(out, spec)
    return out


def model_config(spec: TinySpec, eos_id: int) -> dict:
    """The config.json dict for `spec`; `eos_id` is also used as bos and pad.

    RoPE is written twice, consistently: `rope_parameters` (what transformers 5 reads) and the
    legacy top-level `rope_theta` + `rope_scaling` (what older readers and most hub checkpoints
    use). When both are present transformers 5 takes `rope_scaling` over `rope_parameters` and
    uses `rope_theta` only where the chosen dict lacks one, so the two must agree. Likewise the
    stored dtype as `dtype` (transformers 5) and `torch_dtype` (older).
    """
    config = {
        "architectures": [ARCH_CLASSES[spec.arch]],
        "model_type": spec.arch,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": dict(spec.rope_scaling) if spec.rope_scaling else None,
        "rope_parameters": {"rope_type": "default", **(spec.rope_scaling or {})}
        | {"rope_theta": spec.rope_theta},
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_bias": spec.arch == "qwen2",
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "dtype": spec.dtype,
        "torch_dtype": spec.dtype,
        "use_cache": True,
        # Marks the v5 schema (rope_parameters, dtype); older versions make transformers 5
        # warn about the Mistral tokenizer regex.
        "transformers_version": "5.0.0",
    }
    return config | _arch_extras(spec)


def _arch_extras(spec: TinySpec) -> dict:
    """Keys that only some architectures have: attention windows are always off."""
    if spec.arch == "llama":
        return {"mlp_bias": False, "pretraining_tp": 1}
    if spec.arch == "mistral":
        return {"sliding_window": None}
    return {
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": spec.num_layers,
    }


def random_weights(spec: TinySpec) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, in `spec.dtype`; deterministic for `spec.seed`."""
    generator = torch.Generator().manual_seed(spec.seed)
    dtype = DTYPES[spec.dtype]
    weights = {}
    for name, shape in weight_shapes(spec).items():
        weights[name] = _init_tensor(name, shape, spec, generator).to(dtype).contiguous()
    return weights


def _init_tensor(
    name: str, shape: tuple[int, ...], spec: TinySpec, generator: torch.Generator
) -> torch.Tensor:
    """Draw one tensor in float32 (drawing in float32 keeps all dtypes the same model)."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return 1.0 + NORM_NOISE_STD * noise
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        # Padding rows are zero: logit 0 sits far below the top real logits, so greedy
        # decoding does not produce ids the tokenizer cannot decode.
        noise[spec.tokenizer_vocab_size :] = 0.0
        return EMBED_STD * noise
    return spec.init_std * noise


def _write_weights(out: pathlib.Path, spec: TinySpec) -> None:
    """Write model.safetensors, or `spec.shards` shard files plus the index."""
    weights = random_weights(spec)
    metadata = {"format": "pt"}
    if spec.shards == 1:
        save_file(weights, str(out / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for k, names in enumerate(_split(list(weights), spec.shards), start=1):
        filename = f"model-{k:05d}-of-{spec.shards:05d}.safetensors"
        save_file({n: weights[n] for n in names}, str(out / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(names, filename))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(out / "model.safetensors.index.json", index)


def _split(names: list[str], parts: int) -> Iterator[list[str]]:
    """Contiguous, non-empty chunks of `names` whose sizes differ by at most one."""
    size, extra = divmod(len(names), parts)
    start = 0
    for k in range(parts):
        stop = start + size + (k < extra)
        yield names[start:stop]
        start = stop


def _write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
