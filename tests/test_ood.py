"""OOD evaluation and per-task training defaults: engine behaviour a task plugin relies on."""

import types

import pytest

import iclbench
from conftest import cli, overrides, tiny_run
from iclbench import hookimpl
from iclbench.config import resolve
from iclbench.registry import build_registry
from iclbench.tasks.affine import AffineTask

FAST = overrides(tiny_run(eval__probes=False))


@pytest.fixture(scope="module")
def linreg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ood")
    return iclbench.run("linreg", "gpt3l", steps=5, out=str(out), overrides=FAST)


def test_every_shift_is_recorded_with_its_own_normalizer(linreg_run):
    ood = linreg_run.metrics["ood"]
    assert {"w_scale_x2", "scale_x0.5", "scale_x2", "scale_x3", "context_x2"} <= set(ood)
    noisy = next(name for name in ood if name.startswith("noise_"))
    for name, entry in ood.items():
        if name == "context_x2":
            continue
        s = entry["summary"]
        # each shift is normalized by its own prior: predicting 0 (the prior mean) still scores ~1
        assert s["zero"]["mean"] == pytest.approx(1.0, abs=0.12), name
        assert s["least_squares"]["mean"] < 0.2 or name == noisy
        assert {"model", "oracle"} <= set(s) and s["model"]["ci"][0] <= s["model"]["mean"] <= s["model"]["ci"][1]
        assert entry["curves"]["bootstrap"] == 100  # min(eval.bootstrap, 200)
    # raw mse is kept: predicting 0 costs Var y = d * x_scale^2, so x3 against x0.5 is 36 times the error
    ratio = ood["scale_x3"]["summary"]["zero"]["mse"] / ood["scale_x0.5"]["summary"]["zero"]["mse"]
    assert ratio == pytest.approx(36, rel=0.15)
    assert ood["scale_x2"]["options"] == {"x_scale": 2.0}
    assert "ridge" in ood[noisy]["summary"] and ood[noisy]["summary"]["oracle"]["mean"] > 0.05  # noise floor


def test_longer_context_is_skipped_with_the_reason_not_a_crash(linreg_run):
    skipped = linreg_run.metrics["ood"]["context_x2"]
    assert "n_ctx" in skipped["skipped"] and "summary" not in skipped
    assert skipped["options"] == {"n_points": 24}


def test_a_model_with_room_evaluates_the_longer_context(tmp_path):
    result = iclbench.run("affine", "gpt3l", steps=5, out=str(tmp_path), overrides=FAST + ["model.n_ctx=32"])
    longer = result.metrics["ood"]["context_x2"]
    assert len(longer["curves"]["positions"]) == 32 and longer["summary"]["oracle"]["mean"] < 1e-9
    grown = result.metrics["ood"]["a_in_(1,1.1]"]["summary"]
    assert grown["least_squares"]["mean"] < 1e-6 and grown["copy_last"]["mean"] > 0.001


def test_ood_can_be_switched_off_without_changing_the_run_identity(tmp_path):
    off = iclbench.run("affine", "gpt3l", steps=5, out=str(tmp_path), overrides=FAST + ["eval.ood=false"])
    assert off.metrics["ood"] == {}
    on = resolve(build_registry(), task="affine", model="gpt3l", steps=5, overrides=FAST)
    assert on.eval.ood and on.config_hash == off.config.config_hash


@pytest.mark.slow
def test_cli_prints_the_ood_table(tmp_path):
    sets = [a for s in FAST for a in ("--set", s)]
    out = cli("run", "--task", "affine", "--model", "gpt3l", "--steps", "5", "--out", str(tmp_path), *sets)
    assert out.returncode == 0, out.stderr
    assert "out of distribution" in out.stdout and "| scale_x2" in out.stdout
    assert "skipped: sequence of 32 positions" in out.stdout


class SlowTask(AffineTask):
    name = "slow-affine"
    train_defaults = {"steps": 6000, "lr": 1e-3}


def test_task_training_defaults_sit_under_every_user_setting(tmp_path):
    plugin = types.ModuleType("slow_plugin")
    plugin.iclbench_tasks = hookimpl(lambda: [SlowTask])
    reg = build_registry(extra_plugins=[plugin])
    cfg = resolve(reg, task="slow-affine", model="gpt3l")
    assert (cfg.train.steps, cfg.train.lr, cfg.train.batch_size) == (6000, 1e-3, 64)
    assert resolve(reg, task="slow-affine", model="gpt3l", steps=10).train.steps == 10
    assert resolve(reg, task="slow-affine", model="gpt3l", overrides=["train.lr=0.01"]).train.lr == 0.01
    f = tmp_path / "c.yaml"
    f.write_text("task: slow-affine\nmodel: gpt3l\ntrain: {steps: 7}\n")
    assert resolve(reg, config=f).train.steps == 7 and resolve(reg, config=f).train.lr == 1e-3
    assert resolve(reg, task="affine", model="gpt3l").train.steps == 3000  # other tasks keep the engine's
