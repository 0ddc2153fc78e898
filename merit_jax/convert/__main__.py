"""python -m merit_jax.convert hf-to-orbax --hf HF_DIR --out CKPT_DIR
   python -m merit_jax.convert orbax-to-hf --ckpt CKPT_DIR --out HF_DIR [--dtype bfloat16|float32]"""

from __future__ import annotations

import argparse
import logging
import sys

from merit_jax.io import hf
from merit_jax.io.safetensors import MAX_SHARD_BYTES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merit_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="Hugging Face directory -> merit_jax (Orbax) checkpoint")
    a.add_argument("--hf", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("orbax-to-hf", help="merit_jax (Orbax) checkpoint -> Hugging Face directory")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--max-shard-gb", type=float, default=None,
                   help=f"largest safetensors shard in GiB (default: Hugging Face's 5GB, {MAX_SHARD_BYTES} bytes)")
    b.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "hf-to-orbax":
            hf.hf_to_orbax(args.hf, args.out, overwrite=args.overwrite)
        else:
            shard = MAX_SHARD_BYTES if args.max_shard_gb is None else int(args.max_shard_gb * 2**30)
            hf.orbax_to_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_bytes=shard, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
