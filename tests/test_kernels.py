"""Kernel tests: each Triton kernel against its torch reference, each reference against the math.

Triton runs on CPU only under TRITON_INTERPRET=1, which must be set before triton is imported,
and other test modules of the session import triton first. So the Triton runs happen in one
subprocess: this file run as a script with TRITON_INTERPRET=1. It reads the cases built here,
runs the `*_triton` launchers on them and saves the outputs; the tests here compare those
outputs with the torch references, computed in this process.

Tolerances: float32 outputs agree to 1e-5. Half-precision outputs may differ by one unit in the
last place from the final rounding (float16 atol/rtol 1e-3), and bfloat16 by 2**-7 relative
plus 1e-2 absolute: the interpreter truncates float32 -> bfloat16 where torch and the GPU round
to nearest even. Packing (INT8 included) is bit-exact.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg.kernels import _triton
from disagg.kernels import paged_attention as pa
from disagg.kernels.kv_pack import (
    pack_kv,
    pack_kv_ref,
    pack_kv_triton,
    unpack_kv,
    unpack_kv_ref,
    unpack_kv_triton,
)
from disagg.kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=2**-7),
}
INTERPRETER_TIMEOUT_S = 240


# ----------------------------------------------------------------------------- case builders


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_attention_case(
    lens: list[int],
    num_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    block_size: int = 4,
    dtype: torch.dtype = torch.float32,
    strided_q: bool = False,
    seed: int = 0,
) -> dict:
    """Inputs for paged attention: layer 1 of a 2-layer cache, shuffled non-contiguous blocks,
    one padding column in the block table, optionally q as a slice of a fused qkv tensor."""
    g = _gen(seed)
    per_seq = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(per_seq) + 3
    shape = (2, 2, num_blocks, block_size, kv_heads, head_dim)
    cache = torch.randn(shape, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lens), max(per_seq) + 1, dtype=torch.int32)
    start = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = perm[start : start + n]
        start += n
    width = (num_heads + 2 * kv_heads) * head_dim if strided_q else num_heads * head_dim
    qkv = torch.randn(len(lens), width, generator=g).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(len(lens), num_heads, head_dim)
    return {
        "kind": "attention",
        "args": [q, cache[1, 0], cache[1, 1], tables, torch.tensor(lens, dtype=torch.int32)],
        "scale": head_dim**-0.5,
    }


def make_layer(
    dtype: torch.dtype,
    num_blocks: int = 8,
    block_size: int = 4,
    kv_heads: int = 3,
    head_dim: int = 16,
    seed: int = 0,
) -> torch.Tensor:
    """Layer 1 of a 2-layer cache, with one all-zero token-head row and one all-zero block."""
    g = _gen(seed)
    cache = torch.randn(2, 2, num_blocks, block_size, kv_heads, head_dim, generator=g)
    cache = cache * torch.logspace(-3, 2, head_dim)  # rows of very different magnitudes
    cache[1, 0, 5, 1, 2] = 0.0
    cache[1, 1, 3] = 0.0
    cache[1, 0, 0, 0, 0] = 0.0  # a row whose scale is exactly 1, with ties to round to even
    cache[1, 0, 0, 0, 0, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -3.5])
    return cache.to(dtype)[1]


def make_pack_case(dtype: torch.dtype, quantize: bool, with_out: bool = False, **layer) -> dict:
    """Inputs for pack_kv: blocks out of order, including the zero rows and a repeated id."""
    kv_layer = make_layer(dtype, **layer)
    block_ids = torch.tensor([5, 0, 3, 6, 5])
    case = {"kind": "pack", "args": [kv_layer, block_ids], "quantize": quantize}
    if with_out:
        shape = (2, 5, *kv_layer.shape[2:])
        case["out"] = torch.full(shape, 7, dtype=torch.int8 if quantize else dtype)
        case["scales_out"] = torch.full(shape[:-1], -1.0) if quantize else None
    return case


def make_unpack_case(src: torch.dtype, dst: torch.dtype, quantize: bool) -> dict:
    """Inputs for unpack_kv: blocks packed from a `src` layer, written into a `dst` layer."""
    block_ids = torch.tensor([6, 1, 3])
    data, scales = pack_kv_ref(make_layer(src, seed=1), block_ids, quantize=quantize)
    kv_layer = make_layer(dst, seed=2)
    return {"kind": "unpack", "args": [kv_layer, block_ids, data, scales]}


def triton_cases() -> dict[str, dict]:
    """Every case the interpreter subprocess runs, by name."""
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    ragged = [1, 4, 11, 7, 0]  # one token, exactly one block, partial blocks, empty (padding)
    return {
        "attn_fp32_gqa": make_attention_case(ragged),
        "attn_fp32_mha_block8": make_attention_case([8, 17, 3], 2, 2, 32, 8, seed=1),
        "attn_fp32_group3_strided_q": make_attention_case([5, 9], 6, 2, strided_q=True, seed=2),
        "attn_fp32_group8_block16": make_attention_case([16, 33], 8, 1, 16, 16, seed=3),
        "attn_fp16_gqa": make_attention_case(ragged, dtype=f16, seed=4),
        "attn_bf16_gqa": make_attention_case(ragged, dtype=bf16, seed=5),
        "pack_fp32": make_pack_case(f32, False),
        "pack_fp16": make_pack_case(f16, False),
        "pack_fp32_int8": make_pack_case(f32, True),
        "pack_bf16_int8": make_pack_case(bf16, True),
        "pack_fp16_int8_out": make_pack_case(f16, True, with_out=True),
        "pack_bf16_out": make_pack_case(bf16, False, with_out=True),
        # 32 rows of head_dim 256 per block: two row tiles per program grid column
        "pack_fp32_int8_tiles": make_pack_case(f32, True, kv_heads=4, head_dim=256),
        "unpack_fp32": make_unpack_case(f32, f32, False),
        "unpack_bf16_into_fp32": make_unpack_case(bf16, f32, False),
        "unpack_fp32_into_bf16": make_unpack_case(f32, bf16, False),
        "unpack_fp16_into_bf16": make_unpack_case(f16, bf16, False),
        "unpack_int8_into_fp32": make_unpack_case(f32, f32, True),
        "unpack_int8_into_bf16": make_unpack_case(bf16, bf16, True),
    }


# ------------------------------------------------------------------- interpreter subprocess


def run_triton_case(case: dict) -> dict:
    """Run one case through its Triton launcher (in the interpreter subprocess)."""
    if case["kind"] == "attention":
        return {"out": paged_decode_attention_triton(*case["args"], case["scale"])}
    if case["kind"] == "pack":
        out = case.get("out")
        data, scales = pack_kv_triton(
            *case["args"], quantize=case["quantize"], out=out, scales_out=case.get("scales_out")
        )
        return {"data": data, "scales": scales, "wrote_into_out": out is not None and data is out}
    kv_layer = case["args"][0]
    unpack_kv_triton(*case["args"])
    return {"layer": kv_layer}


def _interpreter_main(cases_path: str, results_path: str) -> None:
    assert _triton.INTERPRET, "run with TRITON_INTERPRET=1"
    cases = torch.load(cases_path, weights_only=True)
    torch.save({name: run_triton_case(case) for name, case in cases.items()}, results_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> tuple[dict, dict]:
    """(cases, Triton results), from one TRITON_INTERPRET=1 subprocess for the whole module."""
    if not _triton.HAS_TRITON:
        pytest.skip("triton is not installed")
    if os.environ.get("DISAGG_KERNEL_TESTS_ON_CUDA") == "1":  # compiled, on a GPU (gpu_check.sh)
        assert torch.cuda.is_available(), "DISAGG_KERNEL_TESTS_ON_CUDA=1 needs a CUDA device"
        cases = triton_cases()
        results = {n: _moved(run_triton_case(_moved(c, "cuda")), "cpu") for n, c in cases.items()}
        return cases, results
    folder = tmp_path_factory.mktemp("triton")
    cases_path, results_path = folder / "cases.pt", folder / "results.pt"
    cases = triton_cases()
    torch.save(cases, cases_path)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, __file__, str(cases_path), str(results_path)]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=INTERPRETER_TIMEOUT_S
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed:\n{proc.stderr[-4000:]}")
    return cases, torch.load(results_path, weights_only=True)


def _moved(value, device: str):
    """``value`` (tensors in dicts and lists) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_moved(v, device) for v in value)
    return value


