"""python -m merit_jax.merge: merge checkpoints from the command line (the library is merit_jax/merging/).

    python -m merit_jax.merge --ckpt DIR --ckpt DIR [...] [--weights W1,W2,...] --out DIR
        [--method tokens|uniform|weights|task_arithmetic|ties|dare] [--base DIR] [--dtype bfloat16|float16|float32]

Inputs are merit_jax checkpoints or Hugging Face directories (config.json + *.safetensors, single file or
sharded with model.safetensors.index.json); the output is the same kind. Bad input: `error: ...`, exit 2.
Several processes (MERIT_COORDINATOR / SLURM / TPU, see merit_jax/distributed.py) merge merit_jax checkpoints
together, each its own shards.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from merit_jax.merging.ops import METHODS
from merit_jax.merging.sources import MergeInputError, detect_kind
from merit_jax.merging.stream import DEFAULT_CHUNK_BYTES, merge_checkpoints

DESCRIPTION = "Stage 4: the one-shot merge θ̄ = Σ_k w_k θ_k, soups, and the merge operators relative to θ⁰."


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    for suffix, scale in (("GIB", 1 << 30), ("MIB", 1 << 20), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m merit_jax.merge", description=DESCRIPTION)
    p.add_argument("--ckpt", action="append", required=True, metavar="DIR",
                   help="an input checkpoint (merit_jax or Hugging Face); repeat for each input")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (same kind as the inputs)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="default: 'weights' when --weights is given, else 'uniform'")
    p.add_argument("--weights", default="", metavar="W1,W2,...",
                   help="one number per input: weights (normalised) or, for --method tokens, token counts")
    p.add_argument("--base", default=None, metavar="DIR", help="θ⁰, for task_arithmetic / ties / dare")
    p.add_argument("--dtype", default="", help="output dtype: bfloat16 | float16 | float32 (default: the inputs')")
    p.add_argument("--lam", type=float, default=1.0, help="scale λ of the merged task vector (relative methods)")
    p.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each task vector kept")
    p.add_argument("--drop-p", type=float, default=0.9, help="DARE: drop probability")
    p.add_argument("--seed", type=int, default=0, help="DARE: seed of the drop masks")
    p.add_argument("--max-shard-size", default="5GB", help="HF output: largest safetensors shard, e.g. 2GB")
    p.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_BYTES / (1 << 20),
                   help="working-set size per piece (MiB of float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every restore at INFO
    try:
        weights = [float(x) for x in args.weights.split(",") if x.strip()] if args.weights else None
    except ValueError:
        print(f"error: --weights must be comma-separated numbers, got {args.weights!r}", file=sys.stderr)
        return 2
    method = args.method or ("weights" if weights else "uniform")
    try:
        if detect_kind(args.ckpt[0]) == "merit_jax":
            # Several processes (MERIT_COORDINATOR / SLURM / TPU, see merit_jax/distributed.py) merge together,
            # each its own shards; a no-op for one process. HF merges never import jax.
            from merit_jax import distributed

            distributed.initialize()
        merge_checkpoints(
            args.ckpt, args.out, method=method, weights=weights, base=args.base, dtype=args.dtype or None,
            lam=args.lam, density=args.density, drop_p=args.drop_p, seed=args.seed, overwrite=args.overwrite,
            chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))), max_shard_bytes=_parse_size(args.max_shard_size),
        )
    except (MergeInputError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
