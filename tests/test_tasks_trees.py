"""decision-tree (Garg et al.'s fourth function class): sampler, closed-form normalizer, the greedy-tree and
Bayes baselines against independent computations, the optional scikit-learn baseline, a run end to end."""

import itertools
import json
import math

import pytest
import torch

from iclbench.contracts import baseline_problem
from iclbench.registry import get_registry
from iclbench.task import Task
from iclbench.tasks.regression import examples
from iclbench.tasks.trees import (DecisionTreeRegression, TreeOptions, evaluate_tree, greedy_tree, sign_lookup,
                                  sklearn_available, tree_posterior_mean)


def sample(task, n, seed=0):
    return task.sample(n, torch.Generator().manual_seed(seed))


def walk(coords, leaves, x):
    """One x through one tree, by hand."""
    node, internal = 0, len(coords)
    while node < internal:
        node = 2 * node + (2 if x[coords[node]] > 0 else 1)
    return leaves[node - internal]


def test_sampler_shapes_and_y_is_the_tree_of_x():
    task = DecisionTreeRegression(TreeOptions(d=5, n_points=7))
    batch = sample(task, 50)
    coords, leaves, x = batch.latents["coords"], batch.latents["leaves"], batch.latents["x"]
    assert batch.inputs.shape == (50, 14, 6) and task.d_in == 6 and task.context_len == 14
    assert coords.shape == (50, 15) and leaves.shape == (50, 16) and int(coords.max()) < 5
    assert torch.equal(batch.inputs[:, 0::2, :5], x) and torch.all(batch.inputs[:, 1::2, :5] == 0)
    y = batch.inputs[:, 1::2, 5]
    assert torch.equal(y, batch.targets[:, 0::2, 0]) and batch.mask.tolist() == [True, False] * 7
    by_hand = torch.tensor([[walk(coords[b].tolist(), leaves[b].tolist(), x[b, i].tolist()) for i in range(7)]
                            for b in range(50)])
    assert torch.equal(y, by_hand) and torch.equal(y, evaluate_tree(coords, leaves, x))
    # the tree reads only the signs of x
    assert torch.equal(evaluate_tree(coords, leaves, 3.7 * x), y)


@pytest.mark.parametrize("options", [{}, {"w_scale": 0.5, "noise": 0.3, "x_scale": 2.0, "depth": 2, "d": 3}])
def test_closed_form_normalizer_matches_monte_carlo(options):
    task = DecisionTreeRegression(TreeOptions(**options))
    scored = sample(task, 4).mask
    assert torch.allclose(task.normalizer()[scored], Task.normalizer(task)[scored], rtol=0.03)


def test_greedy_tree_fits_what_it_saw_and_never_peeks():
    """Grown until pure, the tree predicts a repeated training point's y exactly; depth-limited it predicts
    the mean of a leaf of the points it saw; neither reads a later pair."""
    task = DecisionTreeRegression(TreeOptions(d=4, n_points=16))
    x, y = examples(sample(task, 64))
    x, y = x.clone(), y.clone()
    x[:, 8:], y[:, 8:] = x[:, :8], y[:, :8]  # the second half repeats the first
    full = greedy_tree(x, y, max_depth=None)
    assert torch.allclose(full[:, 8:], y[:, :8], atol=1e-6)
    assert torch.all(full[:, 0] == 0) and torch.allclose(full[:, 1], y[:, 0])
    deep4 = greedy_tree(x, y, max_depth=4)
    assert (deep4[:, 8:] - y[:, :8]).abs().mean() < (y[:, :8]).abs().mean()
    for name in ("greedy_tree", "greedy_tree_full", "sign_lookup", "bayes", "nearest_neighbours"):
        assert baseline_problem(name, task.baselines()[name], sample(task, 8)) is None, name


@pytest.mark.skipif(not sklearn_available(), reason="scikit-learn not installed (pip install 'iclbench[trees]')")
def test_greedy_tree_is_sklearns_cart():
    """The same cuts as DecisionTreeRegressor except where cuts tie (scikit-learn breaks ties at random, we
    take the lowest coordinate): stumps and depth-2 trees on 6+ pairs with continuous y agree almost always;
    at depth 4 on the task, where small nodes tie often, the errors agree within their paired noise."""
    from sklearn.tree import DecisionTreeRegressor

    def theirs(x, y, depth, start):
        out = torch.zeros(y.shape, dtype=torch.float64)
        for b in range(len(x)):
            for i in range(start, x.shape[1]):
                fit = DecisionTreeRegressor(max_depth=depth, random_state=0).fit(x[b, :i].double(), y[b, :i].double())
                out[b, i] = float(fit.predict(x[b, i:i + 1].double())[0])
        return out

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 14, 4, generator=gen), torch.randn(30, 14, generator=gen)
    for depth, agree in ((1, 0.97), (2, 0.9)):
        same = (greedy_tree(x, y, max_depth=depth).double() - theirs(x, y, depth, 6))[:, 6:].abs() < 1e-5
        assert same.float().mean() > agree, depth
    task = DecisionTreeRegression(TreeOptions(d=4, n_points=12))
    x, y = examples(sample(task, 60, seed=3))
    diff = ((greedy_tree(x, y).double() - y) ** 2 - (theirs(x, y, 4, 1) - y) ** 2)[:, 2:].flatten()
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(len(diff)) + 1e-9


