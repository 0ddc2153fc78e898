"""The split at the default θ⁰: what `python -m merit_jax.main --config configs/default.py` computes.

One module fixture runs the default config's `basin` stage (150 joint steps from the random tiny model on
the shipped mixture) and its `extract` stage, unchanged except reduction=full (the exact task gradients;
`sketch` and `stride` are linear maps of them, and tests/test_extract.py checks that the stage's reduced
rows equal the reductions of the exact ones). Then, at that θ⁰ and the default depth:
- the top-level MERIT split separates the task families better than seeded token-balanced random splits
  (ARI against the families; docs/SPLIT.md reports the numbers), and the depth-2 split is the families;
- `sketch` (extract.dim) and `stride` (extract.stride) give exactly the split that `full` gives.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from merit_jax.io import checkpoint
from merit_jax import sketch as sk
from merit_jax import partition as S

ROOT = Path(__file__).resolve().parents[1]
N_RANDOM = 200  # random splits that make the chance level


def run_stage(workdir, stage, *extra):
    cmd = [sys.executable, "-m", "merit_jax.main", "--config", "configs/default.py", "--workdir", str(workdir),
           "--stage", stage, *extra]
    # One CPU device, as a user's laptop runs it. Backend optimisation level 0 compiles faster and changes
    # the arithmetic only by float rounding (bench/repro_study.py --split-only measures the default flags).
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


@pytest.fixture(scope="module")
def default_theta0(tmp_path_factory):
    """(cfg, names, families, tokens, exact task gradients [T, P], their tensor layout) at the default θ⁰."""
    workdir = tmp_path_factory.mktemp("default") / "wd"
    run_stage(workdir, "basin")
    run_stage(workdir, "extract", "--config.extract.reduction=full",
              "--config.extract.keep_example_sketches=False")  # per-example sketches feed only diagnostics
    record = json.loads((workdir / "extract" / "tasks.json").read_text())
    tasks = record["tasks"]
    grads = np.load(workdir / "extract" / "task_grads.npy")
    specs = checkpoint.tensor_specs(workdir / "basin")
    names = record["params"]["names"]
    layout = sk.Layout(tuple(names), tuple(tuple(specs[n][0]) for n in names))
    cfg = get_config()
    assert json.loads((workdir / "basin" / "basin.json").read_text())["steps"] == cfg.basin.steps
    return (cfg, [t["name"] for t in tasks], [t["family"] for t in tasks],
            np.array([t["train_tokens"] for t in tasks]), grads, layout)


def reduce_rows(grads_tp, layout, reduction, d, s, seed):
    """Each row of an exact [T, P] gradient array reduced as the extract stage reduces a task's mean."""
    def one(x):
        flat = {n: x[o:o + size].reshape(shape)
                for n, o, size, shape in zip(layout.names, layout.offsets, layout.sizes, layout.shapes)}
        return sk.reduce_flat(flat, layout, reduction, d=d, s=s, seed=seed)
    return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(grads_tp)))


def test_top_level_split_separates_families_better_than_random_splits(default_theta0):
    cfg, names, families, tokens, grads, _ = default_theta0
    assert cfg.split.method == "merit" and cfg.split.depth == 2
    groups = S.conflict_split(grads, tokens, cfg.split.depth, names=names)
    top = [groups[0] + groups[1], groups[2] + groups[3]]  # the low and high side of the first cut
    sep = S.family_separation(top, families, tokens, n_random=N_RANDOM)
    print("top-level split vs families:", sep)
    # The first cut goes between families (the front and the back positions: docs/DATA.md)...
    low, high = ({families[i] for i in side} for side in top)
    assert low.isdisjoint(high), (low, high)
    # ...which no random token-balanced split of the tasks comes close to.
    assert sep["random_ari_rank"] == 1.0, sep
    assert sep["ari"] > sep["random_ari_mean"] + 4 * sep["random_ari_std"], sep
    # Depth 2: the groups are the families.
    final = S.family_separation(groups, families, tokens, n_random=N_RANDOM)
    print("depth-2 split vs families:", final)
    assert final["ari"] == 1.0 and final["purity"] == 1.0, final


def test_sketch_and_stride_give_exactly_the_full_split(default_theta0):
    """At the default d: every cosine of the reduced task gradients is within a bound of the exact one, and
    the split (depth 1 and the default depth) is exactly the one `full` gives."""
    cfg, names, _, tokens, grads, layout = default_theta0
    e = cfg.extract
    seed = int(e.get("seed", cfg.get("seed", 0)))
    sketched = reduce_rows(grads, layout, "sketch", e.dim, 1, seed)
    strided = reduce_rows(grads, layout, "stride", 1, e.stride, seed)
    np.testing.assert_array_equal(strided, grads[:, ::e.stride])
    assert sketched.shape == (len(names), e.dim)
    exact = S.cosine_matrix(grads)
    off = ~np.eye(len(names), dtype=bool)
    # sketch: a cosine's error has std <= (1 - cos^2) / sqrt(d) (docs/EXTRACT.md): 5 sigma over the pairs;
    # stride: no theory (it depends on how evenly the gradients spread over the coordinates)
    for label, reduced, bound in [("sketch", sketched, 5 / np.sqrt(e.dim)), ("stride", strided, 0.1)]:
        err = np.abs(S.cosine_matrix(reduced) - exact)[off]
        print(f"{label}: cosine error max {err.max():.4f}, rms {np.sqrt(np.mean(err ** 2)):.4f}")
        assert err.max() < bound, (label, err.max())
        for depth in (1, cfg.split.depth):
            full = S.conflict_split(grads, tokens, depth, names=names)
            assert S.conflict_split(reduced, tokens, depth, names=names) == full, (label, depth)
