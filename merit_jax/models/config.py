"""Model hyperparameters, read from (and written back to) a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_TEXT_TYPES = ("qwen2",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Validates a Qwen2/Qwen2.5 HF config dict; errors name `source` and the offending key."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_TEXT_TYPES:
            raise ValueError(f"{source}: unsupported model_type {model_type!r}; "
                             f"merit_jax supports {SUPPORTED_TEXT_TYPES} (and qwen2_5_vl through load_hf)")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if hf.get(k) is None]
        if missing:
            raise ValueError(f"{source}: missing required config field(s) {missing}")
        if hf.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported (Qwen2.5 checkpoints ship "
                             "it disabled)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: rope_type {rope_type!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        n_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=n_heads,
            num_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        )


def tiny_hf_config(vocab_size: int, **overrides) -> dict[str, Any]:
    """A Qwen2 `config.json` dict for a random tiny model (the embedded default and tests)."""
    import transformers

    hf = transformers.Qwen2Config(vocab_size=vocab_size, **overrides)
    d = hf.to_dict()
    d["architectures"] = ["Qwen2ForCausalLM"]
    return d