def brute_force_noise_free(x, y, d, depth):
    """Posterior mean by enumerating every structure (uniform prior); a structure is kept iff its leaves
    split the examples exactly as their y values do (equal y ⇔ same leaf). ``x [N, d]``, ``y [N]``."""
    internal = 2 ** depth - 1
    structures = torch.tensor(list(itertools.product(range(d), repeat=internal)))  # [S, internal]
    ids = torch.arange(2 ** depth, dtype=torch.float64).expand(len(structures), -1)
    leaf = evaluate_tree(structures, ids, x[None].expand(len(structures), -1, -1)).long()  # [S, N]
    N = len(y)
    out = torch.zeros(N, dtype=torch.float64)
    equal_y = y[:, None] == y[None, :]
    for i in range(1, N):
        same = leaf[:, :i, None] == leaf[:, None, :i]
        kept = (same == equal_y[:i, :i]).all(-1).all(-1)
        hit = leaf[kept, :i] == leaf[kept, i:i + 1]  # [S_kept, i]
        pred = torch.where(hit.any(-1), (hit * y[:i]).sum(-1) / hit.sum(-1).clamp_min(1), torch.zeros(1))
        out[i] = pred.double().mean()
    return out


@pytest.mark.parametrize("d,depth", [(2, 4), (3, 3)])
def test_bayes_is_the_enumerated_posterior_without_noise(d, depth):
    task = DecisionTreeRegression(TreeOptions(d=d, depth=depth, n_points=10))
    x, y = examples(sample(task, 6, seed=d))
    pred = tree_posterior_mean(x, y, depth).double()
    for b in range(6):
        assert torch.allclose(pred[b], brute_force_noise_free(x[b], y[b], d, depth), atol=1e-6), b


def test_bayes_matches_importance_sampling_with_noise():
    """Prior trees (structure and leaves) weighted by the Gaussian likelihood of the pairs seen."""
    task = DecisionTreeRegression(TreeOptions(d=3, depth=2, n_points=6, noise=0.5))
    batch = sample(task, 16, seed=1)
    x, y = examples(batch)
    pred = tree_posterior_mean(x, y, 2, noise=0.5).double()
    prior = task.draw(1 << 17, torch.Generator().manual_seed(2), "cpu")
    for b in range(16):
        f = evaluate_tree(prior["coords"], prior["leaves"], x[b][None].expand(1 << 17, -1, -1)).double()
        for i in (1, 3, 5):
            logw = -((f[:, :i] - y[b, :i].double()) ** 2).sum(-1) / (2 * 0.25)
            w = torch.softmax(logw, 0)
            ess = 1 / (w ** 2).sum()
            assert ess > 100  # enough effective draws
            mean = w @ f[:, i]
            sd = (w @ (f[:, i] - mean) ** 2).sqrt()  # the posterior's, so the estimate's is sd / sqrt(ess)
            assert abs(float(mean - pred[b, i])) < 4 * float(sd / ess.sqrt()) + 1e-3, (b, i)


def test_bayes_beats_every_baseline_and_lookup_is_exact_on_seen_cells():
    task = DecisionTreeRegression()
    batch = sample(task, 512, seed=4)
    norm = task.normalizer()[batch.mask]
    errs = {name: ((fn(batch) - batch.targets) ** 2)[..., 0][:, batch.mask].mean(0) / norm
            for name, fn in task.baselines().items() if name != "oracle"}
    for name, err in errs.items():
        assert err[1:].mean() >= errs["bayes"][1:].mean() - 1e-6, name
    assert errs["bayes"][0] == pytest.approx(1.0, abs=0.15) and errs["bayes"][-1] < 0.2
    x, y = examples(batch)
    seen = (torch.stack([(x[:, :, None] > 0) == (x[:, None] > 0)]).all(-1)[0]
            & torch.ones(24, 24, dtype=torch.bool).tril(-1))
    hit = seen.any(-1)
    assert torch.allclose(sign_lookup(x, y)[hit], y[hit]) and hit.float().mean() > 0.4


def test_rule_and_shifts():
    task = DecisionTreeRegression()
    assert task.rule_latents == () and task.rule_features(sample(task, 2)) is None
    shifts = task.ood_variants()
    assert {"scale_x2", "context_x2", "w_scale_x2"} <= set(shifts) and shifts["context_x2"].options.n_points == 48
    assert any(k.startswith("noise_") and v.options.noise > 0 for k, v in shifts.items())
    assert get_registry().task("decision-tree") is DecisionTreeRegression


