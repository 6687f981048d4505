"""Paged decode attention: one new query token per sequence against its paged KV cache.

Layout. The KV cache is one tensor ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]``;
this module takes one layer's ``k_cache = cache[layer, 0]`` and ``v_cache = cache[layer, 1]``,
each ``[num_blocks, block_size, kv_heads, head_dim]``. Token ``t`` of sequence ``i`` lives in
block ``block_tables[i, t // block_size]`` at slot ``t % block_size``; the first
``context_lens[i]`` tokens are valid (the current token's K/V is already written).

GQA: query head ``h`` reads kv head ``h // (num_heads // kv_heads)``. Scores, softmax and the
weighted sum are computed in float32; the output has ``q``'s dtype. A sequence whose
``context_lens`` is 0 (batch padding) gets a zero output.

The Triton kernel runs one program per (sequence, kv head): it loads the group of query heads
that share the kv head once, then walks the sequence's blocks with an online softmax, so each
K/V block is read from memory once per kv head. The torch reference gathers the blocks of a
chunk of sequences into dense tensors and runs one masked SDPA call (the fused CPU kernel); it is
the CPU serving path.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from disagg.kernels._triton import (
    HAS_TRITON,
    check_launchable,
    next_power_of_2,
    tl,
    triton,
    use_triton,
)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
# Bound on the float32 K+V the reference gathers at once: a batch is processed in chunks of
# sequences so the temporaries stay cache-sized and the allocator reuses them instead of
# page-faulting fresh memory on every call (several times faster than one big gather on CPU).
_REF_GATHER_BYTES = 8 * 2**20


@dataclass(frozen=True)
class GatherPlan:
    """Where the reference finds a step's decode K/V: per chunk of sequences, the cache row of
    each (sequence, kv head, token), which tokens are valid and which contexts are empty. It is
    the same in every layer of a step, so the model builds it once (`decode_gather_plan`)."""

    chunks: tuple[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor], ...]


def decode_gather_plan(
    k_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
) -> GatherPlan | None:
    """The plan for one step's layers, or None where the Triton kernel runs (it needs none)."""
    if use_triton(k_cache, block_tables, context_lens):
        return None
    return _gather_plan(block_tables, context_lens, k_cache.shape)


def _gather_plan(
    block_tables: torch.Tensor, context_lens: torch.Tensor, cache_shape: torch.Size
) -> GatherPlan:
    block_size, kv_heads, head_dim = cache_shape[1], cache_shape[2], cache_shape[3]
    batch = block_tables.shape[0]
    tokens = int(context_lens.max()) if batch else 0
    per = max(1, _REF_GATHER_BYTES // max(1, 2 * 4 * tokens * kv_heads * head_dim))
    chunks = []
    for start in range(0, batch, per):
        part = slice(start, start + per)
        lens = context_lens[part]
        n = int(lens.max())
        rows = _gather_rows(block_tables[part], n, block_size, kv_heads)
        valid = torch.arange(n, device=lens.device) < lens[:, None].long()
        chunks.append((part, rows, valid, lens == 0))
    return GatherPlan(tuple(chunks))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    plan: GatherPlan | None = None,
) -> torch.Tensor:
    """Decode attention over a paged KV cache: Triton on CUDA, the torch reference elsewhere.

    Args:
        q: [batch, num_heads, head_dim], one (RoPE'd) query token per sequence.
        k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim] of one layer.
        block_tables: int32 [batch, max_blocks], the block ids of each sequence in order;
            unused entries hold any valid block id.
        context_lens: int32 [batch], valid KV tokens per sequence (at most
            max_blocks * block_size; not checked, as that would synchronise the device).
        scale: softmax scale, usually head_dim ** -0.5.
        plan: the reference's `decode_gather_plan` for these tables, shared by a step's layers
            (built here when None).

    Returns:
        [batch, num_heads, head_dim] in q.dtype.
    """
    args = (q, k_cache, v_cache, block_tables, context_lens)
    if use_triton(*args):
        return paged_decode_attention_triton(*args, scale)
    return paged_decode_attention_ref(*args, scale, plan)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    plan: GatherPlan | None = None,
) -> torch.Tensor:
    """Plain-torch paged decode attention; same contract as `paged_decode_attention`.

    Fast when the caches are contiguous in (num_blocks, block_size, kv_heads), as views of the
    full cache are; otherwise each call copies the whole layer.
    """
    _check_args(q, k_cache, v_cache, block_tables, context_lens)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return out
    plan = plan or _gather_plan(block_tables, context_lens, k_cache.shape)
    # rows of the caches viewed as [num_blocks * block_size * kv_heads, head_dim]
    k_rows, v_rows = k_cache.flatten(0, 2), v_cache.flatten(0, 2)
    for part, rows, valid, empty in plan.chunks:
        out[part] = _ref_chunk(q[part], k_rows, v_rows, rows, valid, empty, scale)
    return out