TRITON_CASE_NAMES = list(triton_cases())


def _names(prefix: str) -> list[str]:
    return [name for name in TRITON_CASE_NAMES if name.startswith(prefix)]


# ------------------------------------------------------------------ Triton vs reference


@pytest.mark.parametrize("name", _names("attn_"))
def test_triton_attention_matches_reference(interpreted, name):
    cases, results = interpreted
    case = cases[name]
    expected = paged_decode_attention_ref(*case["args"], case["scale"])
    got = results[name]["out"]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL[expected.dtype])


@pytest.mark.parametrize("name", _names("pack_"))
def test_triton_pack_matches_reference_exactly(interpreted, name):
    cases, results = interpreted
    case, got = cases[name], results[name]
    kv_layer, block_ids = case["args"]
    data, scales = pack_kv_ref(kv_layer, block_ids, quantize=case["quantize"])
    assert torch.equal(got["data"], data)
    if case["quantize"]:
        assert torch.equal(got["scales"], scales)
        assert_int8_error_bound(kv_layer[:, block_ids], got["data"], got["scales"])
    else:
        assert got["scales"] is None
    assert got["wrote_into_out"] == ("out" in case)


@pytest.mark.parametrize("name", _names("unpack_"))
def test_triton_unpack_matches_reference(interpreted, name):
    cases, results = interpreted
    kv_layer, block_ids, data, scales = cases[name]["args"]
    expected = kv_layer.clone()
    unpack_kv_ref(expected, block_ids, data, scales)
    got = results[name]["layer"]
    if expected.dtype == torch.bfloat16 and data.dtype != torch.bfloat16:
        torch.testing.assert_close(got, expected, atol=0.0, rtol=2**-7)
    else:  # same dtype, a widening conversion, or dequantized into float32: exact
        assert torch.equal(got, expected)


