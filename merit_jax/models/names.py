"""The one order of flat parameter names ("model/layers/10/mlp/up_proj/kernel"), in pure Python.

Every flat order in the project (extraction layouts and their stride offsets, checkpoints, HF shards, merges)
is this one, never a dict's iteration order: pytrees of dicts come back from jax.grad / lax.scan with their
keys sorted as strings, which puts "layers/10" before "layers/2". Index components compare as numbers, as in
the module tree (so it equals nnx's own flat order).
"""

from __future__ import annotations

import re
from typing import Iterable

_SEPARATORS = re.compile(r"[/.]")  # merit_jax names use "/", Hugging Face names "."


def name_key(name: str) -> tuple:
    """Sort key of a flat parameter name (merit_jax "a/b/0/c" or HF "a.b.0.c"): its components, digit-only
    ones compared as integers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in _SEPARATORS.split(name))


def canonical(names: Iterable[str]) -> list[str]:
    """`names` in the canonical order."""
    return sorted(names, key=name_key)
