"""linreg, sparse-linreg, relu-nn: samplers, closed-form normalizers and baselines against known answers."""

import numpy as np
import pytest
import torch

from iclbench.task import Task
from iclbench.tasks.regression import (LinearRegression, LinRegOptions, ReluNetworkRegression, ReluNNOptions,
                                       SparseLinearRegression, SparseLinRegOptions, examples, nearest_neighbours)


def sample(task, n, seed=0):
    return task.sample(n, torch.Generator().manual_seed(seed))


def query_error(task, batch, name):
    """Mean normalized error at each query (k = 0, 1, ... examples seen)."""
    pred = task.baselines()[name](batch)
    return ((pred - batch.targets) ** 2)[..., 0][:, batch.mask].mean(0) / task.normalizer()[batch.mask]


def test_prompt_interleaves_x_and_y_tokens():
    task = LinearRegression(LinRegOptions(d=3, n_points=5))
    batch = sample(task, 7)
    w, x = batch.latents["w"], batch.latents["x"]
    y = (x * w[:, None]).sum(-1)
    assert batch.inputs.shape == (7, 10, 4) and task.d_in == 4 and task.context_len == 10
    assert torch.equal(batch.inputs[:, 0::2, :3], x) and torch.all(batch.inputs[:, 0::2, 3] == 0)
    assert torch.all(batch.inputs[:, 1::2, :3] == 0) and torch.allclose(batch.inputs[:, 1::2, 3], y)
    assert torch.allclose(batch.targets[:, 0::2, 0], y) and batch.mask.tolist() == [True, False] * 5


def test_sampler_distributions():
    o = LinRegOptions(d=5, n_points=6, w_scale=2.0, x_scale=0.5)
    batch = sample(LinearRegression(o), 20000)
    assert float(batch.latents["w"].var()) == pytest.approx(4.0, rel=0.03)
    assert float(batch.latents["x"].var()) == pytest.approx(0.25, rel=0.03)
    assert abs(float(batch.latents["w"].mean())) < 0.03
    sparse = sample(SparseLinearRegression(SparseLinRegOptions(d=8, nonzero=3)), 5000).latents["w"]
    assert torch.all((sparse != 0).sum(-1) == 3)
    assert float((sparse != 0).float().mean(0).min()) > 0.3  # support spread over every coordinate


@pytest.mark.parametrize("task", [
    LinearRegression(LinRegOptions(d=3, noise=0.5, x_scale=2.0)),
    SparseLinearRegression(SparseLinRegOptions(d=6, nonzero=2, w_scale=0.5)),
    ReluNetworkRegression(ReluNNOptions(d=3, hidden=5, x_scale=1.5, noise=0.2)),
])
def test_closed_form_normalizer_matches_monte_carlo(task):
    scored = sample(task, 8).mask
    closed, mc = task.normalizer()[scored], Task.normalizer(task)[scored]
    assert torch.allclose(closed, mc, rtol=0.04)


@pytest.mark.parametrize("d", [4, 8])
def test_least_squares_error_is_one_minus_k_over_d(d):
    """Noise-free, isotropic x and w: minimum-norm least squares leaves E err = max(0, 1 - k/d)."""
    task = LinearRegression(LinRegOptions(d=d, n_points=d + 3))
    err = query_error(task, sample(task, 20000), "least_squares")
    expect = torch.clamp(1 - torch.arange(d + 3) / d, min=0)
    assert torch.allclose(err, expect, atol=0.03), err


def test_averaging_error_is_d_plus_one_over_k():
    """w_hat = S w with S the sample covariance of k Gaussian x: E |w - S w|^2 / d = (d + 1) / k."""
    task = LinearRegression(LinRegOptions(d=4, n_points=9))
    err = query_error(task, sample(task, 40000), "averaging")
    expect = 5 / torch.arange(1, 9)
    assert torch.allclose(err[2:], expect[1:], rtol=0.05), err
    assert float(err[1]) == pytest.approx(5.0, rel=0.12)  # k = 1: heavy tails (8th moments of x)


def test_oracle_is_exact_or_the_noise_floor_and_zero_scores_one():
    task = LinearRegression()
    batch = sample(task, 20000)
    assert query_error(task, batch, "oracle").max() < 1e-10
    assert torch.allclose(query_error(task, batch, "zero"), torch.ones(task.options.n_points), atol=0.05)
    noisy = LinearRegression(LinRegOptions(d=4, noise=1.0))
    floor = 1.0 / (4 + 1.0)  # noise^2 / (d + noise^2)
    assert torch.allclose(query_error(noisy, sample(noisy, 20000), "oracle"), torch.full((12,), floor), rtol=0.06)


def test_ridge_is_the_posterior_mean_and_beats_least_squares():
    task = LinearRegression(LinRegOptions(d=4, n_points=8, noise=0.5))
    batch = sample(task, 20000)
    assert "ridge" not in LinearRegression().baselines()  # only when noisy
    ridge, ls = query_error(task, batch, "ridge"), query_error(task, batch, "least_squares")
    assert torch.all(ridge[1:] <= ls[1:] + 1e-3) and float((ls - ridge)[4]) > 0.1  # LS peaks at k = d
    pred = task.baselines()["ridge"](batch)[:3, 0::2, 0]
    x, y = (t.double().numpy() for t in examples(batch.slice(slice(0, 3))))
    for b in range(3):
        for k in range(8):
            X, Y = x[b, :k], y[b, :k]
            w = np.linalg.solve(X.T @ X + 0.25 * np.eye(4), X.T @ Y)  # lambda = noise^2 / w_scale^2
            assert float(pred[b, k]) == pytest.approx(float(w @ x[b, k]), abs=1e-4)


def test_nearest_neighbours_matches_a_loop():
    x, y = torch.randn(3, 7, 2), torch.randn(3, 7)
    pred = nearest_neighbours(x, y, k=3)
    for b in range(3):
        assert pred[b, 0] == 0
        for i in range(1, 7):
            near = torch.argsort((x[b, :i] - x[b, i]).norm(dim=-1))[:3]
            assert float(pred[b, i]) == pytest.approx(float(y[b, near].mean()), abs=1e-6)


def test_lasso_recovers_sparse_w_where_least_squares_cannot():
    task = SparseLinearRegression(SparseLinRegOptions(d=8, nonzero=2, n_points=10))
    batch = sample(task, 2000)
    lasso, ls = query_error(task, batch, "lasso"), query_error(task, batch, "least_squares")
    assert lasso[7:].max() < 0.02  # k >= 7 examples of a 2-sparse w in 8 dimensions: recovered
    assert torch.all(lasso[3:8] < ls[3:8]) and torch.all(lasso[4:7] < ls[4:7] - 0.1)  # sparsity helps
    # minimum-norm least squares ignores sparsity: still 1 - k/d while under-determined
    assert torch.allclose(ls[:8], 1 - torch.arange(8) / 8, atol=0.05) and ls[8:].max() < 1e-6


def test_relu_network_fit_learns_from_the_context():
    task = ReluNetworkRegression(ReluNNOptions(d=2, hidden=4, n_points=12))
    batch = sample(task, 200)
    err = query_error(task, batch, "relu_net_gd")
    assert err[0] == pytest.approx(float(query_error(task, batch, "zero")[0]))  # no example: prior mean 0
    assert err[8:].mean() < 0.35, err