def _ref_chunk(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    rows: torch.Tensor,
    valid: torch.Tensor,
    empty: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference attention for a chunk of sequences, gathering K/V rows into dense tensors."""
    batch, num_heads, head_dim = q.shape
    # k, v: [batch, kv_heads, tokens, head_dim], gathered in one pass in matmul-friendly order
    k = k_rows.index_select(0, rows.flatten()).view(*rows.shape, head_dim).float()
    v = v_rows.index_select(0, rows.flatten()).view(*rows.shape, head_dim).float()
    out = F.scaled_dot_product_attention(
        q.float()[:, :, None], k, v, attn_mask=valid[:, None, None, :], scale=scale,
        enable_gqa=num_heads != rows.shape[1],
    )  # fmt: skip
    # An empty context (batch padding) is a fully masked row, NaN out of the softmax: zero it.
    out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out.view(batch, num_heads, head_dim).to(q.dtype)


def _gather_rows(
    block_tables: torch.Tensor, tokens: int, block_size: int, kv_heads: int
) -> torch.Tensor:
    """Row ids into the flattened cache: int64 [batch, kv_heads, tokens]."""
    t = torch.arange(tokens, device=block_tables.device)
    slots = block_tables.long()[:, t // block_size] * block_size + t % block_size  # [batch, tokens]
    heads = torch.arange(kv_heads, device=block_tables.device)
    return slots[:, None, :] * kv_heads + heads[None, :, None]


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Launch the Triton paged decode kernel; same contract as `paged_decode_attention`.

    Also requires power-of-two block_size and head_dim, unit stride on the last dim of q and the
    caches, and all tensors on one device (CUDA, or CPU under TRITON_INTERPRET=1).
    """
    _check_args(q, k_cache, v_cache, block_tables, context_lens)
    _check_triton_args(q, k_cache, v_cache, block_tables, context_lens)
    batch, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    _paged_decode_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        float(scale) * math.log2(math.e),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), block_tables.stride(1), context_lens.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group,
        GROUP_PAD=next_power_of_2(group),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
    )  # fmt: skip
    return out


def _check_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    """Shape and dtype checks shared by the reference and the launcher (no device sync)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if q.dtype not in _FLOAT_DTYPES or k_cache.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            "q and the caches must be float32/bfloat16/float16, "
            f"got q {q.dtype} and caches {k_cache.dtype}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    batch, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    if num_heads % kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of kv_heads {kv_heads}")
    _check_index(block_tables, "block_tables", 2, batch)
    _check_index(context_lens, "context_lens", 1, batch)


def _check_index(t: torch.Tensor, name: str, dims: int, batch: int) -> None:
    """Check an integer index tensor has `dims` dims and `batch` rows."""
    if t.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 (or int64), got {t.dtype}")
    if t.dim() != dims or t.shape[0] != batch:
        raise ValueError(f"{name} must have {dims} dims and {batch} rows, got {tuple(t.shape)}")


def _check_triton_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    """Extra checks for the kernel: power-of-two tiles, unit inner strides, device."""
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    for name, size in (("block_size", block_size), ("head_dim", head_dim)):
        if size != next_power_of_2(size):
            raise ValueError(f"{name} must be a power of two for the Triton kernel, got {size}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride on its last dim, got {t.stride()}")
    check_launchable(
        "paged_decode_attention_triton", q, k_cache, v_cache, block_tables, context_lens
    )


if HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
        qk_scale,  # softmax scale * log2(e): the kernel works in base 2
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_tb, stride_tj, stride_lb,
        stride_ob, stride_oh,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        g = tl.arange(0, GROUP_PAD)
        t = tl.arange(0, BLOCK_SIZE)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        g_mask = g < GROUP
        context_len = tl.load(lens_ptr + seq * stride_lb)

        q_ptrs = q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=g_mask[:, None], other=0.0).to(tl.float32)  # [GROUP_PAD, D]
        q = q * qk_scale
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max score (base 2)
        denom = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)

        # Every block visited holds >= 1 valid token, so m is finite after the first one.
        for j in range(0, tl.cdiv(context_len, BLOCK_SIZE)):
            block = tl.load(tables_ptr + seq * stride_tb + j * stride_tj).to(tl.int64)
            t_mask = j * BLOCK_SIZE + t < context_len
            k_ptrs = k_ptr + block * stride_kb + t[:, None] * stride_kt + kv_head * stride_kh
            k = tl.load(k_ptrs + d[None, :], mask=t_mask[:, None], other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_PAD, BLOCK_SIZE]
            s = tl.where(t_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            v_ptrs = v_ptr + block * stride_vb + t[:, None] * stride_vt + kv_head * stride_vh
            v = tl.load(v_ptrs + d[None, :], mask=t_mask[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new

        out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]  # 0 only for an empty context
        out_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
