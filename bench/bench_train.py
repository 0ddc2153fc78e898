"""Training throughput: merit_jax's train step against a plain PyTorch + transformers AdamW loop, side by side.

    python bench/bench_train.py [--hidden 256 --layers 4 --heads 8 --kv-heads 4 --vocab 4096]
                                [--batch 8 --seq 256 --steps 10 --warmup 3 --repeats 2] [--json OUT.json]

Same Qwen2 architecture and the same random initial weights (transformers' init, copied into ours), same batch
of token ids (every target supervised), same sequence length, fp32 on this machine's CPU; both do forward,
backward, global-norm clipping at 1.0 and an AdamW update per step. Ours is the trainer's own jitted step
(merit_jax.training.step.build_step_functions on a one-device mesh, donated state); theirs is
`transformers.Qwen2ForCausalLM` + `torch.optim.AdamW` (SDPA attention), the loop a user would write. Each
side runs `--warmup` untimed steps (compilation for JAX), then `--steps` timed ones, `--repeats` times,
alternating, keeping each side's best (the machine may be shared); reported: tokens/s (batch x seq per
second), ours / theirs, and both final losses (equal up to float rounding: the same training run).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def hf_config(args) -> dict:
    from merit_jax.models.config import tiny_hf_config

    return tiny_hf_config(args.vocab, hidden_size=args.hidden,
                          intermediate_size=args.intermediate or 11 * args.hidden // 4,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq, 512),
                          rope_theta=10000.0, tie_word_embeddings=False)


def batch(args) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((args.batch, args.seq), np.float32),
            "segment_ids": np.ones((args.batch, args.seq), np.int32),
            "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy()}


class Ours:
    """The trainer's own jitted step, from given initial weights."""

    def __init__(self, args, hf: dict, data: dict, init: dict[str, np.ndarray]):
        import jax
        from flax import nnx

        from merit_jax.config import TrainSettings
        from merit_jax.models.registry import model_factory
        from merit_jax.sharding import make_mesh
        from merit_jax.training.feed import to_global
        from merit_jax.training.step import SplitModel, build_step_functions

        settings = TrainSettings(learning_rate=1e-4, warmup_steps=0, schedule="constant", batch_size=args.batch,
                                 seq_len=args.seq, weight_decay=0.01, grad_clip=1.0, remat="none", no_decay=())
        model = SplitModel(nnx.eval_shape(model_factory(hf)))
        self.mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
        self.fns = build_step_functions(model, settings, num_steps=10**6, mesh=self.mesh)
        params = {k: jax.device_put(v, self.fns.param_shardings[k]) for k, v in init.items()}
        with jax.set_mesh(self.mesh):
            self.state = self.fns.init_state(params)
            self.batch = to_global(data, self.mesh, args.batch)

    def run(self, n: int) -> tuple[float, float]:
        import jax

        with jax.set_mesh(self.mesh):
            start = time.perf_counter()
            for _ in range(n):
                self.state, metrics = self.fns.train_step(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start, float(metrics["loss"])


class Torch:
    """transformers' Qwen2ForCausalLM + torch.optim.AdamW, the plain loop."""

    def __init__(self, args, hf: dict, data: dict):
        import torch
        import transformers

        torch.manual_seed(0)
        config = transformers.Qwen2Config(**{k: v for k, v in hf.items() if k != "architectures"})
        self.model = transformers.Qwen2ForCausalLM(config).train()
        # AdamW's default weight decay applies to every tensor; ours is told the same (no_decay=()).
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        self.ids = torch.tensor(data["input_ids"], dtype=torch.long)
        self.targets = torch.tensor(data["targets"], dtype=torch.long)

    def weights(self) -> dict[str, np.ndarray]:
        """The initial weights under merit_jax's parameter names ([in, out] kernels)."""
        from flax import nnx

        from merit_jax.io.hf import hf_key
        from merit_jax.models.registry import model_factory
        from merit_jax.models import params as P

        hf_cfg = self.model.config.to_dict()
        hf_cfg["model_type"] = "qwen2"
        state = {k: v.detach().numpy() for k, v in self.model.state_dict().items()}
        out = {}
        for name in P.specs(nnx.eval_shape(model_factory(hf_cfg))):
            key, transpose = hf_key(name)
            out[name] = np.ascontiguousarray(state[key].T if transpose else state[key])
        return out

    def run(self, n: int) -> tuple[float, float]:
        import torch

        start = time.perf_counter()
        for _ in range(n):
            logits = self.model(input_ids=self.ids).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     self.targets.reshape(-1))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        return time.perf_counter() - start, float(loss.detach())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=0, help="default 11/4 x hidden")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    hf, data = hf_config(args), batch(args)
    import jax
    import torch

    print(f"Qwen2 hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} vocab={args.vocab}; "
          f"batch {args.batch} x seq {args.seq}; fp32 AdamW + clip 1.0; {os.cpu_count()} CPU cores; "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    theirs = Torch(args, hf, data)
    ours = Ours(args, hf, data, theirs.weights())
    ours.run(args.warmup)  # compiles
    theirs.run(args.warmup)
    best = {"ours": float("inf"), "torch": float("inf")}
    loss = {}
    for _ in range(args.repeats):
        for name, side in (("ours", ours), ("torch", theirs)):
            seconds, loss[name] = side.run(args.steps)
            best[name] = min(best[name], seconds)
    tokens = args.batch * args.seq * args.steps
    rate = {k: tokens / v for k, v in best.items()}
    print(f"{'':10}{'tokens/s':>12}{'final loss':>12}")
    print(f"{'merit_jax':10}{rate['ours']:12.0f}{loss['ours']:12.4f}")
    print(f"{'torch+HF':10}{rate['torch']:12.0f}{loss['torch']:12.4f}")
    print(f"ratio ours/theirs: {rate['ours'] / rate['torch']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "tokens_per_s": rate, "final_loss": loss,
                                         "ratio": rate["ours"] / rate["torch"]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
