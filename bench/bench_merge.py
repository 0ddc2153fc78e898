"""Merge benchmark: merit_jax.merge against mergekit's `linear` merge, same inputs, side by side.

    python bench/bench_merge.py [--k 4] [--data /tmp/merit_bench_merge] [--mergekit PATH/TO/mergekit-yaml]
    python bench/bench_merge.py --format merit_jax [--k 4]     # merit_jax (Orbax) checkpoints in and out

Builds K random Hugging Face checkpoints shaped like Qwen2.5-0.5B (bf16 safetensors, tied embeddings, written
directly with numpy; reused on later runs), then runs each tool in its own subprocess under /usr/bin/time -v
and reports wall time and peak resident memory, with the ratios, against two floors: one model's size
(memory) and the time to read the K inputs and write one model on this disk (I/O).

With --format merit_jax the K inputs are merit_jax checkpoints of the same model (merit_jax's parameter names
and layouts, bf16, written by checkpoint.save) and only merit_jax runs (mergekit reads no Orbax); the floors
are the same: one model's bf16 bytes and the raw read + write of the HF files of the same size.

mergekit pulls in torch and accelerate; install it into a separate virtual environment that reuses the
system packages, so the pinned torch is never replaced:
    python -m venv --system-site-packages /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit
and pass --mergekit /tmp/mkvenv/bin/mergekit-yaml (found there by default). Without it only ours runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

# Qwen2.5-0.5B's architecture (config.json of the release).
QWEN25_05B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896, intermediate_size=4864,
    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    hidden_act="silu", torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151643,
)


def qwen2_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensor names and shapes of a Qwen2 model."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def build_inputs(data: pathlib.Path, k: int, cfg: dict) -> list[pathlib.Path]:
    from safetensors.numpy import save_file

    dirs = []
    shapes = qwen2_shapes(cfg)
    for model in range(k):
        d = data / f"model{model}"
        dirs.append(d)
        if (d / "config.json").is_file():
            continue
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        rng = np.random.default_rng(model)
        tensors = {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
                   for name, shape in shapes.items()}
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        print(f"built {d}", flush=True)
    return dirs


def build_merit_jax_inputs(data: pathlib.Path, k: int, cfg: dict) -> list[pathlib.Path]:
    """K merit_jax checkpoints of the model `cfg` describes, random N(0, 0.02) bf16 (names from the model)."""
    sys.path.insert(0, str(REPO))
    from flax import nnx

    from merit_jax.io import checkpoint
    from merit_jax.models.registry import model_factory
    from merit_jax.models import params as P

    specs = P.specs(nnx.eval_shape(model_factory(cfg, dtype="bfloat16")))
    dirs = []
    for model in range(k):
        d = data / f"ckpt{model}"
        dirs.append(d)
        if checkpoint.is_checkpoint(d):
            continue
        rng = np.random.default_rng(model)
        tensors = {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
                   for name, (shape, dtype) in specs.items()}
        checkpoint.save(d, tensors, cfg, overwrite=True)
        del tensors
        print(f"built {d}", flush=True)
    return dirs


def io_floor(inputs: list[pathlib.Path], out_bytes: int, scratch: pathlib.Path) -> float:
    """Seconds to read every input safetensors file and write (and fsync) one model's bytes on this disk."""
    start = time.perf_counter()
    block = bytearray(16 << 20)
    for d in inputs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(block):
                    pass
    with open(scratch, "wb") as fh:
        left = out_bytes
        while left > 0:
            n = min(left, len(block))
            fh.write(memoryview(block)[:n])
            left -= n
        fh.flush()
        os.fsync(fh.fileno())
    elapsed = time.perf_counter() - start
    scratch.unlink()
    return elapsed


def warm_page_cache(dirs: list[pathlib.Path]) -> None:
    """Reads every file under `dirs` once (so that the timed runs read from the page cache, as HF's do)."""
    block = bytearray(16 << 20)
    for d in dirs:
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(block):
                    pass


