"""The Bayes (posterior-mean) baselines: each checked against an independent computation, and never beaten."""

import math

import pytest
import torch

from iclbench.registry import get_registry
from iclbench.task import BAYES_KINDS

REG = get_registry()
BUILT_IN = ["affine", "linreg", "sparse-linreg", "relu-nn", "affine-vec", "linrec", "quadratic", "logistic",
            "poly", "decision-tree"]
SLOW = {"relu_net_gd"}  # fits a network per query; compared on its own in test_tasks_regression


def errors(task, fn, batch):
    """Per-sequence, per-position normalized squared error [B, T]."""
    return ((fn(batch).double() - batch.targets.double()) ** 2).mean(-1) / task.normalizer().double()


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_builtin_task_has_a_labelled_bayes_baseline(name):
    task = REG.task(name)()
    bayes = task.baselines()["bayes"]
    assert bayes.bayes in BAYES_KINDS and bayes.__doc__


@pytest.mark.parametrize("name,options", [(n, {}) for n in BUILT_IN if n != "decision-tree"]
                         + [("affine", {"noise": 0.1}), ("sparse-linreg", {"noise": 0.5})]
                         # ~15 s each (three greedy trees and the exact posterior on 1024 sequences)
                         + [pytest.param("decision-tree", o, marks=pytest.mark.slow) for o in ({}, {"noise": 0.5})])
def test_no_baseline_beats_bayes(name, options):
    """At every scored position, no competitor's mean error is below Bayes' by more than 3 paired s.e."""
    task = REG.task(name)().with_options(**options)
    batch = task.sample(1024, torch.Generator().manual_seed(5))
    ref = errors(task, task.baselines()["bayes"], batch)
    for other, fn in task.baselines().items():
        if other == "bayes" or other.startswith("oracle") or other in SLOW:
            continue
        diff = errors(task, fn, batch) - ref  # [B, T]
        se = diff.std(0) / math.sqrt(len(batch))
        beaten = (diff.mean(0) < -3 * se - 1e-4) & batch.mask
        assert not beaten.any(), (other, torch.nonzero(beaten).flatten().tolist())


def test_affine_known_answers():
    """t = 0: the Bayes error is the prior variance (normalized 1); t = 1: matches a brute-force integral
    over a (20001-point grid, b = y1 - a y0 uniform); t >= 2: 0."""
    task = REG.task("affine")()
    batch = task.sample(4096, torch.Generator().manual_seed(1))
    err = errors(task, task.baselines()["bayes"], batch).mean(0)
    assert abs(err[0] - 1) < 0.05 and err[2:].max() < 1e-8
    y = batch.inputs[:256, :, 0].double()
    a = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    inside = ((y[:, 1:2] - a * y[:, 0:1]).abs() <= task.options.b_max).double()  # p(b) * p(a) up to a constant
    mean_a = (inside * a).sum(1) / inside.sum(1)
    brute = y[:, 1] + mean_a * (y[:, 1] - y[:, 0])
    assert torch.allclose(task.baselines()["bayes"](batch.slice(slice(0, 256)))[:, 1, 0].double(), brute, atol=2e-3)
    assert 0.15 < err[1] < 0.21  # the "about 0.18"


@pytest.mark.slow
def test_affine_noisy_quadrature_matches_importance_sampling():
    task = REG.task("affine")().with_options(noise=0.3)
    batch = task.sample(24, torch.Generator().manual_seed(2))
    pred = task.baselines()["bayes"](batch)[..., 0].double()
    prior = task.with_options(noise=0.0).sample(1 << 19, torch.Generator().manual_seed(3)).latents["x"].double()
    y = batch.inputs[..., 0].double()
    for t in (1, 4):
        loglik = -((y[:, None, :t + 1] - prior[None, :, :t + 1]) ** 2).sum(-1) / (2 * 0.3 ** 2)
        w = torch.softmax(loglik, -1)
        assert (1 / (w ** 2).sum(-1)).min() > 200  # enough effective draws for the comparison
        is_mean = w @ prior[:, t + 1]
        assert torch.allclose(pred[:, t], is_mean, atol=0.02), t


def test_linreg_known_answer():
    """Noise-free, isotropic: after k < d examples the normalized Bayes error is (d - k) / d."""
    task = REG.task("linreg")()
    batch = task.sample(8192, torch.Generator().manual_seed(1))
    err = errors(task, task.baselines()["bayes"], batch).mean(0)
    d = task.options.d
    for k in (1, 2):
        assert abs(err[2 * k] - (d - k) / d) < 0.03
    assert err[2 * d:].max() < 1e-6


def test_sparse_linreg_mixture_matches_importance_sampling():
    task = REG.task("sparse-linreg")().with_options(noise=0.5)
    batch = task.sample(16, torch.Generator().manual_seed(2))
    pred = task.baselines()["bayes"](batch)[..., 0].double()
    w = task.draw(1 << 19, torch.Generator().manual_seed(3), "cpu")["w"].double()  # prior draws
    x, y = batch.latents["x"].double(), batch.inputs[:, 1::2, -1].double()
    for k in (1, 3):
        fit = torch.einsum("bnd,md->bmn", x[:, :k], w)
        weight = torch.softmax(-((fit - y[:, None, :k]) ** 2).sum(-1) / (2 * 0.5 ** 2), -1)
        is_mean = ((weight @ w) * x[:, k]).sum(-1)
        assert torch.allclose(pred[:, 2 * k], is_mean, atol=0.05), k
    # without noise three examples pin the support and w: error 0
    clean = REG.task("sparse-linreg")()
    err = errors(clean, clean.baselines()["bayes"], clean.sample(2048, torch.Generator().manual_seed(4)))
    assert err.mean(0)[6:].max() < 1e-4


def test_relu_nn_kernel_is_the_prior_covariance():
    """The GP's kernel equals the Monte-Carlo covariance of f over random networks at fixed inputs."""
    from tasks._bayes import arccos_relu_kernel

    task = REG.task("relu-nn")()
    x = torch.randn(1, 5, task.options.d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = task.draw(1 << 18, torch.Generator().manual_seed(1), "cpu")
    f = task.function({k: v.double() for k, v in params.items()}, x.expand(1 << 18, -1, -1))
    mc = f.T @ f / f.shape[0]
    exact = arccos_relu_kernel(x, 2 * task.options.w_scale ** 2 / task.options.d)[0]
    assert torch.allclose(mc, exact, atol=0.03 * exact.diagonal().max())


@pytest.mark.parametrize("name", ["affine-vec", "quadratic", "logistic", "poly", "linrec"])
def test_recurrences_exact_once_determined(name):
    """Noise-free recurrences: Bayes error 0 from the position where the rule is determined."""
    task = REG.task(name)()
    err = errors(task, task.baselines()["bayes"], task.sample(1024, torch.Generator().manual_seed(1))).mean(0)
    start = {"affine-vec": task.options.d + 1 if name == "affine-vec" else 0, "quadratic": 3, "logistic": 1,
             "poly": 3, "linrec": 4}[name]
    assert err[start:].max() < 1e-6