# ------------------------------------------------------ paged attention reference vs the math


def sdpa_attention(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """Independent reference: per sequence, gather its tokens one by one and run SDPA."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    outs = []
    for i, n in enumerate(context_lens.tolist()):
        slots = [(int(block_tables[i, t // block_size]), t % block_size) for t in range(n)]
        k = torch.stack([k_cache[b, s] for b, s in slots]).float()  # [n, kv_heads, head_dim]
        v = torch.stack([v_cache[b, s] for b, s in slots]).float()
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [num_heads, n, head_dim]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qi = q[i].float()[:, None, :]  # [num_heads, 1, head_dim]
        o = torch.nn.functional.scaled_dot_product_attention(qi, k, v, scale=scale)
        outs.append(o[:, 0])
    return torch.stack(outs).to(q.dtype)


ATTENTION_CONFIGS = {
    "gqa_ragged": dict(lens=[1, 4, 11, 7]),
    "mha_block8": dict(lens=[8, 17, 3], num_heads=2, kv_heads=2, head_dim=32, block_size=8),
    "group3_strided_q": dict(lens=[5, 9, 2], num_heads=6, kv_heads=2, strided_q=True),
    "mqa_long": dict(lens=[70, 33], num_heads=8, kv_heads=1, head_dim=64, block_size=16),
    "bf16_gqa": dict(lens=[1, 4, 11, 7], dtype=torch.bfloat16),
    "fp16_gqa": dict(lens=[3, 16, 9], dtype=torch.float16),
}


@pytest.mark.parametrize("config", ATTENTION_CONFIGS)
def test_reference_attention_matches_sdpa(config):
    case = make_attention_case(**ATTENTION_CONFIGS[config], seed=7)
    got = paged_decode_attention_ref(*case["args"], case["scale"])
    expected = sdpa_attention(*case["args"], case["scale"])
    torch.testing.assert_close(got, expected, **TOL[got.dtype])


def test_reference_attention_chunks_agree_with_one_pass(monkeypatch):
    case = make_attention_case([13, 1, 6, 20, 4], seed=8)
    whole = paged_decode_attention_ref(*case["args"], case["scale"])
    monkeypatch.setattr(pa, "_REF_GATHER_BYTES", 1)  # one sequence per chunk
    chunked = paged_decode_attention_ref(*case["args"], case["scale"])
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def test_one_gather_plan_serves_every_layer_of_a_step(monkeypatch):
    """The model builds the plan once per step and passes it to each layer's attention."""
    monkeypatch.setattr(pa, "_REF_GATHER_BYTES", 1)  # several chunks in the plan
    case = make_attention_case([13, 1, 0, 20], seed=10)
    q, k, v, tables, lens = case["args"]
    plan = pa.decode_gather_plan(k, tables, lens)
    assert plan is not None and len(plan.chunks) == 4
    other = make_attention_case([13, 1, 0, 20], seed=11)["args"]  # another layer, same tables
    for layer_k, layer_v in ((k, v), (other[1], other[2])):
        alone = paged_decode_attention(q, layer_k, layer_v, tables, lens, case["scale"])
        shared = paged_decode_attention(q, layer_k, layer_v, tables, lens, case["scale"], plan)
        assert torch.equal(shared, alone)
    monkeypatch.setenv("DISAGG_KERNELS", "triton")  # the kernel walks the tables itself
    assert pa.decode_gather_plan(k, tables, lens) is None


def test_reference_attention_empty_context_is_zero():
    case = make_attention_case([0, 5], seed=9)
    out = paged_decode_attention_ref(*case["args"], case["scale"])
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out[1]).all() and out[1].abs().sum() > 0


