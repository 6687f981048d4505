"""Loading checkpoints: formats we accept, and one-line errors for folders we cannot serve."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from disagg.shared.model.args import CheckpointError, ModelArgs
from disagg.shared.model.llama import rope_inv_freq
from disagg.shared.model.loader import load_model
from disagg.shared.tokenizer import Tokenizer


@pytest.fixture
def folder(checkpoints, tmp_path):
    """A private copy of a tiny checkpoint that a test may break."""
    dst = tmp_path / "model"
    shutil.copytree(checkpoints(arch="llama"), dst)
    return dst


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json: not found"):
        load_model(folder)


def test_unknown_architecture(folder):
    edit_config(folder, model_type="gpt2")
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'gpt2' is not supported"):
        load_model(folder)


def test_wrong_shape_names_file_and_tensor(folder):
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj"
    ):
        load_model(folder)


def test_config_disagreeing_with_weights(folder):
    edit_config(folder, hidden_size=96)
    with pytest.raises(CheckpointError, match=r"has shape .* but config.json implies"):
        load_model(folder)


def test_missing_tensor(folder):
    weights = load_file(folder / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.norm.weight'"):
        load_model(folder)


def test_bad_field_and_bad_json(folder):
    edit_config(folder, num_hidden_layers="two")
    with pytest.raises(CheckpointError, match=r"'num_hidden_layers' must be a positive integer"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load_model(folder)


def test_no_weights_and_corrupt_weights(folder):
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors"):
        load_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weights found"):
        load_model(folder)


def test_unknown_dtype(folder):
    with pytest.raises(CheckpointError, match=r"--dtype 'float8'"):
        load_model(folder, dtype="float8")


def test_unsupported_rope(folder):
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    edit_config(folder, rope_parameters=yarn, rope_scaling=yarn)
    with pytest.raises(CheckpointError, match=r"rope type 'yarn' is not supported"):
        ModelArgs.from_folder(folder)


def test_cli_reports_one_line_not_a_traceback(folder):
    edit_config(folder, model_type="bert")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "disagg.cli.main",
            "generate",
            "--model",
            str(folder),
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "model_type 'bert' is not supported" in proc.stderr


def test_sharded_and_tied_checkpoints_load_and_match(checkpoints):
    # Same seed and shapes: a 3-shard checkpoint must load to the same logits as the 1-file one.
    whole = load_model(checkpoints(arch="qwen2"))
    sharded = load_model(checkpoints(arch="qwen2", shards=3))
    for (name, a), (_, b) in zip(whole.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name
    tied = load_model(checkpoints(arch="llama", tie_word_embeddings=True))
    assert tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()


def test_llama3_rope_scaling_equals_transformers(checkpoints):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    path = checkpoints(arch="llama", rope_scaling=scaling, rope_theta=500000.0)
    args = ModelArgs.from_folder(path)
    assert args.rope.rope_type == "llama3" and args.rope.theta == 500000.0
    hf_config = AutoConfig.from_pretrained(path)
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    torch.testing.assert_close(rope_inv_freq(args.head_dim, args.rope), hf_inv_freq.float())


def test_tokenizer_and_chat_template(checkpoints):
    from transformers import AutoTokenizer

    path = checkpoints(arch="qwen3")
    ours, theirs = Tokenizer(path), AutoTokenizer.from_pretrained(path)
    text = "The market opened at seven. Ünïcode ✓"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.decode(ours.encode(text)) == text
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello?"},
    ]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    # With tools, an assistant's calls and a tool's answer, as transformers renders them.
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Now.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
    }
    messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "content": "-3 C", "tool_call_id": "call_1"}]  # fmt: skip
    ours_text = ours.apply_chat_template(messages, tools=tools)
    assert ours_text == theirs.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in ours_text
    assert "<tool_response>\n-3 C\n</tool_response>" in ours_text and "Be brief." in ours_text