def test_sklearn_boosting_is_optional(monkeypatch, capsys):
    """Registered only when asked for (it fits per sequence and prefix) and scikit-learn imports; asked for
    without it, one line says so."""
    import iclbench.tasks.trees as trees

    assert "gradient_boosting" not in DecisionTreeRegression().baselines()
    monkeypatch.setattr(trees, "sklearn_available", lambda: False)
    monkeypatch.setattr(trees, "_NOTED", [])
    assert "gradient_boosting" not in DecisionTreeRegression(TreeOptions(sklearn=True)).baselines()
    DecisionTreeRegression(TreeOptions(sklearn=True)).baselines()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'iclbench[trees]'" in err
    monkeypatch.undo()
    if not sklearn_available():
        pytest.skip("scikit-learn not installed (pip install 'iclbench[trees]')")
    task = DecisionTreeRegression(TreeOptions(d=3, n_points=3, sklearn=True))  # one fit per sequence and call
    fn = task.baselines()["gradient_boosting"]
    batch = sample(task, 2)
    pred = fn(batch)
    assert pred.shape == batch.targets.shape and torch.isfinite(pred).all()
    assert baseline_problem("gradient_boosting", fn, batch) is None


def test_sklearn_boosting_is_one_fit_per_prefix_whatever_the_processes():
    """Against GradientBoostingRegressor fitted by hand on each prefix; one process or two give the same."""
    if not sklearn_available():
        pytest.skip("scikit-learn not installed (pip install 'iclbench[trees]')")
    from sklearn.ensemble import GradientBoostingRegressor

    from iclbench.tasks.trees import sklearn_boosting

    x, y = examples(sample(DecisionTreeRegression(TreeOptions(d=3, n_points=5)), 3, seed=4))
    one, two = sklearn_boosting(x, y, jobs=1), sklearn_boosting(x, y, jobs=2)
    assert torch.equal(one, two)
    xd, yd = x.double().numpy(), y.double().numpy()
    for b, i in itertools.product(range(3), range(2, 5)):
        want = GradientBoostingRegressor(random_state=0).fit(xd[b, :i], yd[b, :i]).predict(xd[b, i:i + 1])[0]
        assert one[b, i].item() == pytest.approx(want, rel=1e-6)
    assert torch.equal(one[:, 0], torch.zeros(3)) and torch.allclose(one[:, 1], y[:, 0])


def test_sklearn_boosting_uses_the_torch_threads_this_process_was_given(monkeypatch):
    """A sweep worker with --cpus-per-run 1 has one torch thread: its fits stay in one process."""
    if not sklearn_available():
        pytest.skip("scikit-learn not installed (pip install 'iclbench[trees]')")
    import joblib

    from iclbench.tasks.trees import sklearn_boosting

    seen, real = [], joblib.Parallel
    monkeypatch.setattr(joblib, "Parallel", lambda n_jobs, **kw: seen.append(n_jobs) or real(n_jobs=n_jobs, **kw))
    x, y = examples(sample(DecisionTreeRegression(TreeOptions(d=3, n_points=3)), 1, seed=4))
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            sklearn_boosting(x, y)
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 3]


@pytest.mark.slow
def test_decision_tree_runs_end_to_end_and_gains_boosting_by_rescore(tmp_path, capsys):
    """A run; then `rescore --set task.sklearn=true` adds gradient_boosting on the run's own sequences, and an
    option that would change the data is refused in one line."""
    from iclbench.cli import main

    code = main(["run", "--task", "decision-tree", "--model", "gpt1l", "--steps", "20", "--out", str(tmp_path),
                 "--set", "model.d_model=16", "--set", "model.d_mlp=32", "--set", "eval.n_sequences=32",
                 "--set", "task.n_points=6", "--set", "eval.bootstrap=10", "--set", "eval.probes=false"])
    assert code == 0
    (metrics,) = tmp_path.glob("*/metrics.json")
    m = json.loads(metrics.read_text())
    assert not m["refused_baselines"]
    assert {"model", "bayes", "greedy_tree", "greedy_tree_full", "sign_lookup"} <= set(m["summary"])
    (run_dir,) = (p.parent for p in tmp_path.glob("*/metrics.json"))
    capsys.readouterr()
    assert main(["rescore", str(run_dir), "--set", "task.noise=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task.noise=0.5" in err and "task.sklearn" in err
    if not sklearn_available():
        return
    assert main(["rescore", str(run_dir), "--set", "task.sklearn=true"]) == 0
    after = json.loads((run_dir / "metrics.json").read_text())
    assert "gradient_boosting" in after["summary"] and after["rescored"][-1]["set"] == ["task.sklearn=true"]
    assert after["summary"]["model"] == m["summary"]["model"]  # the model's numbers untouched
    assert "sklearn: false" in (run_dir / "config.yaml").read_text()  # the run's config stays as trained
