"""Task diversity (iclbench.pool): a pool of K rules per training seed, dMMSE, the pool_rules evaluation."""

import math

import pytest
import torch

import iclbench
from conftest import overrides, tiny_run
from iclbench.config import resolve
from iclbench.errors import ICLBenchError
from iclbench.models.gpt import GPT, GPTOptions
from iclbench.options import TrainOptions
from iclbench.pool import POOL_VARIANT, PooledTask, _POOLS, pool_variants
from iclbench.registry import get_registry
from iclbench.trainer import Curriculum, Trainee, train, train_together

CPU = torch.device("cpu")


def make(name, seed=0, **options):
    registry = get_registry()
    cfg = resolve(registry, task=name, model="gpt1l", seed=seed, overrides={f"task.{k}": v for k, v in options.items()})
    task = registry.task(name)(cfg.task_options)
    task.run_seed = seed
    return task


def rules_of(task, batch):
    return torch.cat([batch.latents[k].reshape(len(batch), -1) for k in task.rule_latents], 1)


def pool_rows(task, seed):
    pool = task.pool(seed)
    return torch.cat([pool[k].reshape(task.pool_size, -1) for k in task.rule_latents], 1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ["affine", "linreg"])
def test_the_pool_is_the_seeds_own_and_the_same_in_every_process(name):
    task = make(name, pool=8)
    first = {k: v.clone() for k, v in task.pool(5).items()}
    _POOLS.clear()  # drawn again, as a fresh process would
    again = make(name, pool=8).pool(5)
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = task.pool(6)
    assert not any(torch.equal(first[k], other[k]) for k in first)
    assert next(iter(first.values())).shape[0] == 8


@pytest.mark.parametrize("name", ["affine", "linreg", "sparse-linreg", "relu-nn"])
def test_pooled_sequences_use_pool_rules_only_and_fresh_ones_do_not(name):
    task = make(name, pool=4)
    view = task.training_task(3)
    batch = view.sample(256, gen())
    used, pool = rules_of(task, batch), pool_rows(task, 3)
    assert torch.equal(used.unique(dim=0), pool.unique(dim=0))  # every rule of the pool, and no other
    fresh = rules_of(task, task.sample(256, gen()))
    assert fresh.unique(dim=0).shape[0] == 256
    # the same task, evaluated or trained on fresh rules, is what it always was: pool changes no draw
    plain = make(name)
    assert torch.equal(task.sample(16, gen(1)).inputs, plain.sample(16, gen(1)).inputs)
    assert plain.training_task(3) is plain and pool_variants(plain) == {}


def test_the_trainer_draws_each_seeds_batches_from_its_pool():
    task = make("linreg", pool=3)
    seen = []
    draw = task.sample_with_rules

    def record(rules, generator, device):
        seen.append(rules["w"].clone())
        return draw(rules, generator, device)

    task.sample_with_rules = record
    model = GPT(GPTOptions(n_layers=1, d_model=16, d_mlp=32, n_heads=2), task.d_in, task.d_out, task.context_len)
    train(model, task, TrainOptions(steps=4, batch_size=32, warmup=1, log_every=2, checkpoint_every=0), 11, CPU)
    used = torch.cat(seen).unique(dim=0)
    assert torch.equal(used, task.pool(11)["w"].unique(dim=0))
    # a curriculum stage trains on the same pool (the curriculum changes no option a rule is drawn from)
    ramped = make("linreg", pool=3, curriculum=True)
    stage = Curriculum(ramped, 3000)(0)
    assert stage.task.options.active_dims and torch.equal(stage.for_seed(11).pool()["w"], task.pool(11)["w"])
    # seeds with pools of their own do not share one stacked model
    models = [GPT(GPTOptions(n_layers=1, d_model=16, d_mlp=32, n_heads=2), task.d_in, task.d_out,
                  task.context_len) for _ in range(2)]
    with pytest.raises(ValueError, match="train each alone"):
        train_together([Trainee(m, s) for m, s in zip(models, (0, 1))], task, TrainOptions(steps=2), CPU)


