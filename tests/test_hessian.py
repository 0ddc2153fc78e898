"""merit_jax.diagnostics.hessian_top_eigs: Lanczos on Hessian-vector products against known spectra,
a sharded run on 8 devices, and a dense Hessian of a 12-layer Qwen2's loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

from merit_jax import diagnostics as dg
from merit_jax import hessian
from merit_jax.gradients import split_model
from merit_jax.losses import mean_loss
from merit_jax.models import params as P
from merit_jax.models.config import ModelConfig
from merit_jax.models.qwen2 import Qwen2ForCausalLM
from merit_jax.sharding import make_mesh

SHAPES = {"attn/kernel": (4, 8), "attn/bias": (10,), "mlp/kernel": (3, 4, 4), "norm/scale": (6,)}  # P = 96


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(tree[n], np.float64).ravel() for n in sorted(tree)])


def _quadratic(lam: np.ndarray, seed: int = 0):
    """loss(θ) = ½ xᵀ A x over the pytree SHAPES (x: its leaves flattened in name order), A = Q diag(λ) Qᵀ."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((lam.size, lam.size)))
    a = jnp.asarray((q * lam) @ q.T, jnp.float32)

    def loss(p):
        x = jnp.concatenate([p[n].ravel() for n in sorted(p)])
        return 0.5 * x @ (a @ x)

    params = {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in SHAPES.items()}
    return loss, params, q


def _spectrum(top, tail, seed=1):
    p = sum(int(np.prod(s)) for s in SHAPES.values())
    return np.concatenate([top, tail(np.random.default_rng(seed), p - len(top))])


SPECTRA = {
    # top 5 with relative gaps >= 15 %, a spread tail with negative curvature
    "gap": _spectrum([10.0, 8.0, 6.5, 5.0, 4.0], lambda r, n: r.uniform(-2.0, 2.0, n)),
    # the tail clustered within 1e-3 just below a top eigenvalue 1.25x away
    "clustered-tail": _spectrum([3.0, 2.5, 2.0, 1.6, 1.25], lambda r, n: 1.0 + 1e-3 * r.random(n)),
}


def _check_against(lam, q, vals, vecs, k):
    order = np.argsort(-lam)[:k]
    np.testing.assert_allclose(vals, lam[order], rtol=1e-3)
    assert np.all(np.diff(vals) <= 0)
    for i, v in enumerate(vecs):
        y = _flat(v)
        assert np.linalg.norm(y) == pytest.approx(1.0, abs=1e-5)
        assert abs(y @ q[:, order[i]]) >= 0.999, i


@pytest.mark.parametrize("spectrum", SPECTRA)
def test_quadratic_top_eigenpairs(spectrum):
    lam = SPECTRA[spectrum]
    loss, params, q = _quadratic(lam)
    k = 4
    res = hessian.lanczos(hessian.hvp(loss), params, k)
    _check_against(lam, q, res.values, res.vectors, k)
    assert res.converged and res.steps < hessian.default_iters(k, lam.size)
    assert np.all(res.residuals <= 1e-4 * lam.max())
    for v in res.vectors:  # shaped like the parameters
        assert {n: x.shape for n, x in v.items()} == SHAPES
        assert all(x.dtype == jnp.float32 for x in v.values())


def test_top_means_largest_algebraic_and_low_rank_restarts():
    # strong negative curvature (-50) must not count as "top"; rank 4 makes the Krylov space invariant
    # after 4 steps, so finding the 5th and 6th eigenvalue (0) takes restarts orthogonal to the basis
    p = sum(int(np.prod(s)) for s in SHAPES.values())
    lam = np.zeros(p)
    lam[:4] = [7.0, 3.0, -20.0, -50.0]
    loss, params, q = _quadratic(lam, seed=3)
    res = hessian.lanczos(hessian.hvp(loss), params, 3)
    vals, vecs = res.values, res.vectors
    assert res.restarts >= 1
    np.testing.assert_allclose(vals, [7.0, 3.0, 0.0], atol=1e-5)
    for i in range(2):
        assert abs(_flat(vecs[i]) @ q[:, i]) >= 0.999
    assert np.linalg.norm(q[:, :4].T @ _flat(vecs[2])) < 1e-3  # the 0 eigenvector lies in the null space


