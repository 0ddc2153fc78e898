"""merit_jax.diagnostics: Theorem 1 on an explicit quadratic, LMC barriers, displacement, weight noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merit_jax import diagnostics as dg


def _random_quadratic(rng, p, zero_directions=0):
    u, _ = np.linalg.qr(rng.standard_normal((p, p)))
    lam = rng.uniform(0.1, 5.0, size=p)
    lam[:zero_directions] = 0.0  # flat directions: no curvature, no gain
    return lam, u, rng.standard_normal(p)


@pytest.mark.parametrize("k,zero_directions", [(2, 0), (4, 0), (5, 3)])
def test_theorem1_identity_on_a_quadratic(k, zero_directions):
    rng = np.random.default_rng(k)
    p = 7
    lam, u, star = _random_quadratic(rng, p, zero_directions)
    thetas = star + rng.standard_normal((k, p)) * 2.0
    weights = rng.integers(1, 100, size=k).astype(np.float64)
    terms = dg.quadratic_theorem1_terms(lam, u, star, thetas, weights, l_star=0.3)

    # the left side computed here, independently, from the explicit Hessian
    hess = u @ np.diag(lam) @ u.T
    w = weights / weights.sum()

    def loss(theta):
        d = theta - star
        return 0.3 + 0.5 * d @ hess @ d

    merged = w @ thetas
    lhs = sum(wi * loss(t) for wi, t in zip(w, thetas)) - loss(merged)
    assert terms["lhs"] == pytest.approx(lhs, rel=1e-9)
    assert terms["rhs"] == pytest.approx(lhs, rel=1e-6)
    assert lhs >= 0
    np.testing.assert_allclose(terms["merged"], merged)
    assert np.all(terms["per_direction"][:zero_directions] == 0)

    # the pipeline's merging_gain on parameter dicts gives the same number
    params = [{"model/w": t[:3].copy(), "model/b": t[3:].copy()} for t in thetas]
    gain = dg.merging_gain(lambda q: loss(np.concatenate([q["model/w"], q["model/b"]])), params, weights)
    assert gain == pytest.approx(terms["rhs"], rel=1e-6)


def test_merging_gain_is_zero_for_identical_branches():
    params = {"w": jnp.arange(4.0)}
    loss = lambda q: jnp.sum(q["w"] ** 2)  # noqa: E731
    assert dg.merging_gain(loss, [params, params, params], [1, 2, 3]) == pytest.approx(0.0, abs=1e-6)


def _mlp_loss(params):
    x = jnp.linspace(-1.0, 1.0, 12).reshape(6, 2)
    h = jnp.tanh(x @ params["l1/kernel"].astype(jnp.float32) + params["l1/bias"].astype(jnp.float32))
    return jnp.mean((h @ params["l2/kernel"].astype(jnp.float32) - 0.5) ** 2)


def _mlp(seed, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {"l1/kernel": jax.random.normal(k1, (2, 5)).astype(dtype),
            "l1/bias": jax.random.normal(k2, (5,)).astype(dtype),
            "l2/kernel": jax.random.normal(k3, (5, 1)).astype(dtype)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_barrier_of_identical_checkpoints_is_zero(dtype):
    params = _mlp(0, dtype)
    copy = jax.tree_util.tree_map(jnp.array, params)
    barrier, losses = dg.lmc_barrier(jax.jit(_mlp_loss), params, copy, alphas=7)
    assert barrier == 0.0 and len(losses) == 7
    out = dg.lmc_curve(jax.jit(_mlp_loss), params, copy, alphas=7)
    assert out["alphas"][0] == 0.0 and out["alphas"][-1] == 1.0
    assert max(abs(e) for e in out["excess"]) == 0.0


def test_barrier_detects_a_ridge_and_is_zero_in_a_convex_basin():
    double_well = lambda q: (q["x"][0] ** 2 - 1.0) ** 2  # noqa: E731  minima at ±1, ridge of height 1 at 0
    a, b = {"x": jnp.array([1.0])}, {"x": jnp.array([-1.0])}
    barrier, losses = dg.lmc_barrier(double_well, a, b, alphas=[0, 0.25, 0.5, 1])
    assert barrier == pytest.approx(1.0) and losses[2] == pytest.approx(1.0)
    assert dg.lmc_curve(double_well, a, b, alphas=[0, 0.5, 1])["chord"][1] == pytest.approx(0.0)

    bowl = lambda q: jnp.sum(q["x"] ** 2)  # noqa: E731
    out = dg.lmc_curve(bowl, {"x": jnp.array([1.0, 2.0])}, {"x": jnp.array([-3.0, 0.5])}, alphas=5)
    assert out["barrier"] == 0.0 and min(out["excess"]) < 0
    assert dg.lmc_barrier(bowl, {"x": jnp.array([1.0, 2.0])}, {"x": jnp.array([-3.0, 0.5])})[0] == 0.0
    # the curve itself: L(θ_b + α(θ_a − θ_b)) at α = 0.25
    point = np.array([-3.0, 0.5]) + 0.25 * (np.array([1.0, 2.0]) - np.array([-3.0, 0.5]))
    assert out["losses"][1] == pytest.approx(np.sum(point ** 2), rel=1e-6)


def test_interpolate_and_displacement():
    a, b = _mlp(1, jnp.bfloat16), _mlp(2, jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(dg.interpolate(a, b, 0.3)))
    for name in a:
        np.testing.assert_array_equal(dg.interpolate(a, b, 0.0)[name], b[name])
    theta0 = {"w": np.zeros((2, 2), np.float32), "nested": {"b": np.ones(3, np.float32)}}
    theta = {"w": np.full((2, 2), 3.0, np.float32), "nested": {"b": np.array([1.0, 5.0, 1.0], np.float32)}}
    total, per_tensor = dg.displacement(theta, theta0)
    assert per_tensor == {"nested/b": pytest.approx(4.0), "w": pytest.approx(6.0)}
    assert total == pytest.approx(np.hypot(4.0, 6.0))
    assert dg.global_norm(theta0) == pytest.approx(np.sqrt(3.0))
    assert dg.displacement(theta, theta)[0] == 0.0


def test_relative_noise_scales_with_each_weight():
    x = jnp.concatenate([jnp.zeros(10), jnp.linspace(0.5, 3.0, 20000)])
    params = {"w": x, "h": jnp.ones((4, 4), jnp.bfloat16)}
    noisy = dg.add_relative_noise(params, 0.05, jax.random.key(0))
    assert noisy["h"].dtype == jnp.bfloat16 and noisy["w"].shape == x.shape
    np.testing.assert_array_equal(noisy["w"][:10], 0.0)  # |θ| = 0: no noise
    eps = np.asarray((noisy["w"][10:] - x[10:]) / (0.05 * x[10:]))
    assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1.0) < 0.03
    again = dg.add_relative_noise(params, 0.05, jax.random.key(0))
    other = dg.add_relative_noise(params, 0.05, jax.random.key(1))
    np.testing.assert_array_equal(noisy["w"], again["w"])
    assert not np.array_equal(noisy["w"], other["w"])
    np.testing.assert_array_equal(dg.add_relative_noise(params, 0.0, jax.random.key(0))["w"], x)

    robust = dg.noise_robustness(jax.jit(_mlp_loss), _mlp(3), [0.0, 0.1], draws=2, key=jax.random.key(2))
    assert robust["by_sigma"][0.0]["losses"] == pytest.approx([robust["clean"]] * 2)
    assert len(robust["by_sigma"][0.1]["losses"]) == 2 and robust["by_sigma"][0.1]["std"] > 0
