import torch

from iclbench.evaluate import bootstrap_weights, error_curves
from iclbench.task import Batch


def test_error_curves_known_answer_and_ci_covers_truth():
    torch.manual_seed(0)
    n, T = 4000, 5
    targets = torch.randn(n, T, 1)  # variance 1 at every position
    batch = Batch(torch.zeros(n, T, 1), targets, torch.ones(T, dtype=torch.bool))
    half = targets * (1 - 0.5 ** 0.5)  # residual = targets / sqrt(2) -> error 0.5
    res = error_curves({"zero": torch.zeros_like(targets), "half": half}, batch, torch.ones(T),
                       score_from=2, replicates=300)
    z, h = res["predictors"]["zero"], res["predictors"]["half"]
    assert res["positions"] == list(range(T))
    assert abs(z["mean"] - 1.0) < 0.05 and abs(h["mean"] - 0.5) < 0.03
    assert z["ci"][0] < 1.0 < z["ci"][1]
    assert all(lo <= m <= hi for lo, m, hi in zip(z["curve_lo"], z["curve"], z["curve_hi"]))
    assert h["mean"] == sum(h["curve"][2:]) / 3


def test_unscored_positions_are_left_out():
    targets = torch.ones(10, 4, 1)
    mask = torch.tensor([False, True, False, True])
    res = error_curves({"zero": torch.zeros_like(targets)}, Batch(targets, targets, mask), torch.ones(4), 0,
                       replicates=10)
    assert res["positions"] == [1, 3] and len(res["predictors"]["zero"]["curve"]) == 2


def test_bootstrap_weights_resample_every_sequence_count():
    w = bootstrap_weights(50, 20, seed=1)
    assert w.shape == (20, 50) and torch.all(w.sum(1) == 50)
