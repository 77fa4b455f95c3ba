"""affine-vec, linrec, quadratic, logistic, poly: bounded samplers with their documented distributions, and
baselines checked against the oracle and numpy."""

import numpy as np
import pytest
import torch

from iclbench.registry import get_registry
from iclbench.task import Task
from iclbench.tasks.recurrences import (AffineVecOptions, AffineVecTask, LinRecOptions, LinRecTask,
                                        LogisticOptions, LogisticTask, PolyOptions, PolyTask, QuadraticOptions,
                                        QuadraticTask, maps_into_unit_interval)

REG = get_registry()


def sample(task, n=4096, seed=0):
    return task.sample(n, torch.Generator().manual_seed(seed))


def errors(task, batch):
    """Normalized error per baseline and position, scored positions only."""
    norm = task.normalizer()
    return {name: (((fn(batch) - batch.targets) ** 2).mean(-1) / norm)[:, batch.mask].mean(0)
            for name, fn in task.baselines().items()}


def test_affine_vec_sampler_norm_and_bound():
    o = AffineVecOptions(d=3, rho_low=0.5, rho_high=0.9, b_max=0.5, x0_max=2.0)
    batch = sample(AffineVecTask(o), 5000)
    A, b, x = batch.latents["A"], batch.latents["b"], batch.latents["x"]
    norms = torch.linalg.matrix_norm(A, ord=2)
    assert norms.min() >= 0.5 - 1e-5 and norms.max() <= 0.9 + 1e-5
    assert torch.linalg.eigvals(A).abs().max() < 0.9 + 1e-4  # spectral radius below the norm
    assert b.abs().max() <= 0.5 and x[:, 0].abs().max() <= 2.0
    t = torch.arange(o.context_len + 1)
    assert torch.all(x.norm(dim=-1) <= x[:, :1].norm(dim=-1) + t * b.norm(dim=-1, keepdim=True) + 1e-4)
    assert batch.inputs.shape == (5000, 16, 3) and torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])


def test_linrec_sampler_coefficients_and_bound():
    o = LinRecOptions(order=3, rho_low=0.2, rho_high=0.7)
    batch = sample(LinRecTask(o), 5000)
    a, c, x = batch.latents["a"], batch.latents["c"], batch.latents["x"]
    l1 = a.abs().sum(-1)
    assert l1.min() >= 0.2 - 1e-5 and l1.max() <= 0.7 + 1e-5 and c.abs().max() <= o.c_max
    assert torch.allclose(x[:, 3], (a * x[:, :3].flip(-1)).sum(-1) + c, atol=1e-6)
    assert torch.all(x.abs() <= o.x0_max + torch.arange(o.context_len + 1) * o.c_max + 1e-5)
    assert batch.mask.tolist() == [False, False] + [True] * 14  # the first two targets are initial values


def test_quadratic_sampler_maps_unit_interval_into_itself():
    batch = sample(QuadraticTask(), 5000)
    a, b, c, x = (batch.latents[k] for k in "abcx")
    assert maps_into_unit_interval(a, b, c).all() and x.abs().max() <= 1 + 1e-6
    assert torch.stack([a, b, c]).abs().max() <= 2.0 and a.abs().max() > 1.5  # beyond the l1 ball
    grid = torch.linspace(-1, 1, 201)
    bad = torch.tensor([[-2.0, 0.0, 1.0], [1.0, 1.0, 0.5]])  # 1 - 2x^2 stays in [-1, 1]; x^2 + x + .5 does not
    inside = ((bad[:, :1] * grid + bad[:, 1:2]) * grid + bad[:, 2:]).abs().max(-1).values <= 1
    assert maps_into_unit_interval(*bad.T).tolist() == inside.tolist() == [True, False]


def test_logistic_sampler_range():
    batch = sample(LogisticTask(LogisticOptions(r_low=3.0, r_high=3.9)), 5000)
    r, x = batch.latents["r"], batch.latents["x"]
    assert r.min() >= 3.0 and r.max() <= 3.9 and x.min() >= 0 and x.max() <= 1
    assert abs(float(r.mean()) - 3.45) < 0.02


