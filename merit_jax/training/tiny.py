"""The random tiny model a run starts from when there is no pretrained one (model.hf_path = ""): a Qwen2 of
model.tiny's shape (a Qwen2.5-VL of model.tiny_vl's when model.model_type = "qwen2_5_vl") with the tokenizer's
vocabulary, padded, and special tokens. The basin stage trains it briefly into θ⁰; merit_jax.plan sizes it."""

from __future__ import annotations

from flax import nnx
from jax.sharding import Mesh

from merit_jax.config import ModelSettings, TrainSettings
from merit_jax.models import params as P

VOCAB_MULTIPLE = 128  # the random model's vocabulary is padded to this (shardable over tp, as Qwen pads its own)


def tiny_config(model: ModelSettings, tokenizer) -> dict:
    """The Hugging Face config of the random tiny model: model.tiny (or tiny_vl) + the tokenizer's vocabulary
    and tokens, stored in model.param_dtype."""
    from merit_jax.models.config import tiny_hf_config

    vocab = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if model.model_type == "qwen2_5_vl":  # a tiny Qwen2.5-VL from model.tiny_vl
        from merit_jax.data.vision import vision_token_ids
        from merit_jax.models.qwen2_5_vl import tiny_vl_hf_config

        hf = tiny_vl_hf_config(vocab, vision_token_ids(tokenizer), **dict(model.tiny_vl))
        hf["dtype"] = model.param_dtype
        return hf
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    hf = tiny_hf_config(vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad,
                        **dict(model.tiny))
    hf["dtype"] = model.param_dtype
    return hf


def random_model(hf_config: dict, s: TrainSettings, mesh: Mesh, seed: int) -> nnx.Module:
    """The random tiny model in the run's dtypes, each parameter created directly in its shards on `mesh`."""
    from merit_jax.models.registry import model_factory

    make = model_factory(hf_config, "basin tiny model (model.tiny)", dtype=s.param_dtype,
                         compute_dtype=s.compute_dtype, remat=s.remat, attention=s.attention,
                         scan_layers=s.scan_layers, max_segments=s.max_segments, seed=seed)
    return P.create_sharded(make, mesh)
