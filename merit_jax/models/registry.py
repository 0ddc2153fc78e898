"""The model families merit_jax builds, by Hugging Face `model_type`: one constructor for a config.json's
architecture (abstract with `nnx.eval_shape`, or created in its shards with `params.create_sharded`)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from merit_jax.models.config import ModelConfig


def build_model(model_type: str, hf_config: dict, *, rngs, source="config.json", **policy) -> nnx.Module:
    if model_type == "qwen2_5_vl":
        from merit_jax.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
        return Qwen2_5_VLForConditionalGeneration.from_hf_config(hf_config, rngs=rngs, **policy)
    from merit_jax.models.qwen2 import Qwen2ForCausalLM
    return Qwen2ForCausalLM(ModelConfig.from_hf(hf_config, source), rngs=rngs, **policy)


def model_factory(hf_config: dict, source: str = "config.json", *, dtype="float32", compute_dtype=None,
                  remat="none", attention="xla", scan_layers: bool = False, max_segments: int = 16, seed: int = 0):
    """A zero-argument constructor (for `nnx.eval_shape` / sharded creation) of the model a config describes."""
    model_type = hf_config.get("model_type")
    if model_type != "qwen2_5_vl":
        ModelConfig.from_hf(hf_config, source)  # validate eagerly: a clear error before any tracing
    policy = dict(param_dtype=jnp.dtype(dtype), compute_dtype=jnp.dtype(compute_dtype or dtype), remat=remat,
                  attention=attention, scan_layers=scan_layers, max_segments=max_segments)
    return lambda: build_model(model_type, hf_config, rngs=nnx.Rngs(seed), source=source, **policy)
