import numpy as np
import pytest
import torch

from iclbench.task import Task
from iclbench.tasks.affine import AffineOptions, AffineTask
from iclbench.step import normalized_error


def sample(task, n=4096, seed=0):
    return task.sample(n, torch.Generator().manual_seed(seed))


def test_sampler_follows_documented_distribution_and_stays_bounded():
    o = AffineOptions(context_len=12, a_low=0.2, a_high=0.8, b_max=0.5, x0_max=2.0)
    batch = sample(AffineTask(o), 20000)
    a, b, x = batch.latents["a"], batch.latents["b"], batch.latents["x"]
    assert a.abs().min() >= 0.2 and a.abs().max() <= 0.8
    assert abs(float((a > 0).float().mean()) - 0.5) < 0.02  # random sign
    assert b.abs().max() <= 0.5 and x[:, 0].abs().max() <= 2.0
    assert abs(float(b.var()) - 0.5 ** 2 / 3) < 0.005  # uniform on [-0.5, 0.5]
    assert torch.allclose(x[:, 1:], a[:, None] * x[:, :-1] + b[:, None], atol=1e-5)
    assert x.abs().max() <= o.x0_max + o.context_len * o.b_max
    assert batch.inputs.shape == (20000, 12, 1) and batch.targets.shape == (20000, 12, 1)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])


@pytest.mark.parametrize("opts", [{}, {"noise": 0.3}, {"a_low": 1.0, "a_high": 1.1, "b_max": 1.0}])
def test_closed_form_normalizer_matches_monte_carlo(opts):
    task = AffineTask(AffineOptions(**opts))
    closed = task.normalizer()
    mc = Task.normalizer(task)  # the generic Monte-Carlo estimate
    assert torch.allclose(closed, mc, rtol=0.03)


def test_predicting_the_prior_mean_scores_one():
    task = AffineTask()
    batch = sample(task, 50000, seed=3)
    err = normalized_error(torch.zeros_like(batch.targets), batch, task.normalizer())
    assert torch.allclose(err.mean(0), torch.ones(task.context_len), atol=0.05)


def test_least_squares_exact_from_two_transitions_and_oracle_zero():
    task = AffineTask()
    batch = sample(task)
    base = task.baselines()
    err = (base["least_squares"](batch) - batch.targets).abs()[..., 0]
    assert err[:, 2:].max() < 1e-3
    assert err[:, :2].mean() > 1e-2  # cannot be exact before two transitions
    assert (base["oracle"](batch) - batch.targets).abs().max() < 1e-5


def test_least_squares_matches_numpy_lstsq_with_noise():
    task = AffineTask(AffineOptions(context_len=10, noise=0.2))
    batch = sample(task, 16)
    pred = task.baselines()["least_squares"](batch)[..., 0].numpy()
    y = batch.inputs[..., 0].double().numpy()
    for i in range(16):
        for t in range(10):
            X = np.stack([y[i, :t], np.ones(t)], 1)
            coef = np.linalg.lstsq(X, y[i, 1:t + 1], rcond=None)[0] if t else np.zeros(2)
            assert pred[i, t] == pytest.approx(coef[0] * y[i, t] + coef[1], abs=1e-4)


def test_oracle_error_is_the_noise_floor():
    task = AffineTask(AffineOptions(noise=0.1))
    batch = sample(task, 20000)
    mse = (task.baselines()["oracle"](batch) - batch.targets).pow(2).mean()
    # oracle knows the clean state x_t; y_{t+1} = x_{t+1} + noise, so mse = noise^2
    assert float(mse) == pytest.approx(0.01, rel=0.05)


def test_copy_last_and_context_mean_closed_forms():
    task = AffineTask()
    batch = sample(task, 64)
    base = task.baselines()
    y = batch.inputs
    assert torch.equal(base["copy_last"](batch), y)
    expect = torch.stack([y[:, : t + 1].mean(1) for t in range(y.shape[1])], 1)
    assert torch.allclose(base["context_mean"](batch), expect, atol=1e-6)


def test_bad_options_are_rejected():
    from iclbench.errors import ICLBenchError
    from iclbench.options import build_options

    with pytest.raises(ICLBenchError, match="a_low"):
        build_options(AffineOptions, {"a_low": 2.0}, "task")
    with pytest.raises(ICLBenchError, match="context_len"):
        build_options(AffineOptions, {"context_len": 1}, "task")


def test_closed_form_unroll_agrees_with_the_stepped_recurrence():
    """The accelerator's closed form matches the CPU's stepped recurrence to float32 rounding, including
    |a| > 1 (the OOD variant); the CPU default stays the stepped one (reference numbers)."""
    from iclbench.tasks.affine import unroll_affine

    gen = torch.Generator().manual_seed(0)
    n, T = 512, 32
    a = (torch.rand(n, generator=gen) * 1.1) * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
    b, x0 = torch.rand(n, generator=gen) - 0.5, torch.rand(n, generator=gen) * 2 - 1
    stepped = unroll_affine(x0, a, b, T)
    assert torch.equal(stepped, unroll_affine(x0, a, b, T, closed_form=False))
    assert torch.allclose(unroll_affine(x0, a, b, T, closed_form=True), stepped, rtol=1e-5, atol=1e-5)
