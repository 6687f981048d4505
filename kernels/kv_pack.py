"""Pack one layer's KV blocks into a contiguous wire buffer (optionally INT8), and unpack them.

Layout. One layer of the KV cache is ``kv_layer = cache[layer]``, shaped
``[2, num_blocks, block_size, kv_heads, head_dim]`` (index 0 = K, 1 = V). Packing blocks
``block_ids`` (``[n]``) gives ``data`` ``[2, n, block_size, kv_heads, head_dim]``, contiguous, so
the sender ships it as one zero-copy frame; ``data[:, i]`` is block ``block_ids[i]``.

INT8 is symmetric per token per head: for each row ``x = kv_layer[c, b, t, h, :]``,
``scale = amax(|x|) / 127`` (1.0 when the row is all zeros, so zeros stay zeros) and
``q = round_half_even(x / scale)`` clamped to [-127, 127]; ``scales`` is float32
``[2, n, block_size, kv_heads]``. Unpacking writes ``q * scale`` (or the float data as is),
converted to the cache's dtype, so a bf16 sender can feed a float32 receiver.

The Triton kernels run one program per (block, K or V, tile of token-head rows); each row of
``head_dim`` values is quantized on its own, in float32.
"""

import torch

from disagg.kernels._triton import (
    HAS_TRITON,
    check_launchable,
    next_power_of_2,
    tl,
    triton,
    use_triton,
)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int64, torch.int32)
_QMAX = 127.0
# Upper bound on elements per program tile (rows * head_dim), to keep register use modest.
_TILE_ELEMENTS = 4096