def test_attention_empty_batch():
    case = make_attention_case([3])
    q, k, v, tables, lens = case["args"]
    out = paged_decode_attention_ref(q[:0], k, v, tables[:0], lens[:0], case["scale"])
    assert out.shape == (0, *q.shape[1:])


def _replace(args: list, index: int, value) -> list:
    return [value if i == index else a for i, a in enumerate(args)]


@pytest.mark.parametrize(
    "index, bad, match",
    [
        (0, lambda t: t[0], "q must be"),
        (0, lambda t: t[:, :3], "not a multiple"),
        (0, lambda t: t[..., :8], "head_dim"),
        (0, lambda t: t.int(), "float32"),
        (1, lambda t: t[..., 0], "k_cache and v_cache"),
        (2, lambda t: t.half(), "v_cache is"),
        (3, lambda t: t.float(), "block_tables must be int32"),
        (3, lambda t: t[:2], "block_tables must have"),
        (4, lambda t: t[:, None], "context_lens must have"),
    ],
)
def test_attention_rejects_bad_arguments(index, bad, match):
    case = make_attention_case([3, 5, 2])
    args = _replace(case["args"], index, bad(case["args"][index]))
    for fn in (paged_decode_attention_ref, paged_decode_attention_triton):
        with pytest.raises(ValueError, match=match):
            fn(*args, case["scale"])


def test_attention_triton_rejects_non_power_of_two_block_size():
    case = make_attention_case([3, 5], block_size=6)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        paged_decode_attention_triton(*case["args"], case["scale"])


@pytest.mark.skipif(
    not _triton.HAS_TRITON or _triton.INTERPRET, reason="needs triton without the interpreter"
)
def test_triton_launchers_reject_cpu_tensors():
    case = make_attention_case([3, 5])
    with pytest.raises(ValueError, match="CUDA"):
        paged_decode_attention_triton(*case["args"], case["scale"])
    with pytest.raises(ValueError, match="CUDA"):
        pack_kv_triton(make_layer(torch.float32), torch.tensor([1]))


# --------------------------------------------------------------- pack / unpack reference


