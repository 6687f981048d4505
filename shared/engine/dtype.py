"""What `--dtype auto` means on this machine: bfloat16 where the hardware runs it fast (CUDA
with bf16 support; a CPU whose measured bf16 matmul clearly beats fp32, i.e. AMX or
AVX512-BF16), float32 otherwise. Measured once per process (about 0.1 s) and logged."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from disagg.shared.log import get_logger

log = get_logger("disagg.engine")
PROBE_N = 512  # square matmul of the probe
FAST_ENOUGH = 1.5  # bf16 FLOP/s over fp32 FLOP/s that counts as hardware bf16


def matmul_flops(dtype: torch.dtype, n: int = PROBE_N, repeats: int = 3) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` on the CPU (best of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up (kernel selection, page faults)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def resolve_dtype(
    dtype: str, device: str, measure: Callable[[torch.dtype], float] = matmul_flops
) -> str:
    """``dtype`` unless it is "auto"; then "bfloat16" or "float32" as this machine runs faster."""
    if dtype != "auto":
        return dtype
    if str(device).startswith("cuda"):
        chosen = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        log.info("dtype_auto", device=device, dtype=chosen)
        return chosen
    return _cpu_choice(measure)


@functools.cache
def _cpu_choice(measure: Callable[[torch.dtype], float]) -> str:
    fp32, bf16 = measure(torch.float32), measure(torch.bfloat16)
    chosen = "bfloat16" if bf16 >= FAST_ENOUGH * fp32 else "float32"
    log.info("dtype_auto", device="cpu", dtype=chosen, fp32_gflops=round(fp32 / 1e9, 1),
             bf16_gflops=round(bf16 / 1e9, 1))  # fmt: skip
    return chosen
