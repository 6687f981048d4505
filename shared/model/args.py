"""Model arguments read from a Hugging Face `config.json`, validated with one-line errors."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

# model_type -> (q/k/v bias, q/k RMSNorm)
ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = Literal["auto", "float32", "bfloat16", "float16"]  # auto: see engine.dtype


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be served; the message names the file and the field."""


@dataclass(frozen=True)
class RopeArgs:
    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    """Everything the decoder needs to know about a checkpoint's shape."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeArgs = field(default_factory=RopeArgs)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    dtype: str = "float32"

    @property
    def max_model_len(self) -> int:
        """Longest sequence served: a sliding window shorter than the context caps it (no SWA)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelArgs:
        """Read `config.json` (and `generation_config.json` for extra stop ids) from `folder`."""
        folder = Path(folder)
        config = _read_json(folder / "config.json", required=True)
        gen = _read_json(folder / "generation_config.json", required=False) or {}
        return cls.from_hf_config(config, source=str(folder / "config.json"), generation=gen)

    @classmethod
    def from_hf_config(
        cls, config: dict[str, Any], *, source: str = "config.json", generation: dict | None = None
    ) -> ModelArgs:
        """Build from a parsed HF config dict; errors name `source` and the field."""
        get = _FieldReader(config, source)
        arch = get.str("model_type")
        if arch not in ARCHITECTURES:
            known = ", ".join(sorted(ARCHITECTURES))
            raise CheckpointError(
                f"{source}: model_type {arch!r} is not supported (supported: {known})"
            )
        qkv_bias, qk_norm = ARCHITECTURES[arch]
        if arch == "llama" and config.get("attention_bias"):
            qkv_bias = True
        num_heads = get.int("num_attention_heads")
        hidden = get.int("hidden_size")
        head_dim = config.get("head_dim") or hidden // num_heads
        num_kv_heads = get.int("num_key_value_heads", default=num_heads)
        if num_heads % num_kv_heads:
            raise CheckpointError(
                f"{source}: num_attention_heads {num_heads} is not a multiple of "
                f"num_key_value_heads {num_kv_heads}"
            )
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        return cls(
            arch=arch,
            vocab_size=get.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get.int("intermediate_size"),
            num_layers=get.int("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=get.int("max_position_embeddings", default=4096),
            rope=_rope_args(config, source),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            sliding_window=int(window) if window else None,
            eos_token_ids=_eos_ids(config, generation or {}),
            bos_token_id=config.get("bos_token_id"),
            dtype=_checkpoint_dtype(config, source),
        )


class _FieldReader:
    def __init__(self, config: dict[str, Any], source: str) -> None:
        self.config, self.source = config, source

    def str(self, key: str) -> str:
        value = self.config.get(key)
        if not isinstance(value, str):
            raise CheckpointError(f"{self.source}: field {key!r} is missing or not a string")
        return value

    def int(self, key: str, default: int | None = None) -> int:
        value = self.config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(
                f"{self.source}: field {key!r} must be a positive integer, got {value!r}"
            )
        return value


def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: not found (is this a Hugging Face model folder?)")
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _rope_args(config: dict[str, Any], source: str) -> RopeArgs:
    # transformers 5 folds rope_theta and rope_scaling into `rope_parameters`; older configs split
    # them. Where both appear, `rope_scaling` wins, as in transformers.
    params = dict(config.get("rope_parameters") or {})
    params.update(config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported (default, linear, llama3)"
        )
    if rope_type == "default":
        return RopeArgs(theta=theta)
    factor = float(params.get("factor", 1.0))
    if not math.isfinite(factor) or factor <= 0:
        raise CheckpointError(f"{source}: rope factor must be positive, got {factor!r}")
    return RopeArgs(
        theta=theta,
        rope_type=rope_type,
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _eos_ids(config: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (config, generation):
        value = source.get("eos_token_id")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and item not in ids:
                ids.append(item)
    return tuple(ids)


def _checkpoint_dtype(config: dict[str, Any], source: str) -> str:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise CheckpointError(f"{source}: dtype {name!r} is not supported ({', '.join(DTYPES)})")
    return name