@pytest.mark.parametrize("name", ["affine", "linreg"])
def test_a_pool_of_one_rule_is_that_rule(name):
    task = make(name, pool=1)
    view = task.training_task(2)
    batch = view.sample(64, gen())
    assert rules_of(task, batch).unique(dim=0).shape[0] == 1
    baselines = get_registry().task_baselines(view)
    pred, oracle = baselines["dmmse"].obj(batch), baselines["oracle"].obj(batch)
    scored = batch.mask
    assert torch.allclose(pred[:, scored], oracle[:, scored], atol=1e-5)  # from the first position: nothing to infer
    assert baselines["bayes"].obj is baselines["dmmse"].obj


def test_dmmse_is_the_posterior_over_the_pool_linreg():
    """Noisy linreg: an explicit loop over the pool's rules with the Gaussian likelihood of the pairs seen."""
    task = make("linreg", pool=5, noise=0.5, d=3, n_points=6)
    batch = task.training_task(0).sample(8, gen(4))
    got = task.dmmse(batch)
    w = task.pool(0)["w"].double()
    x, y = batch.inputs[:, 0::2, :-1].double(), batch.inputs[:, 1::2, -1].double()
    for b in range(8):
        for i in range(6):
            loglik = torch.tensor([sum(-(y[b, j] - w[k] @ x[b, j]) ** 2 / (2 * 0.25) for j in range(i))
                                   for k in range(5)], dtype=torch.float64)
            post = torch.softmax(loglik, 0)
            expected = sum(post[k] * (w[k] @ x[b, i]) for k in range(5))
            assert abs(float(got[b, 2 * i, 0]) - float(expected)) < 1e-5
    assert (got[:, 1::2] == 0).all()  # the answer tokens are not predicted


def test_dmmse_is_the_posterior_over_the_pool_affine_with_noise():
    """Noisy affine: x_0 ~ U[-1, 1] integrated on a fine grid, each pool rule (a, b) weighted by the likelihood
    of y_0..y_t; independent of the closed-form integral dMMSE uses."""
    task = make("affine", seed=1, pool=3, noise=0.1, context_len=6)
    batch = task.training_task(1).sample(4, gen(2))
    got = task.dmmse(batch)[..., 0].double()
    a, b = task.pool(1)["a"].double(), task.pool(1)["b"].double()
    x0 = torch.linspace(-1, 1, 40001, dtype=torch.float64)
    y = batch.inputs[..., 0].double()
    for t in range(6):
        num = den = 0.0
        for k in range(3):
            states = [x0]
            for _ in range(t + 1):
                states.append(a[k] * states[-1] + b[k])
            loglik = sum(-(y[:, s, None] - states[s]) ** 2 / (2 * 0.01) for s in range(t + 1))  # [B, grid]
            lik = loglik.exp()
            num = num + torch.trapezoid(lik * states[t + 1], x0, dim=-1)
            den = den + torch.trapezoid(lik, x0, dim=-1)
        assert torch.allclose(got[:, t], num / den, atol=1e-4), t


@pytest.mark.parametrize("name,known_from", [("affine", 2), ("linreg", 4)])
def test_dmmse_is_the_pool_rule_once_the_context_names_it(name, known_from):
    """Without noise two transitions (affine) or d = 4 pairs (linreg) determine the rule: from there dMMSE
    predicts exactly what the sequence's own rule does (generically it knows it sooner, but a pool rule may
    pass within the noise floor of the first transition or pair)."""
    task = make(name, pool=64)
    batch = task.training_task(0).sample(128, gen(3))
    baselines = get_registry().task_baselines(task)
    pred, oracle = baselines["dmmse"].obj(batch), baselines["oracle"].obj(batch)
    step = 2 if name == "linreg" else 1  # linreg: a query every second token
    cols = batch.mask & (torch.arange(task.context_len) >= known_from * step)
    assert torch.allclose(pred[:, cols], oracle[:, cols], atol=1e-4)
    # on a fresh rule dMMSE is wrong where the fresh-rule Bayes predictor is exact
    fresh = task.sample(128, gen(3))
    late = fresh.mask & (torch.arange(task.context_len) >= task.context_len - 2)
    err = lambda p: (p - fresh.targets)[:, late].pow(2).mean()  # noqa: E731
    assert err(baselines["dmmse"].obj(fresh)) > max(100 * err(baselines["bayes"].obj(fresh)), 1e-4)


