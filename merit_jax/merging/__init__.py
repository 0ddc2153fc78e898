"""Weight merging: θ̄ = Σ_k w_k θ_k, soups, and the merges relative to θ⁰ (task arithmetic, TIES, DARE).

    ops.py      the math, pure functions on arrays (resolve_weights, merge_tensors, ties_trim, dare_drop)
    sources.py  the inputs: open a merit_jax checkpoint or a Hugging Face directory, check they belong together
    stream.py   merge_checkpoints: the streaming driver (pieces, threads, several processes, both outputs)

The command line is `python -m merit_jax.merge` (merit_jax/merge.py); the pipeline stage is
merit_jax/stages/merge.py. The names below are the library's public face.
"""

from merit_jax.merging.ops import (LINEAR_METHODS, METHODS, RELATIVE_METHODS, dare_drop, linear_coefficients,
                                   merge_tensors, resolve_weights, ties_trim)
from merit_jax.merging.sources import MergeInputError, detect_kind, open_source, validate_sources
from merit_jax.merging.stream import (DEFAULT_CHUNK_BYTES, MERGE_INFO_FILE, fsdp_placement, merge_checkpoints,
                                      plan_pieces)

__all__ = ["LINEAR_METHODS", "METHODS", "RELATIVE_METHODS", "dare_drop", "linear_coefficients", "merge_tensors",
           "resolve_weights", "ties_trim", "MergeInputError", "detect_kind", "open_source", "validate_sources",
           "DEFAULT_CHUNK_BYTES", "MERGE_INFO_FILE", "fsdp_placement", "merge_checkpoints", "plan_pieces"]
