"""A researcher's workflow after one run (issue 26): a finished run opens from Python from any folder without
retraining, its config.yaml shows the defaults as they resolved while keeping the run's hash, and a rerun of
that file finds the run instead of training it anew under a relative ``out``."""

import json
import os

import pytest
import torch
import yaml

import iclbench
from conftest import cli, tiny_run
from iclbench.config import resolve
from iclbench.errors import ICLBenchError
from iclbench.registry import get_registry

CHEAP = tiny_run(cheap=True)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One cheap run under a relative ``out`` (as `iclbench run` writes by default), made from its own folder."""
    home = tmp_path_factory.mktemp("project")
    cwd = os.getcwd()
    os.chdir(home)
    try:
        result = iclbench.run("affine", "gpt3l", steps=12, out="results", overrides=CHEAP)
    finally:
        os.chdir(cwd)
    return home, home / result.run_dir, result


def test_load_opens_a_finished_run_with_weights_in_eval_mode(finished, tmp_path, monkeypatch):
    _, run_dir, trained = finished
    monkeypatch.chdir(tmp_path)  # any folder
    run = iclbench.load(run_dir)
    assert run.outcome == "complete" and run.run_dir == run_dir
    assert run.metrics == json.loads((run_dir / "metrics.json").read_text())
    assert run.config.config_hash == run.metrics["config_hash"] and run.config.task == "affine"
    assert not run.model.training and run.task.name == "affine"
    for name, weight in trained.model.state_dict().items():
        assert torch.equal(run.model.state_dict()[name], weight.cpu()), name
    assert run.probes == {}  # eval.probes=false in this run
    assert list(tmp_path.iterdir()) == []  # nothing written here


def test_run_of_a_recorded_config_from_another_folder_finds_the_run(finished, tmp_path, monkeypatch):
    home, run_dir, _ = finished
    monkeypatch.chdir(tmp_path)
    before = (run_dir / "metrics.json").stat().st_mtime_ns
    again = iclbench.run(config=str(run_dir / "config.yaml"))
    assert again.outcome == "complete" and again.run_dir.resolve() == run_dir.resolve()
    assert not (tmp_path / "results").exists() and (run_dir / "metrics.json").stat().st_mtime_ns == before
    by_dir = iclbench.run(run_dir=run_dir)  # the run recorded there: returned, not retrained
    assert by_dir.outcome == "complete" and by_dir.metrics == again.metrics
    done = cli("run", "--config", str(run_dir / "config.yaml"), cwd=tmp_path)
    assert done.returncode == 0 and "already complete, not retrained" in done.stdout, done.stderr
    assert not (tmp_path / "results").exists()


def test_config_yaml_shows_resolved_defaults_and_keeps_the_hash(finished):
    _, run_dir, trained = finished
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["eval"]["score_from"] == trained.task.score_from == 3
    assert written["model"]["n_ctx"] == trained.model.n_ctx == 16 and written["device"] == "cpu"
    assert written["resolved_from"] == {"device": {"given": "auto", "resolved": "cpu"},
                                        "eval.score_from": {"given": -1, "resolved": 3},
                                        "model.n_ctx": {"given": 0, "resolved": 16}}
    cfg = resolve(get_registry(), config=run_dir / "config.yaml")
    assert cfg.run_name == run_dir.name and cfg.eval.score_from == -1 and cfg.device == "auto"
    assert cfg.to_dict() == trained.config.to_dict() | {"out": str(run_dir.parent)}
    # an older run's config.yaml (the given values, no record) is the same configuration
    legacy = {k: v for k, v in trained.config.to_dict().items()}
    assert resolve(get_registry(), config=legacy).config_hash == cfg.config_hash
    # a value edited by hand stays as edited: another configuration
    written["eval"]["score_from"] = 5
    edited = resolve(get_registry(), config=written)
    assert edited.eval.score_from == 5 and edited.config_hash != cfg.config_hash


@pytest.mark.parametrize("call,message", [
    (lambda p: iclbench.run(run_dir=p), "holds no config.yaml; give task and model (or config) to compute a run "
                                        "into it, or open a finished run with iclbench.load(run_dir)"),
    (lambda p: iclbench.load(p), "is not a run directory (no config.yaml)"),
    (lambda p: iclbench.load(p / "missing"), "is not a directory"),
])
def test_opening_what_is_not_a_run_is_one_line(tmp_path, call, message):
    with pytest.raises(ICLBenchError) as err:
        call(tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_unfinished_run_is_not_loaded(finished, tmp_path):
    _, run_dir, _ = finished
    (tmp_path / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes())
    with pytest.raises(ICLBenchError, match="is not a complete run .*no metrics.json"):
        iclbench.load(tmp_path)


def test_bad_resolved_from_is_one_line():
    with pytest.raises(ICLBenchError, match="resolved_from in config: 'device' must map to"):
        resolve(get_registry(), config={"task": "affine", "model": "gpt3l", "resolved_from": {"device": "cpu"}})