def test_sharded_run_equals_unsharded():
    lam = SPECTRA["gap"]
    loss, params, q = _quadratic(lam)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    specs = {"attn/kernel": PS("data", "model"), "attn/bias": PS(None), "mlp/kernel": PS(None, "data", "model"),
             "norm/scale": PS("data")}
    sharded = {n: jax.device_put(x, NamedSharding(mesh, specs[n])) for n, x in params.items()}
    vals, vecs = dg.hessian_top_eigs(loss, params, 3)
    vals_s, vecs_s = dg.hessian_top_eigs(loss, sharded, 3)
    np.testing.assert_allclose(vals_s, vals, rtol=1e-6)
    for v, v_s in zip(vecs, vecs_s):
        for n in SHAPES:
            assert v_s[n].sharding.is_equivalent_to(sharded[n].sharding, len(SHAPES[n])), n
            np.testing.assert_allclose(np.asarray(v_s[n]), np.asarray(v[n]), atol=1e-5)
    _check_against(lam, q, vals_s, vecs_s, 3)


def test_bad_arguments_are_named():
    loss, params, _ = _quadratic(SPECTRA["gap"])
    with pytest.raises(ValueError, match="k must be an integer in \\[1, 96\\]"):
        dg.hessian_top_eigs(loss, params, 97)
    with pytest.raises(ValueError, match="iters must be in"):
        dg.hessian_top_eigs(loss, params, 5, iters=4)
    with pytest.raises(ValueError, match="'steps'.*every leaf must be floating point"):
        dg.hessian_top_eigs(loss, {**params, "steps": jnp.arange(3)}, 2)


def test_qwen2_loss_top_eigenvalues_match_the_dense_hessian():
    """A 12-layer tiny Qwen2 sharded over (fsdp 4, tp 2); the Hessian w.r.t. 112 parameters spread from the
    first layer to the last (so every product backpropagates through the whole model), dense via
    jax.hessian, against Lanczos on the same sharded parameters."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=12, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    mesh = make_mesh(data=1, fsdp=4, tp=2)
    model = P.create_sharded(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
    names = ["model/layers/0/input_layernorm/scale", "model/layers/11/post_attention_layernorm/scale",
             "model/layers/11/self_attn/k_proj/bias", "model/norm/scale"]
    graphdef, selected, rest = split_model(model, names)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 12)))

    def loss(sel):
        return mean_loss(nnx.merge(graphdef, sel, rest)(ids[:, :-1]), ids[:, 1:], jnp.ones((4, 11)))

    with jax.set_mesh(mesh):
        vals, vecs = dg.hessian_top_eigs(loss, selected, 3)
        x0, unravel = ravel_pytree(jax.tree.map(np.asarray, selected))
        dense = np.asarray(jax.jit(jax.hessian(lambda x: loss(unravel(x))))(x0), np.float64)
    lam, u = np.linalg.eigh(0.5 * (dense + dense.T))
    np.testing.assert_allclose(vals, lam[::-1][:3], rtol=1e-3)
    for i, v in enumerate(vecs):
        assert abs(np.asarray(ravel_pytree(jax.tree.map(np.asarray, v))[0]) @ u[:, -1 - i]) >= 0.999


def test_bf16_parameters_give_float32_vectors_and_bf16_accurate_values(caplog):
    """The tangent takes the parameters' dtype (bf16 rounding of each product's input), so the values are
    good to ~0.1 %, not 1e-5; the vectors are float32, and the residual check says so in a warning."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"l1/kernel": jax.random.normal(k1, (4, 16)), "l1/bias": jax.random.normal(k2, (16,)),
              "l2/kernel": jax.random.normal(k3, (16, 1))}
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    x = jnp.linspace(-1.0, 1.0, 64).reshape(16, 4)

    def loss(p):
        h = jnp.tanh(x @ p["l1/kernel"].astype(jnp.float32) + p["l1/bias"].astype(jnp.float32))
        return jnp.mean((h @ p["l2/kernel"].astype(jnp.float32) - 0.5) ** 2)

    exact, _ = dg.hessian_top_eigs(loss, jax.tree.map(lambda a: a.astype(jnp.float32), params), 3)
    vals, vecs = dg.hessian_top_eigs(loss, params, 3)
    np.testing.assert_allclose(vals, exact, rtol=1e-2)
    assert all(x.dtype == jnp.float32 for x in vecs[0].values())
    assert "residuals" in caplog.text