def timed(cmd: list[str], env=None) -> dict:
    """Runs cmd under /usr/bin/time -v; wall seconds and peak RSS (MiB) of the whole command."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    return {"wall_s": seconds, "peak_rss_mib": rss_kb / 1024}


def max_relative_difference(dir_a: pathlib.Path, dir_b: pathlib.Path) -> float:
    """max over tensors of max|a − b| / max|a| between two HF outputs (in float32)."""
    from safetensors import safe_open

    def handles(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            h = safe_open(str(f), "np")
            out |= {n: h for n in h.keys()}
        return out

    ha, hb = handles(dir_a), handles(dir_b)
    if set(ha) != set(hb):
        raise RuntimeError(f"outputs differ in tensor names: {sorted(set(ha) ^ set(hb))[:5]}")
    worst = 0.0
    for n in ha:
        a, b = ha[n].get_tensor(n).astype(np.float32), hb[n].get_tensor(n).astype(np.float32)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30)))
    return worst


def merit_jax_error(out: pathlib.Path, inputs: list[pathlib.Path], weights: list[float]) -> float:
    """max |merged − Σ w_k θ_k| / max |Σ w_k θ_k| over a few tensors (the embedding among them), in float64."""
    from merit_jax.io import checkpoint

    names = sorted(checkpoint.tensor_specs(out))
    sample = [n for n in names if "embed" in n] + names[1::97]
    got = checkpoint.load(out, names=sample)
    worst = 0.0
    for name in sample:
        ref = sum(w * checkpoint.load(d, names=[name])[name].astype(np.float64) for d, w in zip(inputs, weights))
        err = np.max(np.abs(got[name].astype(np.float64) - ref)) / max(float(np.max(np.abs(ref))), 1e-30)
        worst = max(worst, float(err))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--data", default="/tmp/merit_bench_merge")
    ap.add_argument("--mergekit", default="/tmp/mkvenv/bin/mergekit-yaml")
    ap.add_argument("--layers", type=int, default=QWEN25_05B["num_hidden_layers"], help="fewer for a quick run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per tool; the best is reported")
    ap.add_argument("--format", choices=("hf", "merit_jax"), default="hf",
                    help="kind of the K inputs and of the output (merit_jax: ours only)")
    args = ap.parse_args()

    cfg = dict(QWEN25_05B, num_hidden_layers=args.layers)
    data = pathlib.Path(args.data)
    inputs = build_inputs(data / f"k{args.k}_l{args.layers}", args.k, cfg)
    hf_inputs = inputs
    if args.format == "merit_jax":
        inputs = build_merit_jax_inputs(data / f"k{args.k}_l{args.layers}", args.k, cfg)
    weights = [float(w) for w in np.arange(args.k, 0, -1) / np.arange(args.k, 0, -1).sum()]
    model_bytes = sum((d / "model.safetensors").stat().st_size for d in hf_inputs[:1])
    n_params = sum(int(np.prod(s)) for s in qwen2_shapes(cfg).values())
    print(f"K = {args.k} inputs of {n_params / 1e6:.1f} M parameters, bf16, {model_bytes / 2**20:.0f} MiB each; "
          f"weights {np.round(weights, 4).tolist()}; {os.cpu_count()} CPU cores", flush=True)

    io_floor(hf_inputs, model_bytes, data / "io_floor.tmp")  # warms the page cache
    floor = io_floor(hf_inputs, model_bytes, data / "io_floor.tmp")
    if args.format == "merit_jax":  # every run below reads warm
        warm_page_cache(inputs)
    results: dict[str, list[dict]] = {"merit_jax": [], "mergekit": []}
    have_mergekit = pathlib.Path(args.mergekit).is_file() and args.format == "hf"
    if not have_mergekit and args.format == "hf":
        print(f"mergekit not found at {args.mergekit}: only merit_jax runs (see this file's docstring)")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ours_out, theirs_out = data / "out_merit_jax", data / "out_mergekit"
    for _ in range(args.repeats):
        shutil.rmtree(ours_out, ignore_errors=True)
        cmd = [sys.executable, "-m", "merit_jax.merge", *sum([["--ckpt", str(d)] for d in inputs], []),
               "--weights", ",".join(map(str, weights)), "--out", str(ours_out)]
        results["merit_jax"].append(timed(cmd, env))
        if have_mergekit:
            shutil.rmtree(theirs_out, ignore_errors=True)
            yaml = data / "mergekit_linear.yml"
            yaml.write_text("merge_method: linear\ndtype: bfloat16\nmodels:\n" + "".join(
                f"  - model: {d}\n    parameters:\n      weight: {w}\n" for d, w in zip(inputs, weights)))
            results["mergekit"].append(timed([args.mergekit, str(yaml), str(theirs_out), "--no-copy-tokenizer",
                                              "--quiet"]))

    def best(name):
        runs = results[name]
        return {"wall_s": min(r["wall_s"] for r in runs), "peak_rss_mib": min(r["peak_rss_mib"] for r in runs)}

    ours = best("merit_jax")
    rows = [("merit_jax", ours)]
    if have_mergekit:
        rows.append(("mergekit linear", best("mergekit")))
    model_mib = model_bytes / 2**20
    print(f"\nI/O floor (read {args.k} inputs + write 1 model, warm page cache): {floor:.2f} s; one model: "
          f"{model_mib:.0f} MiB")
    print(f"{'tool':<18}{'wall s':>9}{'peak RSS MiB':>14}{'RSS / model':>13}{'wall / floor':>14}")
    for name, r in rows:
        print(f"{name:<18}{r['wall_s']:>9.2f}{r['peak_rss_mib']:>14.0f}{r['peak_rss_mib'] / model_mib:>13.2f}"
              f"{r['wall_s'] / floor:>14.2f}")
    if have_mergekit:
        theirs = best("mergekit")
        print(f"mergekit / merit_jax: wall {theirs['wall_s'] / ours['wall_s']:.2f}x, "
              f"peak RSS {theirs['peak_rss_mib'] / ours['peak_rss_mib']:.2f}x")
        print(f"max over tensors of max|merit_jax − mergekit| / max|merit_jax|: "
              f"{max_relative_difference(ours_out, theirs_out):.2g} (bf16: one unit in the last place is at most "
              "2^-7 = 0.0078 of the largest value)")
    if args.format == "merit_jax":
        print(f"max over sampled tensors of max|merit_jax − numpy average| / max|average|: "
              f"{merit_jax_error(ours_out, inputs, weights):.2g} (bf16 output: one rounding is at most 2^-8 = 0.0039)")
    print(json.dumps({"floor_s": floor, "model_mib": model_mib, "format": args.format, **{n: r for n, r in rows}}))


if __name__ == "__main__":
    main()
