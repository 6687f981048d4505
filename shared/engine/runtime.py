"""Everything a model-serving process builds once at start: model, KV cache, block pool, engine."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from disagg.shared.config import group, option
from disagg.shared.engine.block_pool import BlockPool
from disagg.shared.engine.dtype import resolve_dtype
from disagg.shared.engine.engine import Engine
from disagg.shared.engine.grammar import Grammars
from disagg.shared.engine.kv_cache import KVCache, num_blocks_for_budget
from disagg.shared.engine.scheduler import EngineConfig
from disagg.shared.model.args import DTYPE_CHOICES
from disagg.shared.model.llama import Transformer
from disagg.shared.model.loader import expected_shapes, load_model
from disagg.shared.protocol.descriptor import model_fingerprint
from disagg.shared.protocol.types import DEFAULT_BLOCK_SIZE

GIB = 1 << 30


@dataclass(frozen=True)
class RuntimeConfig:
    """The model, its KV cache and the engine's limits (the flags of every model-loading
    command)."""

    model: Path = option(help="Hugging Face model folder (config.json, *.safetensors)")
    dtype: DTYPE_CHOICES = option(
        "auto", help="weights and KV dtype; auto: bfloat16 where this machine runs it fast "
        "(CUDA, AMX/AVX512-BF16 CPUs, measured at start), else float32",
    )  # fmt: skip
    device: str = option("cpu", help="cpu | cuda")
    kv_memory_gb: float = option(1.0, help="memory for the KV cache")
    block_size: int = option(DEFAULT_BLOCK_SIZE, help="tokens per KV block (a power of two)")
    engine: EngineConfig = group(EngineConfig)
    num_blocks: int | None = None  # overrides kv_memory_gb (tests)

    def __post_init__(self) -> None:
        if self.kv_memory_gb <= 0:
            raise ValueError(f"--kv-memory-gb must be positive, got {self.kv_memory_gb}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass
class Runtime:
    model: Transformer
    cache: KVCache
    pool: BlockPool
    engine: Engine
    fingerprint: str

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.pool.block_size


def build_runtime(
    cfg: RuntimeConfig, progress: Callable[[int, int], None] | None = None
) -> Runtime:
    """Load the model and size the KV cache (from ``num_blocks`` or the memory budget).

    ``progress(done, total)`` is called as weight tensors load.
    """
    dtype = resolve_dtype(cfg.dtype, cfg.device)
    model = load_model(cfg.model, dtype=dtype, device=cfg.device, progress=progress)
    a, dtype = model.args, model.embed_tokens.weight.dtype
    blocks = cfg.num_blocks or num_blocks_for_budget(
        int(cfg.kv_memory_gb * GIB), a.num_layers, cfg.block_size, a.num_kv_heads, a.head_dim, dtype
    )
    cache = KVCache(
        a.num_layers, blocks, cfg.block_size, a.num_kv_heads, a.head_dim, dtype, cfg.device
    )
    pool = BlockPool(blocks, cfg.block_size)
    grammars = Grammars(Path(cfg.model) / "tokenizer.json", a.vocab_size, a.eos_token_ids)
    engine = Engine(model, cache, pool, cfg.engine, grammars=grammars)
    return Runtime(model, cache, pool, engine, fingerprint_of(cfg.model, model))


def fingerprint_of(folder: Path, model: Transformer) -> str:
    """Model identity for the transfer handshake: architecture fields plus weight names/shapes."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return model_fingerprint(config, expected_shapes(model.args))


def tty_progress(label: str) -> Callable[[int, int], None] | None:
    """A one-line progress bar on stderr when it is a terminal; None otherwise (logs stay JSON)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        filled = 30 * done // total
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
