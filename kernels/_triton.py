"""Whether the Triton kernels can run here, and which path the dispatchers take.

Triton is optional: it ships for Linux x86-64 only, and every kernel has a plain-torch reference
that runs anywhere. A Triton kernel runs on CUDA tensors, or on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is first imported; the tests do this in
a subprocess).

``DISAGG_KERNELS`` chooses the path of every dispatcher, read at each call:

- ``auto`` (default): Triton when all tensors are on CUDA and Triton is installed, else torch;
- ``triton``: always Triton (on CPU this needs the interpreter, else the launcher raises);
- ``torch``: always the torch reference, e.g. to rule a kernel out while debugging.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch references still work; the kernels are never defined
    triton = None
    tl = None

HAS_TRITON = triton is not None

# Triton decides between compiling and interpreting when a kernel is decorated, i.e. at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

_MODES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    """The dispatch mode from ``DISAGG_KERNELS``: ``auto``, ``triton`` or ``torch``."""
    mode = os.environ.get("DISAGG_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"DISAGG_KERNELS must be one of {_MODES}, got {mode!r}")
    return mode


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when a dispatcher should launch the Triton kernel on these tensors."""
    mode = kernel_mode()
    if mode != "auto":
        return mode == "triton"
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def check_launchable(name: str, *tensors: torch.Tensor) -> None:
    """Raise a ValueError unless a Triton kernel can run on these tensors here."""
    if not HAS_TRITON:
        raise ValueError(f"{name}: triton is not installed; use the torch reference")
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(f"{name}: all tensors must be on one device, got {devices}")
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"{name}: Triton needs CUDA tensors, got {device}; on CPU set TRITON_INTERPRET=1 "
            "before triton is imported"
        )


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1); Triton tile sizes must be powers of two."""
    return 1 << max(n - 1, 0).bit_length()
