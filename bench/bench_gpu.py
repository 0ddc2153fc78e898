"""On one NVIDIA GPU: cuDNN attention over packed rows against XLA's, and the train step's MFU in bf16.

    python bench/bench_gpu.py [--json OUT.json] [--budget 420] [--models 1.5B,3B] [--smoke]

1. Attention parity (Qwen2.5-3B heads: 16 query / 2 KV heads of 128; rows packed with examples of random
   lengths and trailing padding): `model.attention=cudnn` (cuDNN's fused kernel with the rows as ragged
   offsets, merit_jax.models.attention.cudnn_attention) and cuDNN handed the dense mask (a [B, 1, T, S] bias),
   each against an fp32 XLA reference, beside XLA's own bf16 error as the yardstick; outputs and dq / dk / dv
   over the real tokens; and no attention across segments: perturbing one example's keys and values leaves
   every other token's output bit for bit unchanged.
2. Attention fwd+bwd time and temp memory per variant (XLA bf16 materialises the [B, N, T, S] scores).
3. The project's own train step (merit_jax.training.step, fp32 master weights, bf16 compute, AdamW, clipping,
   remat dots, layers as one scan, logits in chunks of 512) on Qwen2.5-1.5B / 3B shapes (configs/arch) with
   random weights and packed random rows at seq 2048: step time, tokens/s and MFU = model flops / (step time x
   peak bf16 flops), model flops = 6 x matmul parameters x tokens + causal attention (6 x B x T^2 x heads x
   head_dim per layer, counted over whole rows: an upper bound on what packing leaves to compute), for
   `model.attention` = cudnn and xla from the same weights and batch (first-step losses compared).

`--smoke` runs every section on this machine's CPU at toy sizes without the cuDNN variants (checks the script).
Each section runs on its own; a failure prints its traceback and the next one goes on.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM)
RESULTS: dict = {}


def section(name):
    def wrap(fn):
        def run(*a, **k):
            print(f"\n== {name}", flush=True)
            start = time.perf_counter()
            try:
                out = fn(*a, **k)
            except Exception:  # report and go on: one broken variant must not cost the device time of the rest
                traceback.print_exc()
                out = None
                RESULTS.setdefault("errors", []).append(name)
            print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)
            return out
        return run
    return wrap


def packed_segments(rng, rows: int, seq: int, lo: int, hi: int, pad: int) -> np.ndarray:
    """int32 [rows, seq]: examples of random lengths in [lo, hi) numbered 1.. per row, `pad` padding at the end."""
    seg = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        t, n = 0, 0
        while t < seq - pad:
            n += 1
            length = min(int(rng.integers(lo, hi)), seq - pad - t)
            seg[r, t:t + length] = n
            t += length
    return seg


def peak_flops(kind: str) -> float:
    return next((v for k, v in PEAK_BF16.items() if k in kind), float("nan"))


@section("environment")
def environment():
    import flax
    import jax

    dev = jax.devices()[0]
    info = {"jax": jax.__version__, "flax": flax.__version__, "platform": dev.platform, "device": dev.device_kind}
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
        info["cudnn"] = check_cudnn_version()
    except Exception as e:  # noqa: BLE001 - CPU: no cuDNN
        info["cudnn"] = f"none ({type(e).__name__})"
    print(json.dumps(info))
    RESULTS["environment"] = info
    return info


def variants(smoke: bool):
    """name -> attention(q, k, v, seg) in the compute dtype."""
    import jax
    import jax.numpy as jnp

    from merit_jax.models import attention

    def xla(q, k, v, seg):
        return jax.nn.dot_product_attention(q, k, v, mask=attention.dense_mask(seg))

    out = {"xla_bf16": xla}
    if smoke:
        return out

    def cudnn_bias(q, k, v, seg):
        return jax.nn.dot_product_attention(q, k, v, mask=attention.dense_mask(seg), implementation="cudnn")

    out["cudnn_packed"] = attention.cudnn_attention
    out["cudnn_packed_M8"] = lambda q, k, v, seg: attention.cudnn_attention(q, k, v, seg, max_segments=8)
    out["cudnn_dense_bias"] = cudnn_bias
    return out


@section("attention parity vs fp32 XLA (packed rows, GQA 16:2, head 128)")
def attention_parity(smoke: bool):
    import jax
    import jax.numpy as jnp

    from merit_jax.models import attention

    rng = np.random.default_rng(0)
    b, t, n, kv, h = (2, 256, 4, 2, 32) if smoke else (2, 2048, 16, 2, 128)
    seg = jnp.asarray(packed_segments(rng, b, t, t // 8, t // 3, pad=37))
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, kv, h), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, kv, h), jnp.bfloat16)
    real = (seg != 0)[:, :, None, None]
    g = jax.random.normal(keys[3], (b, t, n, h), jnp.float32) * real

    def with_grads(fn, dtype):
        def loss(q, k, v):
            o = fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), seg)
            return jnp.sum(o.astype(jnp.float32) * g), o
        (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return o, grads

    def ref(q, k, v, seg):
        return jax.nn.dot_product_attention(q, k, v, mask=attention.dense_mask(seg))

    o_ref, g_ref = with_grads(ref, jnp.float32)
    out = {}
    for name, fn in variants(smoke).items():
        if name.endswith("_M8"):  # rows here hold up to 9 runs: that bound is for timing only
            continue
        try:
            o, grads = with_grads(fn, jnp.bfloat16)
            err = {"out": float(jnp.max(jnp.abs(jnp.where(real, o.astype(jnp.float32) - o_ref, 0))))}
            for label, a, r in zip(("dq", "dk", "dv"), grads, g_ref):
                rk = real if a.shape[2] == n else (seg != 0)[:, :, None, None]
                err[label] = float(jnp.max(jnp.abs(jnp.where(rk, a.astype(jnp.float32) - r, 0))))
            err["all_finite"] = bool(jnp.all(jnp.isfinite(o))) and all(bool(jnp.all(jnp.isfinite(x))) for x in grads)
            # one example's keys and values changed: every token outside it must not move (bit for bit)
            victim = (seg == 2) & (jnp.arange(b)[:, None] == 0)
            noise = jax.random.normal(jax.random.key(9), k.shape, jnp.bfloat16) * victim[:, :, None, None]
            o2 = jax.jit(fn)(q, k + noise, v + noise, seg)
            o1 = jax.jit(fn)(q, k, v, seg)
            outside = (~victim & (seg != 0))[:, :, None, None]
            err["cross_segment_max_change"] = float(jnp.max(jnp.abs(jnp.where(outside, (o2 - o1).astype(
                jnp.float32), 0))))
            err["victim_changed"] = float(jnp.max(jnp.abs(jnp.where(victim[:, :, None, None], (o2 - o1).astype(
                jnp.float32), 0))))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            err = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        out[name] = err
        print(f"   {name:24s} {json.dumps(err)}", flush=True)
    RESULTS["attention_parity"] = {"shape": [b, t, n, kv, h], "segments_row0": int(seg[0].max()), **out}
    return out


@section("attention fwd+bwd time and temp memory (3B heads)")
def attention_speed(smoke: bool):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    shapes = [(2, 256, 4, 2, 32)] if smoke else [(8, 2048, 16, 2, 128), (4, 4096, 16, 2, 128)]
    out = {}
    for b, t, n, kv, h in shapes:
        seg = jnp.asarray(packed_segments(rng, b, t, t // 8, t // 2, pad=64))
        keys = jax.random.split(jax.random.key(1), 4)
        q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
        k = jax.random.normal(keys[1], (b, t, kv, h), jnp.bfloat16)
        v = jax.random.normal(keys[2], (b, t, kv, h), jnp.bfloat16)
        flops = 3 * 2 * b * t * t * n * h  # causal fwd (2 matmuls, half the square) + bwd (x2), whole rows
        for name, fn in variants(smoke).items():
            try:
                step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg).astype(jnp.float32)),
                                        argnums=(0, 1, 2)))
                compiled = step.lower(q, k, v).compile()
                mem = compiled.memory_analysis()
                temp = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**30 if mem else float("nan")
                jax.block_until_ready(compiled(q, k, v))
                reps = 3 if smoke else 20
                start = time.perf_counter()
                for _ in range(reps):
                    res = compiled(q, k, v)
                jax.block_until_ready(res)
                ms = (time.perf_counter() - start) / reps * 1e3
                row = {"ms": round(ms, 3), "temp_GiB": round(temp, 3), "TFLOPs": round(flops / ms / 1e9, 1)}
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            out[f"{name}@{b}x{t}"] = row
            print(f"   {name:24s} {b}x{t}: {json.dumps(row)}", flush=True)
    RESULTS["attention_speed"] = out
    return out


def model_flops(hf: dict, rows: int, seq: int) -> tuple[float, int]:
    """(model flops of one step, matmul parameters)."""
    d, f, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    n, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    h = d // n
    per_layer = d * n * h + 2 * d * kv * h + n * h * d + 3 * d * f
    matmul_params = layers * per_layer + hf["vocab_size"] * d  # the head (tied or not): one vocab x hidden matmul
    tokens = rows * seq
    return 6 * matmul_params * tokens + layers * 6 * rows * seq * seq * n * h, matmul_params


def random_params(split, mesh) -> dict:
    """N(0, 0.02) kernels and embeddings, unit norm scales, zero biases; one small program per shape."""
    import functools

    import jax
    import jax.numpy as jnp

    from merit_jax.models import params as P

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def normal(key, shape, dtype):
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    shardings = split.shardings(mesh)
    out = {}
    for i, (name, (shape, dtype)) in enumerate(P.specs(split.abstract).items()):
        if name.endswith("/scale"):
            value = jnp.ones(shape, dtype)
        elif name.endswith("/bias"):
            value = jnp.zeros(shape, dtype)
        else:
            value = normal(jax.random.key(i), tuple(shape), jnp.dtype(dtype))
        out[name] = jax.device_put(value, shardings[name])
    return out


@section("train step MFU (bf16 compute, fp32 master, AdamW)")
def train_mfu(model_names, smoke: bool, budget_s: float, t0: float, rows_for: dict):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from merit_jax.config import TrainSettings
    from merit_jax.models import params as P
    from merit_jax.models.registry import model_factory
    from merit_jax.sharding import make_mesh
    from merit_jax.training.feed import to_global
    from merit_jax.training.step import SplitModel, build_step_functions

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    kind = jax.devices()[0].device_kind
    out = {}
    attentions = ("xla",) if smoke else ("cudnn", "xla")
    for name in model_names:
        if smoke:
            from merit_jax.models.config import tiny_hf_config
            hf = tiny_hf_config(512, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                                num_attention_heads=4, num_key_value_heads=2)
            rows, seq = 2, 256
        else:
            hf = json.loads((REPO / "configs/arch" / f"Qwen2.5-{name}-Instruct/config.json").read_text())
            rows, seq = rows_for[name], 2048
        rng = np.random.default_rng(2)
        seg = packed_segments(rng, rows, seq, seq // 8, seq // 2, pad=32)
        ids = rng.integers(0, min(hf["vocab_size"], 150000), (rows, seq + 1)).astype(np.int32)
        pos = np.zeros_like(seg)
        for r in range(rows):
            for s in range(1, seg[r].max() + 1):
                idx = np.nonzero(seg[r] == s)[0]
                pos[r, idx] = np.arange(len(idx))
        batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": (seg > 0).astype(np.float32),
                 "segment_ids": seg, "positions": pos}
        flops, n_matmul = model_flops(hf, rows, seq)
        first_loss = {}
        for attn in attentions:
            if time.perf_counter() - t0 > budget_s:
                print(f"   skipped {name}/{attn}: past the --budget", flush=True)
                continue
            try:
                s = TrainSettings(learning_rate=1e-5, warmup_steps=0, schedule="constant", batch_size=rows,
                                  seq_len=seq, weight_decay=0.01, grad_clip=1.0, remat="dots",
                                  param_dtype="float32", compute_dtype="bfloat16", attention=attn,
                                  scan_layers=True, logits_chunk=512)
                make = model_factory(hf, dtype="float32", compute_dtype="bfloat16", remat="dots", attention=attn,
                                     scan_layers=True, seed=0)
                split = SplitModel(nnx.eval_shape(make))
                params = random_params(split, mesh)  # (P.create_sharded's one init program: 5 min to compile)
                c0 = time.perf_counter()
                fns = build_step_functions(split, s, num_steps=10**6, mesh=mesh)
                with jax.set_mesh(mesh):
                    state = fns.init_state(params)
                    del params
                    gbatch = to_global(batch, mesh, rows)
                    compiled = fns.train_step.lower(state, gbatch).compile()
                    compile_s = time.perf_counter() - c0
                    mem = compiled.memory_analysis()
                    state, metrics = compiled(state, gbatch)
                    first_loss[attn] = float(metrics["loss"])
                    for _ in range(2):
                        state, metrics = compiled(state, gbatch)
                    jax.block_until_ready(state)
                    steps = 2 if smoke else 10
                    start = time.perf_counter()
                    for _ in range(steps):
                        state, metrics = compiled(state, gbatch)
                    jax.block_until_ready((state, metrics))
                    sec = (time.perf_counter() - start) / steps
                del state
                row = {"rows": rows, "seq": seq, "step_s": round(sec, 4), "tokens_per_s": round(rows * seq / sec),
                       "mfu": round(flops / sec / peak_flops(kind), 4),
                       "mfu_6N_only": round(6 * n_matmul * rows * seq / sec / peak_flops(kind), 4),
                       "compile_s": round(compile_s, 1), "first_loss": first_loss[attn],
                       "last_loss": float(metrics["loss"]),
                       "temp_GiB": round(getattr(mem, "temp_size_in_bytes", 0) / 2**30, 2) if mem else None,
                       "peak_GiB": round(jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) / 2**30, 2)
                       if jax.devices()[0].memory_stats() else None}
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            out[f"{name}/{attn}"] = row
            print(f"   {name}/{attn}: {json.dumps(row)}", flush=True)
            jax.clear_caches()
    RESULTS["train_mfu"] = {"device": kind, "peak_flops": peak_flops(kind), **out}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=pathlib.Path, default=None)
    p.add_argument("--budget", type=float, default=200.0, help="seconds after which no new train config starts")
    p.add_argument("--models", default="1.5B,3B")
    p.add_argument("--rows", default="1.5B=16,3B=8", help="rows per step (seq 2048) per model")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    environment()
    attention_parity(args.smoke)
    attention_speed(args.smoke)
    rows_for = {k: int(v) for k, v in (kv.split("=") for kv in args.rows.split(","))}
    train_mfu(["tiny"] if args.smoke else args.models.split(","), args.smoke, args.budget, t0, rows_for)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(RESULTS, indent=2) + "\n")


if __name__ == "__main__":
    main()
