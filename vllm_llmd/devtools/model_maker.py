"""Make a small random-weight Llama model that vLLM can serve, with no hub access.

The folder holds `config.json`, `model.safetensors` and a byte-level BPE tokenizer trained
here on generated text, with a chat template. The same preset always gives the same bytes, so
a test can rely on greedy output being reproducible across machines and server starts.

Weights are drawn so that attention matters (linear layers scaled to keep the residual stream's
variance) and greedy decoding is decisive (`lm_head` drawn wide): on a random model with flat
logits, float rounding flips greedy ties and token-equality tests turn flaky.

Usage: ``vllm-llmd-make-model tiny ./models/tiny`` (presets: tiny, small, medium).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
BOS_TOKEN, EOS_TOKEN = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Bump when the output of make_model changes for the same preset (cache folders key on it).
MAKER_VERSION = 1


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a Llama model; parameter count is printed by `describe`."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = 4096
    head_dim: int = 64
    max_position_embeddings: int = 8192
    # std of lm_head weights: wide enough that the top-2 logit gap dwarfs float noise
    lm_head_std: float = 0.5
    seed: int = 0


PRESETS: dict[str, ModelPreset] = {
    # ~3.4M params: plumbing tests, tens of ms per 2k-token prompt
    "tiny": ModelPreset(256, 2, 4, 2, 512),
    # ~21M params: cheap, yet a prefix hit is clearly visible in TTFT
    "small": ModelPreset(512, 5, 8, 4, 1536),
    # ~150M params: benchmarks
    "medium": ModelPreset(1024, 12, 16, 8, 2816),
}


def num_parameters(preset: ModelPreset) -> int:
    """Parameter count of a preset."""
    h, i, v = preset.hidden_size, preset.intermediate_size, preset.vocab_size
    q = preset.num_attention_heads * preset.head_dim
    kv = preset.num_key_value_heads * preset.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return 2 * v * h + preset.num_hidden_layers * per_layer + h


# ---- text ------------------------------------------------------------------------------------

_ONSETS = (
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "ch",
    "sh",
    "th",
    "st",
    "tr",
    "pl",
    "gr",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "n", "r", "s", "t", "l", "nd", "st")


def _word(rng: random.Random) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
        for _ in range(rng.choice((1, 1, 2, 2, 3)))
    )


@functools.cache  # every sample_text call needs it; tests call that from busy threads
def _lexicon(size: int = 3000, seed: int = 1234) -> tuple[str, ...]:
    rng = random.Random(seed)
    return tuple(sorted({_word(rng) for _ in range(size)}))


def sample_text(num_words: int, seed: int) -> str:
    """Deterministic pseudo-English: sentences over a fixed lexicon. For prompts and corpora."""
    lexicon = _lexicon()
    rng = random.Random(seed)
    sentences: list[str] = []
    count = 0
    while count < num_words:
        length = min(rng.randint(4, 16), num_words - count)
        words = [rng.choice(lexicon) for _ in range(length)]
        sentences.append(" ".join(words).capitalize() + rng.choice((".", ".", ".", "?", "!")))
        count += length
    return " ".join(sentences)


# ---- tokenizer -------------------------------------------------------------------------------


def train_tokenizer(vocab_size: int) -> str:
    """Train a byte-level BPE tokenizer on generated text; returns tokenizer.json's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [sample_text(200, seed) for seed in range(400)]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer.to_str(pretty=True)


def _tokenizer_config(max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


# ---- weights ---------------------------------------------------------------------------------


def make_weights(preset: ModelPreset) -> dict:
    """Random Llama weights (bf16), drawn from one seeded generator in a fixed order."""
    import torch

    gen = torch.Generator().manual_seed(preset.seed)
    h, i = preset.hidden_size, preset.intermediate_size
    q = preset.num_attention_heads * preset.head_dim
    kv = preset.num_key_value_heads * preset.head_dim

    def normal(rows: int, cols: int, std: float) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen) * std).to(torch.bfloat16)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        # std 1/sqrt(fan_in) keeps each sub-layer's output on the residual stream's scale,
        # so attention (and thus the KV cache) shapes every next token.
        return normal(out_features, in_features, 1.0 / math.sqrt(in_features))

    ones = torch.ones(h, dtype=torch.bfloat16)
    weights = {"model.embed_tokens.weight": normal(preset.vocab_size, h, 1.0)}
    for layer in range(preset.num_hidden_layers):
        p = f"model.layers.{layer}."
        weights[p + "self_attn.q_proj.weight"] = linear(q, h)
        weights[p + "self_attn.k_proj.weight"] = linear(kv, h)
        weights[p + "self_attn.v_proj.weight"] = linear(kv, h)
        weights[p + "self_attn.o_proj.weight"] = linear(h, q)
        weights[p + "mlp.gate_proj.weight"] = linear(i, h)
        weights[p + "mlp.up_proj.weight"] = linear(i, h)
        weights[p + "mlp.down_proj.weight"] = linear(h, i)
        weights[p + "input_layernorm.weight"] = ones.clone()
        weights[p + "post_attention_layernorm.weight"] = ones.clone()
    weights["model.norm.weight"] = ones.clone()
    weights["lm_head.weight"] = normal(preset.vocab_size, h, preset.lm_head_std)
    return weights


def _model_config(preset: ModelPreset, bos_id: int, eos_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_hidden_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "head_dim": preset.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": preset.vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def preset_digest(preset: ModelPreset) -> str:
    """A short id of what make_model writes for this preset (for cache folder names)."""
    blob = json.dumps({"preset": asdict(preset), "maker": MAKER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def make_model(preset: ModelPreset | str, out_dir: str | Path) -> Path:
    """Write the model folder for a preset (name or ModelPreset) into out_dir; returns it."""
    from safetensors.torch import save_file

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer_json = train_tokenizer(preset.vocab_size)
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    if len(vocab) > preset.vocab_size:
        raise ValueError(f"tokenizer vocab {len(vocab)} exceeds model vocab {preset.vocab_size}")
    (out / "tokenizer.json").write_text(tokenizer_json)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(preset.max_position_embeddings))
    _write_json(out / "config.json", _model_config(preset, vocab[BOS_TOKEN], vocab[EOS_TOKEN]))
    save_file(make_weights(preset), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def cached_model(preset: str, cache_dir: str | Path) -> Path:
    """The preset's model folder under cache_dir, made on first use.

    The folder name carries the preset's digest, so a changed preset or maker makes a new one;
    it is built in a staging folder and renamed, so concurrent users never see half a model.
    """
    target = Path(cache_dir) / f"{preset}-{preset_digest(PRESETS[preset])}"
    if not (target / "model.safetensors").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=target.parent))
        make_model(preset, staging)
        try:
            staging.rename(target)
        except OSError:  # made concurrently by someone else
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    """CLI: vllm-llmd-make-model PRESET OUT_DIR."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    path = make_model(args.preset, args.out_dir)
    print(f"{args.preset}: {num_parameters(PRESETS[args.preset]) / 1e6:.1f}M params -> {path}")


if __name__ == "__main__":
    main()