def test_poly_sampler_closed_form_normalizer_and_bound():
    task = PolyTask(PolyOptions(degree=2, coef_max=0.5, noise=0.1))
    batch = sample(task, 5000)
    s = (torch.arange(17) - 8) / 4
    assert torch.all(batch.latents["x"].abs() <= 0.5 * (1 + s.abs() + s ** 2) + 1e-5)
    assert torch.allclose(task.normalizer(), Task.normalizer(task), rtol=0.03)


@pytest.mark.parametrize("name,exact_from", [("affine-vec", 3), ("linrec", 4), ("quadratic", 3),
                                             ("logistic", 2), ("poly", 3)])
def test_least_squares_exact_and_oracle_zero_without_noise(name, exact_from):
    task = REG.task(name)()
    err = errors(task, sample(task, 2000))
    first = int(torch.nonzero(sample(task, 1).mask)[0])
    assert err["oracle"].max() < 1e-8
    assert err["least_squares"][exact_from - first:].max() < 1e-6, err["least_squares"]
    assert err["copy_last"][exact_from - first:].mean() > 0.05  # the task is not solved by copying


@pytest.mark.parametrize("name", ["affine-vec", "linrec", "quadratic", "logistic", "poly"])
def test_oracle_error_is_the_noise_floor(name):
    task = REG.task(name)().with_options(noise=0.1)
    batch = sample(task, 8000)
    mse = ((task.baselines()["oracle"](batch) - batch.targets) ** 2)[:, batch.mask].mean()
    assert float(mse) == pytest.approx(0.01, rel=0.05)


def test_linear_method_misses_the_nonlinear_rules():
    for name in ("quadratic", "logistic", "poly"):
        err = errors(REG.task(name)(), sample(REG.task(name)(), 2000))
        assert err["affine_least_squares"][3:].mean() > 0.02, name  # while least squares is exact


def test_linrec_least_squares_matches_numpy_with_noise():
    task = LinRecTask(LinRecOptions(order=2, context_len=10, noise=0.1))
    batch = sample(task, 8)
    pred = task.baselines()["least_squares"](batch)[..., 0].double().numpy()
    y = batch.inputs[..., 0].double().numpy()
    for i in range(8):
        for t in range(1, 10):
            # transitions s = 1..t-1 follow the rule: y_{s+1} ~ a1 y_s + a2 y_{s-1} + c
            X = np.array([[y[i, s], y[i, s - 1], 1.0] for s in range(1, t)]).reshape(-1, 3)
            coef = np.linalg.lstsq(X, y[i, 2:t + 1], rcond=None)[0] if t > 1 else np.zeros(3)
            assert pred[i, t] == pytest.approx(coef @ [y[i, t], y[i, t - 1], 1.0], abs=1e-4)


@pytest.mark.parametrize("name", ["quadratic", "logistic", "poly", "affine-vec", "linrec"])
def test_scaled_variants_stay_in_the_family(name):
    """Least squares on the matching features stays exact when the values are scaled (an OOD shift)."""
    variants = REG.task(name)().ood_variants()
    assert {"scale_x0.5", "scale_x2", "scale_x3", "context_x2"} <= set(variants)
    task = variants["scale_x3"]
    err = errors(task, sample(task, 500))
    assert err["least_squares"][4:].max() < 1e-6 and err["oracle"].max() < 1e-8


def test_parameter_shifts_leave_the_training_range():
    affine_vec = REG.task("affine-vec")().ood_variants()["rho_in_(1,1.1]"]
    norms = torch.linalg.matrix_norm(sample(affine_vec, 500).latents["A"], ord=2)
    assert norms.min() >= 1.0 - 1e-5 and norms.max() <= 1.1 + 1e-5
    r = sample(REG.task("logistic")().ood_variants()["r_in_[1,2.5]"], 500).latents["r"]
    assert r.max() <= 2.5
    assert REG.task("poly")().ood_variants()["degree_+1"].options.degree == 4
    affine = REG.task("affine")().ood_variants()["a_in_(1,1.1]"]
    a = sample(affine, 500).latents["a"].abs()
    assert a.min() >= 1.0 and a.max() <= 1.1
