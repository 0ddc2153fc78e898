"""Per-example gradient throughput: merit_jax's extraction against torch.func on the same model, batch and CPU.

    python bench/bench_extract.py [--hidden 128] [--layers 2] [--seq 64] [--chunk 16] [--chunks 4] [--threads 0]

Both sides do the same work per micro-chunk of C examples: the per-example gradients of the per-example loss
(mean cross-entropy over its supervised tokens) w.r.t. every parameter except the embeddings and the LM head,
then their sum and per-example norms (what the extract stage keeps: reduction=full, no per-example sketches).
  ours:    merit_jax.gradients.TaskExtractor: one jit-compiled scan of jax.vmap(jax.value_and_grad(loss))
  PyTorch: torch.func.vmap(torch.func.grad(loss)) over torch.func.functional_call on the HF model (eager
           attention: sdpa has no vmap rule), one call per micro-chunk, the same reductions in torch.
Throughput = examples / best wall time of `--repeats` runs (the two sides interleaved), after a warm-up run
(compilation excluded). `--threads 1` pins both to one thread (steadier numbers on a shared machine).
The two sides' summed gradients are compared first (they must agree).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def make_batch(n: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n right-padded examples of 3/4..1 x seq tokens; the last third of each is supervised."""
    rng = np.random.default_rng(seed)
    b = {k: np.zeros((n, seq), np.int32) for k in ("input_ids", "targets", "segment_ids", "positions")}
    b["loss_mask"] = np.zeros((n, seq), np.float32)
    for i in range(n):
        length = int(rng.integers(3 * seq // 4, seq + 1))
        ids = rng.integers(1, vocab, size=length)
        b["input_ids"][i, :length] = ids
        b["targets"][i, :length - 1] = ids[1:]
        b["loss_mask"][i, 2 * length // 3:length - 1] = 1.0
        b["segment_ids"][i, :length] = 1
        b["positions"][i, :length] = np.arange(length)
    return b


def torch_extractor(model, names, chunk: int):
    """fn(batch) -> (sum of per-example gradients {name: tensor}, per-example norms [n])."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = dict(model.named_parameters())
    selected = {k: params[k].detach() for k in names}
    frozen = {k: v.detach() for k, v in params.items() if k not in selected}

    def loss(sel, ids, targets, mask, attn):
        out = functional_call(model, ({**frozen, **sel},), (ids[None],), {"attention_mask": attn[None]})
        ce = torch.nn.functional.cross_entropy(out.logits[0].float(), targets, reduction="none")
        return (ce * mask).sum() / mask.sum().clamp_min(1.0)

    per_example = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0))

    def run(batch):
        ids, tg = torch.from_numpy(batch["input_ids"]).long(), torch.from_numpy(batch["targets"]).long()
        mask, attn = torch.from_numpy(batch["loss_mask"]), torch.from_numpy(batch["segment_ids"] > 0).long()
        total = {k: torch.zeros_like(v) for k, v in selected.items()}
        norms = []
        with torch.no_grad():
            for s in range(0, len(ids), chunk):
                g = per_example(selected, ids[s:s + chunk], tg[s:s + chunk], mask[s:s + chunk], attn[s:s + chunk])
                sq = sum(v.reshape(v.shape[0], -1).pow(2).sum(1) for v in g.values())
                norms.append(sq.sqrt())
                for k, v in g.items():
                    total[k] += v.sum(0)
        return total, torch.cat(norms)

    return run


def plain_step(model, names, batch):
    """A plain forward+backward (batched mean loss, gradients of the same parameters) over the same rows."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from merit_jax import gradients as X
    from merit_jax.losses import mean_loss

    graphdef, selected, rest = X.split_model(model, names)
    rows = {k: jnp.asarray(v) for k, v in batch.items()}

    @jax.jit
    def step(sel, rest, b):
        def loss(s):
            m = nnx.merge(graphdef, s, rest)
            return mean_loss(m(b["input_ids"], positions=b["positions"], segment_ids=b["segment_ids"]),
                             b["targets"], b["loss_mask"])
        return jax.value_and_grad(loss)(sel)

    return lambda: jax.block_until_ready(step(selected, rest, rows))


def best_times(fns, repeats: int) -> list[float]:
    """Best wall time of each fn, runs interleaved (the two sides see the same machine load)."""
    for fn in fns:
        fn()  # warm-up (compilation)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [min(ts) for ts in times]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=352)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16, help="micro-chunk: examples per vmap")
    p.add_argument("--chunks", type=int, default=4, help="micro-chunks per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both sides (0: all cores)")
    a = p.parse_args(argv)

    flags = ["--xla_force_host_platform_device_count=1"]
    if a.threads == 1:
        flags += ["--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    import jax
    import torch
    import transformers

    if a.threads:
        torch.set_num_threads(a.threads)

    from merit_jax import gradients as X
    from merit_jax.models import params as P
    from merit_jax.io.load import load_model

    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                      num_key_value_heads=max(1, a.heads // 2), tie_word_embeddings=False,
                                      rope_theta=10000.0, max_position_embeddings=max(256, a.seq),
                                      attn_implementation="eager")
    torch_model = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for prm in torch_model.parameters():
            prm.normal_(0.0, 0.05)
    tmp = tempfile.mkdtemp(prefix="bench_extract_")
    torch_model.save_pretrained(tmp)
    model = load_model(tmp)

    n = a.chunk * a.chunks
    batch = make_batch(n, a.seq, a.vocab)
    names = X.select_params(list(P.flatten(model)))
    torch_names = [k for k in dict(torch_model.named_parameters()) if "embed_tokens" not in k and "lm_head" not in k]
    ours = X.TaskExtractor(model, names, X.ExtractOptions(reduction="full", micro_chunk=a.chunk,
                                                          keep_example_sketches=False))
    theirs = torch_extractor(torch_model, torch_names, a.chunk)

    # same work, same answer: the mean gradients and per-example norms agree
    r = ours(batch, task="bench")
    t_sum, t_norms = theirs(batch)
    from merit_jax.io.hf import hf_key
    t_mean = np.concatenate([(t_sum[hf_key(k)[0]].numpy().T if hf_key(k)[1] else t_sum[hf_key(k)[0]].numpy()).ravel()
                             for k in names]) / n
    rel = np.abs(r.vector - t_mean).max() / np.abs(t_mean).max()
    np.testing.assert_allclose(r.norms, t_norms.numpy(), rtol=2e-3)
    assert rel < 2e-3, rel

    # the cost of extraction relative to a plain batched forward+backward over the same tokens (the issue's
    # accelerator target: <= 2x with reduction=sketch and per-example sketches kept)
    sketcher = X.TaskExtractor(model, names, X.ExtractOptions(reduction="sketch", micro_chunk=a.chunk,
                                                              keep_example_sketches=True))
    plain = plain_step(model, names, batch)
    t_ours, t_torch, t_sketch, t_plain = best_times(
        [lambda: ours(batch, task="bench"), lambda: theirs(batch), lambda: sketcher(batch, task="bench"), plain],
        a.repeats)
    p_count = sum(int(np.prod(np.shape(v))) for k, v in P.flatten(model).items() if k in names)
    print(f"model: Qwen2 hidden={a.hidden} layers={a.layers} vocab={a.vocab}; {p_count} parameters differentiated; "
          f"{n} examples of <= {a.seq} tokens, micro-chunk {a.chunk}")
    print(f"CPU: {os.cpu_count()} cores; jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"max relative difference of the mean gradients {rel:.1e}")
    print(f"merit_jax (vmap(grad), jit, scan):  {n / t_ours:9.1f} examples/s  ({t_ours * 1e3:.1f} ms)")
    print(f"torch.func (vmap(grad), eager):     {n / t_torch:9.1f} examples/s  ({t_torch * 1e3:.1f} ms)")
    print(f"ratio merit_jax / torch.func:       {t_torch / t_ours:9.2f}x  (target >= 1.5x)")
    print(f"extraction with sketch (d=4096, per-example sketches kept) / plain forward+backward of the same "
          f"{n} rows: {t_sketch / t_plain:.2f}x  ({t_sketch * 1e3:.1f} ms vs {t_plain * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
