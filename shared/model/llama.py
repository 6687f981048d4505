"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

One file for the family: Qwen2 adds q/k/v biases, Qwen3 adds RMSNorm on q and k per head; Mistral
is Llama with a sliding window we do not exceed (ModelArgs.max_model_len caps the context).
Numerics follow the Hugging Face reference: RMSNorm in float32, RoPE tables in float32 cast to the
activation dtype, attention softmax in float32, logits returned as float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from disagg.kernels.paged_attention import GatherPlan, decode_gather_plan, paged_decode_attention
from disagg.shared.engine.kv_cache import KVCache
from disagg.shared.model.args import ModelArgs, RopeArgs
from disagg.shared.model.batch import ForwardBatch, PrefillSegment

LayerHook = Callable[[int], None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, rope: RopeArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, with linear or Llama-3 scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeArgs) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [tokens, heads, head_dim]; cos/sin: [tokens, 1, head_dim]
    return x * cos + _rotate_half(x) * sin


class Linear(nn.Linear):
    """``nn.Linear`` whose weight may be kept transposed ([in, out], contiguous).

    On a CPU in float32 ``x @ W`` beats ``x @ W.T`` (what ``F.linear`` does) at the few rows
    of a decode step and ties at a prefill's hundreds: a batch-8 decode step of the 100M
    model 82 -> 72.5 ms (``benchmarks/README.md``); bf16 prefers ``F.linear``. ``transpose()``
    swaps the layout once, after loading (the parameter is then ``weight_t``)."""

    def transpose(self) -> None:
        weight = self.weight.detach()
        del self.weight
        self.weight_t = nn.Parameter(weight.t().contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight_t = getattr(self, "weight_t", None)
        if weight_t is None:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return x @ weight_t
        return torch.addmm(self.bias, x, weight_t)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
        )
        self.scale = args.head_dim**-0.5
        q_out, kv_out = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        # q, k and v in one matmul (the checkpoint's three weights concatenated at load).
        self.qkv_proj = Linear(args.hidden_size, q_out + 2 * kv_out, bias=args.qkv_bias)
        self.qkv_split = (q_out, kv_out, kv_out)
        self.o_proj = Linear(q_out, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        kv_layer: torch.Tensor,
        after_kv_write: Callable[[], None] | None,
        plan: GatherPlan | None = None,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k_cache, v_cache = kv_layer[0], kv_layer[1]  # [blocks, block_size, kv_heads, head_dim]
        _write_kv(k_cache, v_cache, k, v, batch.slot_mapping)
        if after_kv_write is not None:
            after_kv_write()
        out = torch.empty_like(q)  # [tokens, heads, head_dim]
        for seg in batch.prefills:
            span = slice(seg.start, seg.start + seg.length)
            out[span] = self._prefill(q[span], k[span], v[span], k_cache, v_cache, seg)
        if batch.num_decodes:
            span = slice(batch.num_prefill_tokens, tokens)
            out[span] = paged_decode_attention(
                q[span],
                k_cache,
                v_cache,
                batch.decode_block_tables,
                batch.decode_context_lens,
                self.scale,
                plan,
            )
        return self.o_proj(out.view(tokens, self.num_heads * self.head_dim))

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        seg: PrefillSegment,
    ) -> torch.Tensor:
        # q: [chunk, heads, head_dim]; k/v: [context, kv_heads, head_dim]
        mask = None
        if not seg.is_whole_prompt:
            k = _gather_context(k_cache, seg.block_table, seg.context_len)
            v = _gather_context(v_cache, seg.block_table, seg.context_len)
            first = seg.context_len - seg.length
            query_pos = torch.arange(first, seg.context_len, device=q.device)[:, None]
            mask = torch.arange(seg.context_len, device=q.device)[None, :] <= query_pos
        # 4-d [1, heads, tokens, head_dim]: on a CPU only a batched call takes the fused
        # (flash) kernel; 3-d falls back to the math path, 3x slower at 512 tokens and GQA.
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out[0].transpose(0, 1)


def _write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    heads, dim = k_cache.shape[-2:]
    k_cache.view(-1, heads, dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, heads, dim).index_copy_(0, slots, v.to(v_cache.dtype))


def _gather_context(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    # cache: [blocks, block_size, kv_heads, head_dim] -> [length, kv_heads, head_dim]
    return cache.index_select(0, table).flatten(0, 1)[:length]


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # gate and up in one matmul (concatenated at load).
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h, rope, batch, kv_layer, after_kv_write, plan=None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(h), rope, batch, kv_layer, after_kv_write, plan)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """The decoder. Parameter names equal the HF checkpoint's with the `model.` prefix dropped."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args.head_dim, args.rope), persistent=False)

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, kv_cache: KVCache, layer_hook: LayerHook | None = None
    ) -> torch.Tensor:
        """Run one step; returns float32 logits [len(batch.logits_indices), vocab].

        `layer_hook(i)` runs right after layer i's K/V for every token of the batch is in the cache,
        before that layer's attention: the prefill worker ships layer i while the rest computes.
        """
        h = self.embed_tokens(batch.input_ids)  # [tokens, hidden]
        rope = self._rope_tables(batch.positions, h.dtype)
        plan = None  # where the decodes' K/V rows are: the same in every layer
        if batch.num_decodes:
            tables, lens = batch.decode_block_tables, batch.decode_context_lens
            plan = decode_gather_plan(kv_cache.layer(0)[0], tables, lens)
        for i, layer in enumerate(self.layers):
            hook = None if layer_hook is None else (lambda i=i: layer_hook(i))
            h = layer(h, rope, batch, kv_cache.layer(i), hook, plan)
        h = self.norm(h.index_select(0, batch.logits_indices))
        return self.lm_head(h).float()

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [tokens, head_dim]
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]
