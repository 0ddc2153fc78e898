"""Hessian–PCA alignment (merit_jax.alignment): the parameter-space conflict directions are the combinations of
task gradients that the split's axes weigh, and their alignment with the top Hessian eigenvector span is
measured against random directions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from merit_jax import alignment as A
from merit_jax import gradients as X
from merit_jax import partition as S
from merit_jax.data.packing import pad_batch
from merit_jax.data.tokenize import Example
from merit_jax.models import params as P
from merit_jax.io.load import load_model
from tests.hf_models import tiny_qwen2

FAST = {"xla_backend_optimization_level": 0}


def examples(task: int, n: int, vocab: int) -> list[Example]:
    rng = np.random.default_rng(task)
    out = []
    for _ in range(n):
        length = int(rng.integers(8, 14))
        ids = rng.integers(1, vocab, size=length).astype(np.int32)
        mask = np.zeros(length, bool)
        mask[length // 2:] = True
        out.append(Example(f"t{task}", ids, mask, length // 2, ""))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tiny_qwen2(path, num_hidden_layers=12, hidden_size=16, intermediate_size=24, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=64)
    model = load_model(path)
    names = X.select_params(list(P.flatten(model)))
    tasks = [examples(t, 5 + t, 64) for t in range(4)]
    return model, names, tasks


@pytest.mark.parametrize("per_example", ["mean", "unit"])
def test_conflict_directions_are_the_weighted_task_gradients(setup, per_example):
    """d_l = Σ_j c_lj g_j, with g_j the per-example extraction's full task gradients (the per-example loop of
    tests/test_extract.py checks those), whatever the example weights."""
    model, names, tasks = setup
    ext = X.TaskExtractor(model, names, X.ExtractOptions(reduction="full", per_example=per_example,
                                                         keep_example_sketches=False, gradients="per_example"),
                          compiler_options=FAST)
    grads = np.stack([ext(pad_batch(t, X.seq_bucket(max(len(e) for e in t))), task="t").vector
                      for t in tasks]).astype(np.float64)
    coefficients = np.array([[1.0, -2.0, 0.5, 0.0], [0.3, 0.3, -1.0, 2.0]])
    streamed = [g for g, _ in A.task_gradients(model, names, tasks, per_example, micro_chunk=4)]
    directions = A.conflict_directions(streamed, coefficients)
    want = coefficients @ grads
    np.testing.assert_allclose(directions, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_axis_coefficients_reproduce_the_split_scores():
    """Scores on axis l = r̂_i · Σ_j c_lj r_j minus a constant: the directions are what the split ranks by."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(6, 40)) + np.repeat([[2.0], [-2.0]], 3, axis=0) * rng.normal(size=40)
    cos = S.cosine_matrix(rows)
    pca = S.pca_scores(cos, 2, center=True)
    c = A.axis_coefficients(pca.axes_tr, np.linalg.norm(rows, axis=1))
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    projections = unit @ (c @ rows).T  # [T, r]
    offsets = projections - pca.scores_tr
    np.testing.assert_allclose(offsets - offsets.mean(0), 0.0, atol=1e-5)


def test_alignment_is_one_inside_the_span_and_sqrt_k_over_p_at_random():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(4, 1000))
    inside = np.arange(1.0, 5.0) @ basis
    out_of_span = np.linalg.qr(np.vstack([basis, rng.normal(size=(1, 1000))]).T)[0][:, -1]
    mixed = inside / np.linalg.norm(inside) + out_of_span  # 45° from the span
    result = A.span_alignment(np.stack([inside, mixed]), basis, n_random=40, seed=1)
    assert result["axes"][0] == pytest.approx(1.0, abs=1e-9)
    assert result["axes"][1] == pytest.approx(1 / math.sqrt(2), abs=1e-9)
    assert result["expected_random"] == pytest.approx(math.sqrt(4 / 1000))
    assert abs(result["random_mean"] - result["expected_random"]) < 0.25 * result["expected_random"]


def test_the_whole_diagnostic_runs_and_beats_random(setup):
    model, names, tasks = setup
    axes = np.array([[0.5, 0.5, -0.5, -0.5], [0.5, -0.5, 0.5, -0.5]]).T
    out = A.hessian_alignment(model, names, tasks, "mean", axes, np.ones(4), k=4, hessian_examples=6)
    assert len(out["axes"]) == 2 and len(out["eigenvalues"]) == 4 and out["hessian_examples"] == 6
    assert out["eigenvalues"] == sorted(out["eigenvalues"], reverse=True)
    assert min(out["axes"]) > 5 * out["random_mean"], out


def test_round_robin_sample_spans_the_tasks_within_the_budget():
    tasks = [list(range(10 * t, 10 * t + n)) for t, n in enumerate([3, 1, 5])]
    assert A.sample_examples(tasks, 5) == [0, 10, 20, 1, 21]
    assert len(A.sample_examples(tasks, 100)) == 9 and len(A.sample_examples([[1]] * 190, 64)) == 64
