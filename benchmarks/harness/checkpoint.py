"""The benchmark checkpoint: a ~100M-parameter random Llama, written once under the user cache.

Same spec and folder as benchmarks/kv_transfer.py, so every benchmark shares one copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from disagg.cli.tiny import TinySpec, parameter_count, write_tiny_checkpoint

BENCH_SPEC = TinySpec(
    arch="llama", vocab_size=16384, hidden_size=768, intermediate_size=2048, num_layers=12,
    num_heads=12, num_kv_heads=4, max_position_embeddings=8192, init_std=0.02,
)  # fmt: skip


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "disagg"


def bench_checkpoint(spec: TinySpec = BENCH_SPEC) -> Path:
    """The folder of `spec`'s checkpoint, written atomically the first time it is asked for."""
    tag = hashlib.sha256(repr(spec).encode()).hexdigest()[:10]
    folder = cache_root() / "bench" / f"{spec.arch}-{parameter_count(spec) // 10**6}m-{tag}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".writing-"))
    print(f"writing the benchmark checkpoint to {folder} ...", file=sys.stderr, flush=True)
    write_tiny_checkpoint(tmp, spec)
    try:
        tmp.rename(folder)
    except OSError:  # another run finished first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
