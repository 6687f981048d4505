"""Load a Hugging Face model folder (config.json + *.safetensors) into the Transformer."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from disagg.shared.model.args import DTYPES, CheckpointError, ModelArgs
from disagg.shared.model.llama import Linear, Transformer, rope_inv_freq

INDEX_FILE = "model.safetensors.index.json"


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for every weight the decoder needs."""
    h, q_out = args.hidden_size, args.num_heads * args.head_dim
    kv_out, ffn = args.num_kv_heads * args.head_dim, args.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (args.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q_out, h),
            p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.weight": (kv_out, h),
            p + "self_attn.o_proj.weight": (h, q_out),
            p + "mlp.gate_proj.weight": (ffn, h),
            p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if args.qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_out,),
                p + "self_attn.k_proj.bias": (kv_out,),
                p + "self_attn.v_proj.bias": (kv_out,),
            }
        if args.qk_norm:
            shapes |= {
                p + "self_attn.q_norm.weight": (args.head_dim,),
                p + "self_attn.k_norm.weight": (args.head_dim,),
            }
    return shapes


def weight_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (index file or a scan of the folder)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: no valid 'weight_map'") from None
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    located: dict[str, Path] = {}
    for file in files:
        with _open(file) as f:
            located |= {name: file for name in f.keys()}  # noqa: SIM118 (no __iter__)
    return located


def load_model(
    folder: str | Path,
    *,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Transformer:
    """Build the decoder from `folder`; `dtype` "auto" keeps the checkpoint's dtype.

    Raises CheckpointError (one line, naming the file and field) for anything malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    args = ModelArgs.from_folder(folder)
    torch_dtype = args.torch_dtype if dtype == "auto" else _parse_dtype(dtype)
    state = _read_weights(folder, args, torch_dtype, device, progress)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args.head_dim, args.rope).to(device)
    if torch_dtype == torch.float32 and torch.device(device).type == "cpu":
        for module in model.layers.modules():  # the projections; lm_head prefers F.linear
            if isinstance(module, Linear):
                module.transpose()
    return model.eval()


def _parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _read_weights(folder, args, dtype, device, progress) -> dict[str, torch.Tensor]:
    shapes = expected_shapes(args)
    located = weight_files(folder)
    missing = [name for name in shapes if name not in located]
    if missing:
        raise CheckpointError(
            f"{folder}: missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    state: dict[str, torch.Tensor] = {}
    for done, (name, file, tensor) in enumerate(_tensors(shapes, located), start=1):
        if tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(
                f"{file.name}: tensor {name!r} has shape {list(tensor.shape)}, "
                f"but config.json implies {list(shapes[name])}"
            )
        state[_module_name(name)] = tensor.to(device=device, dtype=dtype)
        if progress is not None:
            progress(done, len(shapes))
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return _fused(state, args)


def _fused(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Each layer's q, k, v projections (weights, and biases) as one ``qkv_proj``, and gate and
    up as one ``gate_up_proj``: one matmul each instead of three and two. The checkpoint's
    names (and the fingerprint built from them) stay Hugging Face's."""
    for i in range(args.num_layers):
        attn, mlp = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        for kind in ("weight", "bias") if args.qkv_bias else ("weight",):
            parts = [state.pop(f"{attn}{n}_proj.{kind}") for n in "qkv"]
            state[f"{attn}qkv_proj.{kind}"] = torch.cat(parts)
        gate_up = [state.pop(f"{mlp}{n}_proj.weight") for n in ("gate", "up")]
        state[f"{mlp}gate_up_proj.weight"] = torch.cat(gate_up)
    return state


def _tensors(shapes, located) -> Iterator[tuple[str, Path, torch.Tensor]]:
    by_file: dict[Path, list[str]] = {}
    for name in shapes:
        by_file.setdefault(located[name], []).append(name)
    for file, names in by_file.items():
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {INDEX_FILE} but not found")
        with _open(file) as f:
            available = set(f.keys())
            for name in names:
                if name not in available:
                    raise CheckpointError(f"{file.name}: missing tensor {name!r}")
                yield name, file, f.get_tensor(name)


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file.name}: not a readable safetensors file ({err})") from None


def _module_name(hf_name: str) -> str:
    return hf_name.removeprefix("model.")