def assert_int8_error_bound(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> None:
    """|x - q * scale| <= scale / 2 elementwise, up to float32 rounding of the arithmetic."""
    x = x.float()
    restored = data.float() * scales[..., None]
    bound = scales[..., None] * (0.5 + 1e-5) + x.abs() * 2**-22
    assert (x - restored).abs().le(bound).all()
    assert data.abs().max() <= 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_round_trip_is_exact(dtype):
    kv_layer = make_layer(dtype)
    block_ids = torch.tensor([2, 7, 0])
    data, scales = pack_kv(kv_layer, block_ids)
    assert scales is None and data.is_contiguous() and data.dtype == dtype
    assert data.shape == (2, 3, *kv_layer.shape[2:])
    target = torch.zeros_like(kv_layer)
    unpack_kv(target, block_ids, data)
    assert torch.equal(target[:, block_ids], kv_layer[:, block_ids])
    untouched = torch.ones(kv_layer.shape[1], dtype=torch.bool)
    untouched[block_ids] = False
    assert torch.equal(target[:, untouched], torch.zeros_like(target[:, untouched]))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    magnitude=st.floats(-8, 8),
    head_dim=st.sampled_from([16, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_int8_round_trip_error_is_at_most_half_a_step(seed, magnitude, head_dim, dtype):
    if dtype == torch.float16:
        magnitude = min(magnitude, 3.0)  # float16 overflows past 65504
    g = _gen(seed)
    kv_layer = (torch.randn(2, 4, 4, 2, head_dim, generator=g) * 10**magnitude).to(dtype)
    kv_layer[0, 1, 2] = 0.0
    block_ids = torch.tensor([3, 1, 2])
    data, scales = pack_kv_ref(kv_layer, block_ids, quantize=True)
    assert data.dtype == torch.int8 and scales.dtype == torch.float32
    assert_int8_error_bound(kv_layer[:, block_ids], data, scales)
    target = torch.zeros(kv_layer.shape, dtype=torch.float32)
    unpack_kv_ref(target, block_ids, data, scales)
    restored = data.float() * scales[..., None]
    assert torch.equal(target[:, block_ids], restored)


def test_int8_zero_rows_stay_zero_with_unit_scale():
    kv_layer = torch.zeros(2, 3, 4, 2, 16)
    kv_layer[1, 2, 0, 1] = torch.linspace(-2, 2, 16)
    data, scales = pack_kv(kv_layer, torch.tensor([0, 2]), quantize=True)
    assert torch.equal(data[0], torch.zeros_like(data[0]))
    assert torch.equal(scales[0], torch.ones_like(scales[0]))
    assert scales[1, 1, 0, 1] == pytest.approx(2 / 127)
    assert data[1, 1, 0, 1, 0] == -127 and data[1, 1, 0, 1, -1] == 127
    target = torch.full_like(kv_layer, 5.0)
    unpack_kv(target, torch.tensor([0, 2]), data, scales)
    assert torch.equal(target[:, 0], torch.zeros_like(target[:, 0]))


def test_int8_rounds_half_to_even():
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.49, 0.0])  # scale is exactly 1
    kv_layer = torch.zeros(2, 1, 1, 1, 8)
    kv_layer[0, 0, 0, 0] = row
    data, _ = pack_kv_ref(kv_layer, torch.tensor([0]), quantize=True)
    assert data[0, 0, 0, 0].tolist() == [127, 0, 2, 2, 0, -2, 3, 0]


def test_unpack_converts_bf16_wire_data_into_fp32_cache():
    source = make_layer(torch.bfloat16)
    block_ids = torch.tensor([4, 2])
    data, _ = pack_kv(source, block_ids)
    target = torch.zeros(source.shape, dtype=torch.float32)
    unpack_kv(target, block_ids, data)
    assert torch.equal(target[:, block_ids], source[:, block_ids].float())


def test_pack_writes_into_given_buffers():
    kv_layer = make_layer(torch.float32)
    block_ids = torch.tensor([1, 6])
    out = torch.empty(2, 2, *kv_layer.shape[2:], dtype=torch.int8)
    scales_out = torch.empty(2, 2, *kv_layer.shape[2:4])
    data, scales = pack_kv(kv_layer, block_ids, quantize=True, out=out, scales_out=scales_out)
    assert data is out and scales is scales_out
    expected, expected_scales = pack_kv_ref(kv_layer, block_ids, quantize=True)
    assert torch.equal(out, expected) and torch.equal(scales_out, expected_scales)


def _pack_errors() -> list:
    layer = make_layer(torch.float32)
    ids = torch.tensor([1, 2])
    shape = (2, 2, *layer.shape[2:])
    return [
        (dict(kv_layer=layer[0]), "kv_layer must be"),
        (dict(kv_layer=layer.int()), "float32/bfloat16/float16"),
        (dict(block_ids=ids.float()), "block_ids must be"),
        (dict(block_ids=ids[None]), "block_ids must be"),
        (dict(out=torch.empty(shape[1:])), "out must be"),
        (dict(out=torch.empty(shape, dtype=torch.float16)), "out must be"),
        (dict(out=torch.empty(shape[:-1] + (32,))[..., ::2]), "contiguous"),
        (dict(scales_out=torch.empty(shape[:-1])), "only meaningful"),
        (dict(quantize=True, out=torch.empty(shape)), "out must be torch.int8"),
        (dict(quantize=True, scales_out=torch.empty(shape[:-1], dtype=torch.float16)), "scales"),
    ]


@pytest.mark.parametrize("change, match", _pack_errors())
def test_pack_rejects_bad_arguments(change, match):
    args = dict(kv_layer=make_layer(torch.float32), block_ids=torch.tensor([1, 2]))
    args.update(change)
    for fn in (pack_kv_ref, pack_kv_triton):
        with pytest.raises(ValueError, match=match):
            fn(**args)


def _unpack_errors() -> list:
    layer = make_layer(torch.float32)
    ids = torch.tensor([1, 2])
    data, scales = pack_kv_ref(layer, ids, quantize=True)
    floats = data.float()
    return [
        (dict(data=floats[:, :1]), "data must be"),
        (dict(data=data), "data without scales"),
        (dict(data=floats, scales=scales), "data with scales must be int8"),
        (dict(data=data, scales=scales.half()), "scales must be float32"),
        (dict(data=data, scales=scales[..., :1]), "scales must be float32"),
        (dict(block_ids=ids.float()), "block_ids must be"),
    ]


@pytest.mark.parametrize("change, match", _unpack_errors())
def test_unpack_rejects_bad_arguments(change, match):
    layer = make_layer(torch.float32)
    args = dict(kv_layer=layer, block_ids=torch.tensor([1, 2]), data=torch.zeros(2, 2, 4, 3, 16))
    args.update(change)
    for fn in (unpack_kv_ref, unpack_kv_triton):
        with pytest.raises(ValueError, match=match):
            fn(**args)


# ------------------------------------------------------------------------------- dispatch


def test_dispatch_modes(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("DISAGG_KERNELS", "torch")
    assert not _triton.use_triton(cpu)
    monkeypatch.setenv("DISAGG_KERNELS", "triton")
    assert _triton.use_triton(cpu)
    monkeypatch.setenv("DISAGG_KERNELS", "auto")
    assert not _triton.use_triton(cpu)
    monkeypatch.setenv("DISAGG_KERNELS", "cuda")
    with pytest.raises(ValueError, match="DISAGG_KERNELS"):
        _triton.use_triton(cpu)


def test_dispatchers_use_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("DISAGG_KERNELS", raising=False)
    case = make_attention_case([6, 2, 9], seed=10)
    expected = paged_decode_attention_ref(*case["args"], case["scale"])
    assert torch.equal(paged_decode_attention(*case["args"], case["scale"]), expected)


def test_kernels_import_and_run_without_triton():
    script = (
        "import sys, torch; sys.modules['triton'] = None\n"
        "from disagg.kernels import _triton, kv_pack, paged_attention\n"
        "assert not _triton.HAS_TRITON and not _triton.use_triton(torch.zeros(1))\n"
        "layer = torch.randn(2, 3, 4, 2, 16); ids = torch.tensor([2, 0])\n"
        "data, scales = kv_pack.pack_kv(layer, ids, quantize=True)\n"
        "kv_pack.unpack_kv(layer, ids, data, scales)\n"
        "q = torch.randn(2, 4, 16); tables = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)\n"
        "lens = torch.tensor([5, 3], dtype=torch.int32)\n"
        "out = paged_attention.paged_decode_attention(q, layer[0], layer[1], tables, lens, 0.25)\n"
        "assert out.shape == (2, 4, 16) and torch.isfinite(out).all()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DISAGG_KERNELS"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


if __name__ == "__main__":
    _interpreter_main(sys.argv[1], sys.argv[2])
