"""Tiny checkpoints load in Hugging Face transformers exactly as intended."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import unicodedata

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from disagg.cli.tiny import (
    ARCH_CLASSES,
    ARCHS,
    TOKENIZER_VOCAB_SIZE,
    TinySpec,
    build_tokenizer,
    parameter_count,
    weight_shapes,
    write_tiny_checkpoint,
)

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

PROMPTS = ("The river ran past", "Hello, world! 12345", "def f(x):\n    return x", "a")
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


def load_model(path, dtype=torch.float32):
    """Load with transformers and fail on any missing, unexpected or mismatched key."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}
    return model.eval()


def stored_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor in the folder's safetensors files, checking their metadata on the way."""
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return tensors


def read_json(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    spec = TinySpec(arch=request.param)
    path = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), spec)
    return spec, path, load_model(path)


def test_loads_with_every_key_and_the_intended_class(checkpoint):
    spec, path, model = checkpoint
    assert type(model).__name__ == ARCH_CLASSES[spec.arch]
    assert model.config.model_type == spec.arch
    assert model.num_parameters() == parameter_count(spec)
    stored = stored_tensors(path)
    assert {n: tuple(t.shape) for n, t in stored.items()} == weight_shapes(spec)
    params = dict(model.named_parameters())
    for name, tensor in stored.items():
        torch.testing.assert_close(params[name], tensor, rtol=0, atol=0)


def test_architecture_specific_tensors(checkpoint):
    spec, path, model = checkpoint
    attn = model.model.layers[0].self_attn
    names = set(stored_tensors(path))
    has_bias = "model.layers.0.self_attn.q_proj.bias" in names
    assert has_bias == (spec.arch == "qwen2") == (attn.q_proj.bias is not None)
    assert ("model.layers.1.self_attn.k_norm.weight" in names) == (spec.arch == "qwen3")
    assert getattr(model.config, "sliding_window", None) is None


def test_config_reads_back_as_written(checkpoint):
    spec, path, model = checkpoint
    config = model.config
    assert config.num_key_value_heads == spec.num_kv_heads
    assert config.head_dim == spec.resolved_head_dim
    assert config.rms_norm_eps == spec.rms_norm_eps
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": spec.rope_theta}
    assert read_json(path / "config.json")["dtype"] == "float32"
    eos = build_tokenizer(spec.tokenizer_vocab_size).token_to_id("<|endoftext|>")
    assert config.eos_token_id == config.bos_token_id == eos
    assert read_json(path / "generation_config.json") == {"bos_token_id": eos, "eos_token_id": eos}


def greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy continuation by full forwards; returns tokens and top-1 minus top-2 logit."""
    tokens, margins = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids + tokens])).logits[0, -1]
            assert torch.isfinite(logits).all()
            top = logits.topk(2)
            margins.append((top.values[0] - top.values[1]).item())
            tokens.append(top.indices[0].item())
    return tokens, margins


def test_greedy_logits_are_peaked_and_varied(checkpoint):
    spec, path, model = checkpoint
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    margins = []
    for prompt in PROMPTS:
        tokens, step_margins = greedy(model, tokenizer.encode(prompt).ids, steps=16)
        margins += step_margins
        assert len(set(tokens)) >= 4, f"{prompt!r} collapsed to {tokens}"
        assert max(tokens) < spec.tokenizer_vocab_size, "a padding row won the argmax"
    margins.sort()
    assert margins[len(margins) // 2] > 0.5
    assert margins[0] > 1e-3


def test_autotokenizer_matches_tokenizer_json(checkpoint):
    spec, path, model = checkpoint
    auto = transformers.AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert len(auto) == raw.get_vocab_size() == spec.tokenizer_vocab_size
    assert auto.eos_token_id == model.config.eos_token_id == raw.token_to_id("<|endoftext|>")
    text = "Héllo wörld — 你好 🙂\n\tI'VE 12345 don't <|im_end|>\r\n  x"
    assert auto.encode(text) == raw.encode(text).ids
    assert auto.decode(auto.encode(text)) == text
    assert raw.decode(raw.encode(text).ids, skip_special_tokens=False) == text


def test_chat_template_is_chatml(checkpoint):
    _, path, _ = checkpoint
    auto = transformers.AutoTokenizer.from_pretrained(path)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert auto.apply_chat_template(chat, tokenize=False) == body
    prompt = auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == body + "<|im_start|>assistant\n"
    ids = auto.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert ids[0] == auto.convert_tokens_to_ids("<|im_start|>")
    assert auto.decode(ids) == prompt


def test_qwen2_tokenizer_normalises_to_nfc(tmp_path):
    path = write_tiny_checkpoint(tmp_path, TinySpec(arch="qwen2"))
    auto = transformers.AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    decomposed = "cafe\u0301"
    assert auto.encode(decomposed) == raw.encode(decomposed).ids
    assert raw.decode(raw.encode(decomposed).ids) == unicodedata.normalize("NFC", decomposed)


def test_sharded_checkpoint_equals_single_file(tmp_path):
    spec = TinySpec(arch="qwen3", shards=3)
    sharded = write_tiny_checkpoint(tmp_path / "sharded", spec)
    single = write_tiny_checkpoint(tmp_path / "single", dataclasses.replace(spec, shards=1))
    files = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == files
    index = read_json(sharded / "model.safetensors.index.json")
    assert set(index["weight_map"].values()) == set(files)
    assert set(index["weight_map"]) == set(weight_shapes(spec))
    tensors = stored_tensors(sharded)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    ids = torch.tensor([[5, 6, 7, 300]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(sharded)(ids).logits, load_model(single)(ids).logits)


def test_tied_embeddings_have_no_lm_head(tmp_path):
    spec = TinySpec(tie_word_embeddings=True)
    path = write_tiny_checkpoint(tmp_path, spec)
    assert "lm_head.weight" not in stored_tensors(path)
    model = load_model(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.num_parameters() == parameter_count(spec)
    assert parameter_count(spec) == parameter_count(TinySpec()) - spec.vocab_size * spec.hidden_size


def test_explicit_head_dim_wider_than_hidden_over_heads(tmp_path):
    spec = TinySpec(arch="qwen3", head_dim=32)
    model = load_model(write_tiny_checkpoint(tmp_path, spec))
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 32, 64)
    assert model.num_parameters() == parameter_count(spec)


def test_bfloat16_checkpoint_is_the_float32_one_rounded(tmp_path):
    spec = TinySpec(arch="qwen2", dtype="bfloat16")
    path = write_tiny_checkpoint(tmp_path / "bf16", spec)
    full = stored_tensors(write_tiny_checkpoint(tmp_path / "fp32", TinySpec(arch="qwen2")))
    stored = stored_tensors(path)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    for name, tensor in stored.items():
        assert torch.equal(tensor, full[name].to(torch.bfloat16)), name
    config = read_json(path / "config.json")
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    model = load_model(path, dtype="auto")
    assert model.dtype == torch.bfloat16


def intended_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """RoPE inverse frequencies, written from the Llama 3 description, not from transformers."""
    inv = [theta ** (-i / head_dim) for i in range(0, head_dim, 2)]
    if scaling is None:
        return torch.tensor(inv, dtype=torch.float64)
    factor, context = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    scaled = []
    for f in inv:
        wavelength = 2 * math.pi / f
        if wavelength < context / high:
            scaled.append(f)
        elif wavelength > context / low:
            scaled.append(f / factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            scaled.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(scaled, dtype=torch.float64)


def test_llama3_rope_scaling_is_honoured(tmp_path):
    spec = TinySpec(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    model = load_model(write_tiny_checkpoint(tmp_path, spec))
    rotary = model.model.rotary_emb
    want = intended_inv_freq(spec.resolved_head_dim, spec.rope_theta, LLAMA3_SCALING)
    unscaled = intended_inv_freq(spec.resolved_head_dim, spec.rope_theta, None)
    assert (want == unscaled).any() and (want < unscaled).sum() >= 2  # all three regimes hit
    torch.testing.assert_close(rotary.inv_freq.double(), want, rtol=1e-6, atol=0)
    x = torch.zeros(1, 1, spec.hidden_size)
    cos, _ = rotary(x, torch.tensor([[100]]))
    expected = torch.cat([torch.cos(100 * want)] * 2).float()
    torch.testing.assert_close(cos[0, 0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("drop", [(), ("rope_theta", "rope_scaling"), ("rope_parameters",)])
def test_either_rope_spelling_alone_gives_the_same_rope(tmp_path, drop):
    spec = TinySpec(rope_theta=20000.0, rope_scaling=LLAMA3_SCALING)
    path = write_tiny_checkpoint(tmp_path, spec)
    config = read_json(path / "config.json")
    for key in drop:
        del config[key]
    (path / "config.json").write_text(json.dumps(config))
    loaded = transformers.AutoConfig.from_pretrained(path)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(loaded)
    want = intended_inv_freq(spec.resolved_head_dim, spec.rope_theta, LLAMA3_SCALING)
    torch.testing.assert_close(rotary.inv_freq.double(), want, rtol=1e-6, atol=0)


def test_files_are_deterministic_per_seed(tmp_path):
    first = write_tiny_checkpoint(tmp_path / "a", TinySpec(arch="qwen2", shards=2))
    again = write_tiny_checkpoint(tmp_path / "b", TinySpec(arch="qwen2", shards=2))
    other = write_tiny_checkpoint(tmp_path / "c", TinySpec(arch="qwen2", shards=2, seed=1))
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    shard = "model-00001-of-00002.safetensors"
    assert (first / shard).read_bytes() != (other / shard).read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_tokenizer_training_is_the_same_in_another_process():
    code = "from disagg.cli.tiny import build_tokenizer; print(build_tokenizer().to_str())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == build_tokenizer().to_str()


def test_build_tokenizer_sizes():
    tokenizer = build_tokenizer()
    assert tokenizer.get_vocab_size() == TOKENIZER_VOCAB_SIZE
    assert [tokenizer.id_to_token(i) for i in range(381, 384)] == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    no_merges = build_tokenizer(259)
    assert len(no_merges.encode("ab").ids) == 2
    assert no_merges.decode(no_merges.encode("ab").ids) == "ab"
    with pytest.raises(ValueError, match="at least 259"):
        build_tokenizer(258)
    with pytest.raises(ValueError, match="supports at most"):
        build_tokenizer(100_000)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"arch": "gpt2"}, "arch must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"hidden_size": 0}, "hidden_size must be positive"),
        ({"init_std": -0.1}, "init_std must be positive"),
        ({"head_dim": -4}, "head_dim must be positive"),
        ({"num_heads": 4, "num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"hidden_size": 66}, "multiple of num_heads"),
        ({"head_dim": 7}, "even for RoPE"),
        ({"vocab_size": 100}, "vocab_size must be at least 259"),
        ({"rope_scaling": {"factor": 2.0}}, "rope_type is one of"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1.0}}, "rope_theta"),
        ({"shards": 1000}, "exceeds the number of tensors"),
    ],
)
def test_spec_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        TinySpec(**fields)