def pack_kv(
    kv_layer: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    quantize: bool = False,
    out: torch.Tensor | None = None,
    scales_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gather blocks of one layer into a contiguous buffer: Triton on CUDA, torch elsewhere.

    Args:
        kv_layer: [2, num_blocks, block_size, kv_heads, head_dim], float32/bfloat16/float16.
        block_ids: int64 [n] on kv_layer's device (int32 accepted); not range-checked by the
            Triton kernel, as that would synchronise the device.
        quantize: pack as INT8 with per-token, per-head float32 scales.
        out: optional contiguous buffer [2, n, block_size, kv_heads, head_dim] to write into,
            of kv_layer's dtype (int8 when quantize).
        scales_out: optional contiguous float32 buffer [2, n, block_size, kv_heads] for the
            scales; only with quantize.

    Returns:
        (data, scales): data as `out` describes; scales float32 when quantize, else None.
    """
    if use_triton(kv_layer, block_ids):
        return pack_kv_triton(
            kv_layer, block_ids, quantize=quantize, out=out, scales_out=scales_out
        )
    return pack_kv_ref(kv_layer, block_ids, quantize=quantize, out=out, scales_out=scales_out)


def unpack_kv(
    kv_layer: torch.Tensor,
    block_ids: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> None:
    """Write packed blocks into kv_layer[:, block_ids] in place: Triton on CUDA, torch elsewhere.

    Args:
        kv_layer: [2, num_blocks, block_size, kv_heads, head_dim], the receiving layer.
        block_ids: int64 [n] (int32 accepted), distinct; where they repeat, which write wins is
            undefined.
        data: [2, n, block_size, kv_heads, head_dim], any float dtype (converted to the cache's),
            or int8 with scales.
        scales: float32 [2, n, block_size, kv_heads] when data is INT8, else None.
    """
    if use_triton(kv_layer, block_ids, data):
        unpack_kv_triton(kv_layer, block_ids, data, scales)
    else:
        unpack_kv_ref(kv_layer, block_ids, data, scales)


def pack_kv_ref(
    kv_layer: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    quantize: bool = False,
    out: torch.Tensor | None = None,
    scales_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain-torch `pack_kv`."""
    data, scales = _pack_outputs(kv_layer, block_ids, quantize, out, scales_out)
    if not quantize:
        torch.index_select(kv_layer, 1, block_ids, out=data)
        return data, None
    x = kv_layer.index_select(1, block_ids).float()  # [2, n, block_size, kv_heads, head_dim]
    amax = x.abs().amax(dim=-1)
    torch.div(amax, _QMAX, out=scales).masked_fill_(amax == 0, 1.0)
    data.copy_(torch.round(x / scales[..., None]).clamp_(-_QMAX, _QMAX))
    return data, scales


def unpack_kv_ref(
    kv_layer: torch.Tensor,
    block_ids: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> None:
    """Plain-torch `unpack_kv`."""
    _check_unpack_args(kv_layer, block_ids, data, scales)
    if scales is not None:
        data = data.float() * scales[..., None]
    kv_layer[:, block_ids] = data.to(kv_layer.dtype)


def pack_kv_triton(
    kv_layer: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    quantize: bool = False,
    out: torch.Tensor | None = None,
    scales_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the Triton pack kernel; same contract as `pack_kv`.

    Also requires a power-of-two head_dim, unit stride on kv_layer's last dim and all tensors on
    one device (CUDA, or CPU under TRITON_INTERPRET=1).
    """
    data, scales = _pack_outputs(kv_layer, block_ids, quantize, out, scales_out)
    _check_triton_args("pack_kv_triton", kv_layer, block_ids, data, scales)
    if block_ids.numel() == 0:
        return data, scales
    grid, meta = _launch_geometry(kv_layer, block_ids)
    _pack_kernel[grid](
        kv_layer, block_ids, data, data if scales is None else scales,
        block_ids.numel(), *kv_layer.stride()[:4],
        QUANTIZE=quantize, **meta,
    )  # fmt: skip
    return data, scales


def unpack_kv_triton(
    kv_layer: torch.Tensor,
    block_ids: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> None:
    """Launch the Triton unpack kernel; same contract as `unpack_kv`.

    Also requires contiguous data (and scales), a power-of-two head_dim, unit stride on
    kv_layer's last dim and all tensors on one device.
    """
    _check_unpack_args(kv_layer, block_ids, data, scales)
    _check_triton_args("unpack_kv_triton", kv_layer, block_ids, data, scales)
    if block_ids.numel() == 0:
        return
    grid, meta = _launch_geometry(kv_layer, block_ids)
    _unpack_kernel[grid](
        kv_layer, block_ids, data, data if scales is None else scales,
        block_ids.numel(), *kv_layer.stride()[:4],
        DEQUANTIZE=scales is not None, **meta,
    )  # fmt: skip


def _launch_geometry(kv_layer: torch.Tensor, block_ids: torch.Tensor) -> tuple[tuple, dict]:
    """Grid (block, K/V, row tile) and tile constants shared by the pack and unpack kernels."""
    block_size, kv_heads, head_dim = kv_layer.shape[2:]
    block_rows = block_size * kv_heads
    rows = min(next_power_of_2(block_rows), max(1, _TILE_ELEMENTS // head_dim))
    grid = (block_ids.numel(), 2, triton.cdiv(block_rows, rows))
    meta = dict(
        KV_HEADS=kv_heads,
        BLOCK_ROWS=block_rows,
        ROWS=rows,
        HEAD_DIM=head_dim,
    )
    return grid, meta


def _pack_outputs(
    kv_layer: torch.Tensor,
    block_ids: torch.Tensor,
    quantize: bool,
    out: torch.Tensor | None,
    scales_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the pack arguments; return the (given or new) data and scales buffers."""
    _check_layer(kv_layer, block_ids)
    if scales_out is not None and not quantize:
        raise ValueError("scales_out is only meaningful with quantize=True")
    shape = (2, block_ids.numel(), *kv_layer.shape[2:])
    dtype = torch.int8 if quantize else kv_layer.dtype
    data = _buffer(out, "out", shape, dtype, kv_layer.device)
    if not quantize:
        return data, None
    return data, _buffer(scales_out, "scales_out", shape[:-1], torch.float32, kv_layer.device)


def _buffer(
    buf: torch.Tensor | None,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Return `buf` after checking it matches exactly, or a new empty tensor when it is None."""
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(buf.shape) != shape or buf.dtype != dtype or buf.device != device:
        raise ValueError(
            f"{name} must be {dtype} {list(shape)} on {device}, "
            f"got {buf.dtype} {list(buf.shape)} on {buf.device}"
        )
    if not buf.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {buf.stride()}")
    return buf


def _check_layer(kv_layer: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Check kv_layer is one float layer [2, blocks, block_size, kv_heads, head_dim] and
    block_ids a 1-D integer tensor on its device."""
    if kv_layer.dim() != 5 or kv_layer.shape[0] != 2:
        raise ValueError(
            "kv_layer must be [2, num_blocks, block_size, kv_heads, head_dim], "
            f"got {tuple(kv_layer.shape)}"
        )
    if kv_layer.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"kv_layer must be float32/bfloat16/float16, got {kv_layer.dtype}")
    if block_ids.dim() != 1 or block_ids.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"block_ids must be a 1-D int64 tensor, got {block_ids.dtype} {tuple(block_ids.shape)}"
        )
    if block_ids.device != kv_layer.device:
        raise ValueError(f"block_ids on {block_ids.device} but kv_layer on {kv_layer.device}")


def _check_unpack_args(
    kv_layer: torch.Tensor,
    block_ids: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor | None,
) -> None:
    """Validate the unpack arguments against the layer they go into."""
    _check_layer(kv_layer, block_ids)
    shape = (2, block_ids.numel(), *kv_layer.shape[2:])
    if tuple(data.shape) != shape:
        raise ValueError(f"data must be {list(shape)}, got {list(data.shape)}")
    if data.device != kv_layer.device:
        raise ValueError(f"data on {data.device} but kv_layer on {kv_layer.device}")
    if scales is None:
        if data.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"data without scales must be a float dtype, got {data.dtype}")
        return
    if data.dtype != torch.int8:
        raise ValueError(f"data with scales must be int8, got {data.dtype}")
    if tuple(scales.shape) != shape[:-1] or scales.dtype != torch.float32:
        raise ValueError(
            f"scales must be float32 {list(shape[:-1])}, got {scales.dtype} {list(scales.shape)}"
        )
    if scales.device != kv_layer.device:
        raise ValueError(f"scales on {scales.device} but kv_layer on {kv_layer.device}")


def _check_triton_args(
    name: str,
    kv_layer: torch.Tensor,
    block_ids: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor | None,
) -> None:
    """Extra checks for the kernels: power-of-two head_dim, layouts they assume, device."""
    head_dim = kv_layer.shape[-1]
    if head_dim != next_power_of_2(head_dim):
        raise ValueError(f"{name}: head_dim must be a power of two, got {head_dim}")
    if kv_layer.stride(-1) != 1:
        raise ValueError(f"{name}: kv_layer needs unit stride on head_dim, got {kv_layer.stride()}")
    if not data.is_contiguous() or (scales is not None and not scales.is_contiguous()):
        raise ValueError(f"{name}: data and scales must be contiguous")
    check_launchable(name, *[t for t in (kv_layer, block_ids, data, scales) if t is not None])


if HAS_TRITON:

    @triton.jit
    def _round_half_even(x):
        """Round to nearest, ties to even, like torch.round; exact for |x| < 2**23."""
        r = tl.floor(x)
        frac = x - r
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        up = (frac > 0.5) | ((frac == 0.5) & odd)
        return tl.where(up, r + 1.0, r)

    @triton.jit
    def _pack_kernel(
        layer_ptr, ids_ptr, data_ptr, scales_ptr,
        num_ids,  # n: data is [2, n, block_size, kv_heads, head_dim]
        stride_c, stride_b, stride_t, stride_h,
        KV_HEADS: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,  # block_size * kv_heads: rows of head_dim values per block
        ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        QUANTIZE: tl.constexpr,
    ):  # fmt: skip
        i = tl.program_id(0)
        c = tl.program_id(1).to(tl.int64)  # 0 = K, 1 = V
        r = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
        d = tl.arange(0, HEAD_DIM)
        r_mask = r < BLOCK_ROWS
        block = tl.load(ids_ptr + i).to(tl.int64)
        src = layer_ptr + c * stride_c + block * stride_b
        src_rows = src + (r // KV_HEADS) * stride_t + (r % KV_HEADS) * stride_h
        x = tl.load(src_rows[:, None] + d[None, :], mask=r_mask[:, None], other=0.0)
        dst_row = (c * num_ids + i) * BLOCK_ROWS + r  # [ROWS], int64
        dst = data_ptr + dst_row[:, None] * HEAD_DIM + d[None, :]
        if QUANTIZE:
            x = x.to(tl.float32)  # [ROWS, HEAD_DIM]
            amax = tl.max(tl.abs(x), axis=1)
            # div_rn: IEEE division, so the result matches torch bit for bit on GPU too.
            scale = tl.math.div_rn(amax, tl.full([ROWS], 127.0, tl.float32))
            scale = tl.where(amax == 0.0, 1.0, scale)
            y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], (ROWS, HEAD_DIM)))
            y = tl.minimum(tl.maximum(_round_half_even(y), -127.0), 127.0)
            tl.store(dst, y.to(tl.int8), mask=r_mask[:, None])
            tl.store(scales_ptr + dst_row, scale, mask=r_mask)
        else:
            tl.store(dst, x, mask=r_mask[:, None])

    @triton.jit
    def _unpack_kernel(
        layer_ptr, ids_ptr, data_ptr, scales_ptr,
        num_ids,  # n: data is [2, n, block_size, kv_heads, head_dim]
        stride_c, stride_b, stride_t, stride_h,
        KV_HEADS: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        ROWS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        DEQUANTIZE: tl.constexpr,
    ):  # fmt: skip
        i = tl.program_id(0)
        c = tl.program_id(1).to(tl.int64)
        r = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
        d = tl.arange(0, HEAD_DIM)
        r_mask = r < BLOCK_ROWS
        src_row = (c * num_ids + i) * BLOCK_ROWS + r
        x = tl.load(data_ptr + src_row[:, None] * HEAD_DIM + d[None, :], mask=r_mask[:, None])
        if DEQUANTIZE:
            scale = tl.load(scales_ptr + src_row, mask=r_mask, other=1.0)
            x = x.to(tl.float32) * scale[:, None]
        block = tl.load(ids_ptr + i).to(tl.int64)
        dst = layer_ptr + c * stride_c + block * stride_b
        dst_rows = dst + (r // KV_HEADS) * stride_t + (r % KV_HEADS) * stride_h
        value = x.to(layer_ptr.dtype.element_ty)
        tl.store(dst_rows[:, None] + d[None, :], value, mask=r_mask[:, None])
