"""The local model maker is byte-deterministic and makes models transformers can read."""

from __future__ import annotations

import json

from vllm_llmd.devtools.model_maker import PRESETS, make_model, num_parameters, sample_text


def _tree_bytes(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_preset_same_bytes(tmp_path):
    first = _tree_bytes(make_model("tiny", tmp_path / "a"))
    second = _tree_bytes(make_model("tiny", tmp_path / "b"))
    names = {str(p) for p in first}
    assert names == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert first == second


def test_preset_sizes():
    millions = {name: num_parameters(p) / 1e6 for name, p in PRESETS.items()}
    assert 2 < millions["tiny"] < 6
    assert 15 < millions["small"] < 25
    assert 120 < millions["medium"] < 180


def test_weights_match_config_and_tokenizer_has_chat_template(tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    path = make_model("tiny", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
        names = set(f.keys())
    assert embed.shape == (config["vocab_size"], config["hidden_size"])
    assert f"model.layers.{config['num_hidden_layers'] - 1}.mlp.down_proj.weight" in names

    tok = AutoTokenizer.from_pretrained(str(path))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>hello<|end|><|assistant|>"
    ids = tok(sample_text(50, seed=3))["input_ids"]
    assert 50 <= len(ids) < 400 and max(ids) < config["vocab_size"]
    assert tok.convert_tokens_to_ids("<|eos|>") == config["eos_token_id"]


def test_sample_text_is_deterministic():
    assert sample_text(300, seed=7) == sample_text(300, seed=7)
    assert sample_text(300, seed=7) != sample_text(300, seed=8)
