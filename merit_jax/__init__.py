"""merit_jax: MERIT (conflict-aware splitting and weight merging for instruction tuning) in JAX / Flax NNX."""

__version__ = "0.1.0"


def load_hf(path, dtype: str = "float32", **kwargs):
    """A Flax NNX model (Qwen2 / Qwen2.5 / Qwen2.5-VL) with the weights of a local Hugging Face directory."""
    from merit_jax.io.hf import load_hf as _load_hf

    return _load_hf(path, dtype, **kwargs)


def __getattr__(name):  # `merit_jax.split.conflict_split(...)` etc. without importing everything up front
    import importlib

    if name == "split":  # DESIGN.md's `merit_jax.split.conflict_split`: the split's math lives in partition
        return importlib.import_module("merit_jax.partition")
    if name in ("partition", "gradients", "merge", "merging", "checkpoint", "data", "models", "training", "diagnostics"):
        return importlib.import_module(f"merit_jax.{name}")
    raise AttributeError(name)
