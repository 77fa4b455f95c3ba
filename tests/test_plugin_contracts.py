"""Run-time guardrails for plugins: contract violations are one line naming the plugin; a failed run is
marked failed and reported to loggers; a raising logger is isolated; new baselines are scored by rescore."""

import json
import types

import pytest
import torch
from torch import nn

from conftest import tiny_run
from iclbench import Baseline, Batch, Model, hookimpl
from iclbench.contracts import PluginError
from iclbench.errors import ICLBenchError
from iclbench.registry import build_registry
from iclbench.rescore import rescore
from iclbench.runner import run
from iclbench.tasks.affine import AffineTask
from iclbench.testing import check_plugin

TINY = tiny_run(cheap=True, train__steps=20, model__n_heads=2, eval__n_sequences=128, eval__bootstrap=20)


def plugin(name, **hooks):
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    return module


def registry(*plugins):
    return build_registry(autoload=False, extra_plugins=plugins)


class NoParams(Model):
    name = "noparams"

    def forward(self, inputs):
        return inputs[..., :1] * 0


class ShortTask(AffineTask):
    name = "short"

    def sample(self, n, generator, device="cpu"):
        b = super().sample(n, generator, device)
        return Batch(b.inputs[:, :-1], b.targets, b.mask, b.latents)


class Explodes(Model):
    name = "explodes"

    def __init__(self, options, d_in, d_out, n_ctx):
        super().__init__(options, d_in, d_out, n_ctx)
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, inputs):  # fine while training and on small batches, NaN on the evaluation batch
        out = self.lin(inputs)
        return out * float("nan") if inputs.shape[0] >= 128 and not self.training else out


def test_task_and_model_contracts_fail_before_training_naming_the_plugin(tmp_path):
    reg = registry(plugin("odd", iclbench_models=lambda: [NoParams], iclbench_tasks=lambda: [ShortTask]))
    with pytest.raises(PluginError, match=r"^model 'noparams' \(plugin 'odd'\): has no trainable parameters"):
        run("affine", "noparams", out=str(tmp_path), registry=reg, overrides={"train.steps": 20})
    with pytest.raises(PluginError, match=r"^task 'short' \(plugin 'odd'\): sample\(4, \.\.\.\) returned inputs of "
                                          r"shape \[4, 15, 1\]; expected \[n=4, context_len=16, d_in=1\]"):
        run("short", "gpt1l", out=str(tmp_path), registry=reg, overrides=TINY)
    assert not list(tmp_path.iterdir())  # nothing was started


def test_failed_run_is_marked_failed_and_loggers_hear_of_it_and_a_raising_logger_is_isolated(tmp_path, capsys):
    heard = []
    reg = registry(plugin("nan_model", iclbench_models=lambda: [Explodes]),
                   plugin("bad_logger", iclbench_run_started=lambda run_dir, config: 1 / 0),
                   plugin("good_logger", iclbench_run_failed=lambda status, error, plugin: heard.append(
                       (status, plugin, error))))
    with pytest.raises(PluginError, match=r"model 'explodes' \(plugin 'nan_model'\): gave predictions with NaN/inf"):
        run("affine", "explodes", out=str(tmp_path), registry=reg,
            overrides={k: v for k, v in TINY.items() if not k.startswith("model.")})
    status = json.loads(next(tmp_path.glob("*/status.json")).read_text())
    assert status["status"] == "failed" and status["plugin"] == "nan_model" and "NaN/inf" in status["error"]
    assert heard and heard[0][:2] == ("failed", "nan_model")
    assert "plugin 'bad_logger' failed in iclbench_run_started: ZeroDivisionError" in capsys.readouterr().err


def cheat(batch):
    return batch.targets.clone()


def peek_next(batch):
    return torch.cat([batch.inputs[:, 1:], batch.inputs[:, -1:]], 1)


def knows_rule(batch):
    lat = batch.latents
    return (lat["a"][:, None] * lat["x"][:, :-1] + lat["b"][:, None])[..., None]


def test_baselines_that_peek_or_read_latents_unmarked_are_refused_and_rescore_adds_new_ones(tmp_path):
    cheats = plugin("cheats", iclbench_baselines=lambda: [Baseline("affine", "cheat", cheat),
                                                            Baseline("affine", "peek_next", peek_next),
                                                            Baseline("affine", "knows_rule", knows_rule)])
    result = run("affine", "gpt1l", out=str(tmp_path), registry=registry(cheats), overrides=TINY)
    refused = result.metrics["refused_baselines"]
    assert set(refused) == {"cheat", "peek_next", "knows_rule"}
    assert "reads the future" in refused["cheat"] and "(plugin 'cheats')" in refused["cheat"]
    assert "reads batch.latents but is not marked as an oracle" in refused["knows_rule"]
    assert not set(refused) & set(result.metrics["summary"])  # never scored, never "best baseline"

    knows_rule.oracle = True  # marked: an oracle reference, allowed to read latents
    try:
        later = plugin("later", iclbench_baselines=lambda: [Baseline("affine", "mean_so_far", lambda b: b.inputs.cumsum(1)
                                                                      / torch.arange(1, b.inputs.shape[1] + 1)[:, None]),
                                                             Baseline("affine", "oracle_rule", knows_rule)])
        out = rescore(result.run_dir, registry=registry(later))
    finally:
        del knows_rule.oracle
    assert out["added"] == ["mean_so_far", "oracle_rule"] and not out["refused"]
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["summary"]["model"] == result.metrics["summary"]["model"]  # the model is not re-scored
    assert metrics["summary"]["mean_so_far"]["mean"] == pytest.approx(metrics["summary"]["context_mean"]["mean"],
                                                                       rel=1e-4)  # the same estimator
    assert metrics["summary"]["oracle_rule"]["mean"] < 1e-6 and "oracle_rule" in metrics["oracles"]
    assert rescore(result.run_dir, registry=registry(later))["added"] == []  # idempotent


def test_check_plugin_reports_every_broken_contract():
    reg = registry(plugin("odd", iclbench_models=lambda: [NoParams], iclbench_tasks=lambda: [ShortTask]))
    with pytest.raises(AssertionError) as err:
        check_plugin("odd", registry=reg)
    assert "FAILED task 'short'" in str(err.value) and "FAILED model 'noparams'" in str(err.value)
    assert check_plugin("affine", registry=reg) == ["ok task 'affine'"]
    with pytest.raises(ICLBenchError, match="nothing named 'nope'"):
        check_plugin("nope", registry=reg)
