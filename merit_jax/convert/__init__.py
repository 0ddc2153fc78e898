"""Hugging Face <-> merit_jax conversion (`python -m merit_jax.convert hf-to-orbax | orbax-to-hf`)."""

from merit_jax.io.hf import hf_to_orbax, load_hf, orbax_to_hf, read_hf_config, save_hf  # noqa: F401