def test_pool_zero_keeps_every_hash_and_a_bad_pool_is_one_line():
    registry = get_registry()
    base = resolve(registry, task="affine", model="gpt1l")
    assert base.config_hash == "1013c344"
    assert resolve(registry, task="affine", model="gpt1l", overrides=["task.pool=0"]).config_hash == "1013c344"
    old_recipe = ["train.until=steps", "train.lr=0.0005", "train.batch_size=64", "train.warmup=200"]
    linreg = resolve(registry, task="linreg", model="gpt3l", overrides=old_recipe)
    assert linreg.config_hash == "1cfdbc58"
    pooled = resolve(registry, task="linreg", model="gpt3l", overrides=[*old_recipe, "task.pool=4"])
    assert pooled.config_hash != linreg.config_hash
    for bad in ("-1", "2.5", "true"):
        with pytest.raises(ICLBenchError, match="pool") as exc:
            resolve(registry, task="affine", model="gpt1l", overrides=[f"task.pool={bad}"])
        assert "\n" not in str(exc.value)


def test_a_run_on_a_pool_writes_both_evaluations(tmp_path):
    run = tiny_run(cheap=True, eval__ood=True)
    result = iclbench.run("linreg", "gpt1l", steps=5, out=str(tmp_path), overrides=overrides(run) + ["task.pool=4"])
    m = result.metrics
    assert {"bayes", "dmmse", "model"} <= set(m["summary"]) and "unbounded_bayes" not in m["summary"]
    pool = m["ood"][POOL_VARIANT]
    assert pool["options"] == {} and {"bayes", "dmmse", "unbounded_bayes", "model"} <= set(pool["summary"])
    assert pool["summary"]["bayes"]["mean"] == pool["summary"]["dmmse"]["mean"] < 1e-6  # noise-free: exact
    assert m["summary"]["dmmse"]["mean"] > m["summary"]["bayes"]["mean"]  # fresh rules: the pool is wrong
    # the other shifts draw no pool of their own: no dMMSE there
    assert "dmmse" not in m["ood"]["scale_x2"]["summary"] and "model" in m["ood"]["scale_x2"]["summary"]
    assert result.task.run_seed == 0 and isinstance(result.task.training_task(0), PooledTask)
    assert math.isfinite(pool["summary"]["model"]["mean"])


@pytest.mark.parametrize("name", ["affine", "linreg", "sparse-linreg", "relu-nn", "decision-tree"])
@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_dmmse_uses_only_the_context_before_each_position(name, noise):
    task = make(name, pool=5, noise=noise)
    batch = task.training_task(0).sample(6, gen(5))
    dmmse = get_registry().task_baselines(task)["dmmse"].obj
    full = dmmse(batch)
    assert full.shape == batch.targets.shape and torch.isfinite(full).all()
    T = task.context_len
    for t in (0, T // 2, T - 2):
        tampered = batch.slice(slice(None))
        tampered.inputs = batch.inputs.clone()
        tampered.inputs[:, t + 1:] += 100.0  # the future only
        tampered.targets = batch.targets + 100.0
        assert torch.allclose(dmmse(tampered)[:, : t + 1], full[:, : t + 1], atol=1e-5), t
    assert torch.allclose(dmmse(batch.slice(slice(2, 3))), full[2:3], atol=1e-6)  # alone as in the batch


def test_until_flat_judges_a_pool_run_on_its_pool_against_dmmse(tmp_path):
    from iclbench.trainer import HeldOut

    task = make("linreg", seed=2, pool=4)
    view = task.training_task(2)
    held = HeldOut(view, 64, CPU, get_registry().task_baselines(view)["bayes"].obj)
    assert torch.equal(rules_of(task, held.batch).unique(dim=0), pool_rows(task, 2).unique(dim=0))
    assert float(held.reference.mean()) < 1e-6  # dMMSE names the rule from the first pair: exact
    run = tiny_run(cheap=True)
    result = iclbench.run("linreg", "gpt1l", seed=2, out=str(tmp_path), overrides=overrides(run) + [
        "task.pool=4", "train.max_steps=30", "train.eval_every=10", "train.heldout=64", "train.warmup=5"])
    history = result.metrics["train"]["stop"]["heldout"]
    assert len(history) >= 3 and all(h["excess"] is not None for h in history)
    # the excess is over dMMSE (0 here), so it is the held-out error itself
    assert all(abs(h["excess"] - h["error"]) < 1e-6 for h in history)
