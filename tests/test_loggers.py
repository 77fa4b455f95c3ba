"""The built-in MLflow and TensorBoard loggers write real stores, read back here with the libraries' own
readers (MlflowClient, TensorBoard's EventAccumulator); a logger that is missing or cannot reach its store
warns once and never costs the run."""

import dataclasses
import json
import os
import shutil

import pytest

import iclbench
from conftest import overrides, tiny_run
from iclbench.config import resolve
from iclbench.errors import ICLBenchError
from iclbench.registry import get_registry
from iclbench.rundir import find_runs

#: a run of a few seconds: no probes, no OOD; the loss logged every 5 steps
FAST = overrides(tiny_run(cheap=True, train__log_every=5))


def _client(uri):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _accumulator(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'iclbench[mlflow]')")
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'iclbench[tensorboard]')")
    out = tmp_path_factory.mktemp("results")
    return iclbench.run("affine", "gpt3l", steps=20, out=str(out), overrides=FAST + [("log", ["mlflow", "tensorboard"])])


@pytest.mark.slow
def test_mlflow_store_reads_back(logged):
    m = logged.metrics
    where = m["extra"]["mlflow"]
    assert where["tracking_uri"] == (logged.run_dir.parent / "mlruns").resolve().as_uri()
    client = _client(where["tracking_uri"])
    run = client.get_run(where["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == logged.config.run_name
    assert client.get_experiment(run.info.experiment_id).name == "iclbench-affine"
    params = run.data.params
    assert params["task.name"] == "affine" and params["model.d_model"] == "16" and params["train.steps"] == "20"
    assert params["config_hash"] == m["config_hash"] and params["log"] == '["mlflow", "tensorboard"]'
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [p.step for p in loss] == [5, 10, 15, 20] and all(p.value > 0 for p in loss)
    for name, s in m["summary"].items():
        assert run.data.metrics[f"error/{name}"] == pytest.approx(s["mean"])
        assert run.data.metrics[f"error_ci_high/{name}"] == pytest.approx(s["ci"][1])
    curve = sorted((p.step, p.value) for p in client.get_metric_history(run.info.run_id, "curve/model"))
    assert [t for t, _ in curve] == m["curves"]["positions"]
    assert [v for _, v in curve] == pytest.approx(m["curves"]["predictors"]["model"]["curve"])
    excess = m["curves"]["predictors"]["model"].get("excess_bayes")
    if excess:  # the task has a Bayes baseline
        assert run.data.metrics["excess_bayes/model"] == pytest.approx(excess["mean"])
        assert run.data.tags["learned"] == excess["learned"]
    assert run.data.tags["iclbench.task"] == "affine" and run.data.tags["iclbench.seed"] == "0"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "run")}
    assert {"run/metrics.json", "run/config.yaml", "run/train.log", "run/model.safetensors"} <= files
    # the store sits beside the run directories and is not taken for one
    assert [r.name for r in find_runs(logged.run_dir.parent)] == [logged.run_dir.name]


def test_tensorboard_events_read_back(logged):
    m = logged.metrics
    logdir = logged.run_dir / "tensorboard"
    assert m["extra"]["tensorboard"]["logdir"] == str(logdir)
    acc = _accumulator(logdir)
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10, 15, 20]
    assert acc.Scalars("error/model")[-1].value == pytest.approx(m["summary"]["model"]["mean"], rel=1e-6)
    assert [e.step for e in acc.Scalars("curve/model")] == m["curves"]["positions"]
    assert [e.value for e in acc.Scalars("curve/model")] == pytest.approx(m["curves"]["predictors"]["model"]["curve"],
                                                                          rel=1e-6)
    if m["curves"]["predictors"]["model"].get("excess_bayes"):
        assert "excess_bayes/model" in acc.Tags()["scalars"]
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "task.name: affine" in config and f"config_hash: {m['config_hash']}" in config


def test_specialization_labels_and_failures(logged, tmp_path, capsys):
    """The probes' verdicts become tags / a text panel; a failed run ends FAILED with its error."""
    from iclbench.loggers import mlflow_logger, tensorboard_logger

    run_dir = tmp_path / logged.run_dir.name
    shutil.copytree(logged.run_dir, run_dir, ignore=shutil.ignore_patterns("tensorboard"))
    summary = {"claim_1": {"verdict": "holds"}, "claim_2": {"verdict": "inconclusive"},
               "refines_with_depth": {"verdict": "fails"}, "roles": ["copy_last", "least_squares"]}
    (run_dir / "probes.json").write_text(json.dumps({"probes": {"specialization": {"summary": summary}}}))
    config = dataclasses.replace(logged.config, log=[f"mlflow={tmp_path / 'store'}", "tensorboard"])
    extra = {"extra": {}}
    for logger in (mlflow_logger.LOGGER, tensorboard_logger.LOGGER):
        logger.run_started(run_dir, config)
        logger.eval_finished(run_dir, extra)
        logger.run_finished(run_dir, logged.metrics)
    client = _client((tmp_path / "store").resolve().as_uri())
    tags = client.get_run(extra["extra"]["mlflow"]["run_id"]).data.tags
    assert tags["specialization.claim_1"] == "holds" and tags["specialization.claim_2"] == "inconclusive"
    assert tags["specialization.refines_with_depth"] == "fails"
    assert tags["specialization.roles"] == "L0: copy_last, L1: least_squares"
    text = _accumulator(run_dir / "tensorboard").Tensors("labels/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "specialization.claim_1: holds" in text and "L1: least_squares" in text

    extra = {"extra": {}}
    for logger in (mlflow_logger.LOGGER, tensorboard_logger.LOGGER):  # a second attempt that fails
        logger.run_started(run_dir, config)
        logger.eval_finished(run_dir, extra)
        logger.run_failed(run_dir, "failed", "RuntimeError: boom", "some_plugin")
    run = client.get_run(extra["extra"]["mlflow"]["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["iclbench.error"] == "RuntimeError: boom"
    assert run.data.tags["iclbench.status"] == "failed" and run.data.tags["iclbench.plugin"] == "some_plugin"
    texts = [t.tensor_proto.string_val[0].decode() for t in _accumulator(run_dir / "tensorboard").Tensors(
        "failure/text_summary")]
    assert any("RuntimeError: boom" in t for t in texts)
    assert capsys.readouterr().err == ""


def test_unreachable_store_warns_once_and_the_run_goes_on(tmp_path, capfd):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'iclbench[mlflow]')")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's directory should be")
    result = iclbench.run("affine", "gpt3l", steps=10, out=str(tmp_path / "results"),
                          overrides=FAST + [("log", [f"mlflow={blocker / 'mlruns'}"])])
    assert (result.run_dir / "metrics.json").exists() and "mlflow" not in result.metrics["extra"]
    lines = [line for line in capfd.readouterr().err.splitlines() if "mlflow" in line]
    assert len(lines) == 1 and "mlflow logger cannot reach its store" in lines[0], lines


def test_missing_library_warns_once(tmp_path, monkeypatch, capsys):
    import sys

    from iclbench.loggers import mlflow_logger, tensorboard_logger

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    config = resolve(get_registry(), task="affine", model="gpt3l",
                                     overrides=[("log", ["mlflow", "tensorboard"])])
    for logger in (mlflow_logger.LOGGER, tensorboard_logger.LOGGER):
        logger.run_started(tmp_path, config)
        logger.train_log(tmp_path, 5, {"loss": 1.0})
        logger.run_finished(tmp_path, {})
        logger.run_failed(tmp_path, "failed", "x", None)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "pip install 'iclbench[mlflow]'" in err[0] and "iclbench[tensorboard]" in err[1]
    assert not (tmp_path / "tensorboard").exists()


def test_log_is_validated_and_left_out_of_the_hash():
    registry = get_registry()
    plain = resolve(registry, task="affine", model="gpt3l")
    logged = resolve(registry, task="affine", model="gpt3l", overrides=["log=mlflow,tensorboard"])
    assert logged.log == ["mlflow", "tensorboard"] and logged.run_name == plain.run_name
    assert "log" not in plain.to_dict() and logged.to_dict()["log"] == ["mlflow", "tensorboard"]
    with pytest.raises(ICLBenchError, match="unknown logger 'mlfow'.*mlflow"):
        resolve(registry, task="affine", model="gpt3l", overrides=[("log", ["mlfow"])])


def test_a_recorded_logger_since_uninstalled_is_skipped(capsys):
    """Rebuilding a run (probe, rescore) from a config.yaml that names a logger no longer installed works."""
    cfg = resolve(get_registry(), config={"task": "affine", "model": "gpt3l", "log": ["gone", "tensorboard"]})
    assert cfg.log == ["tensorboard"]
    assert "unknown logger 'gone'" in capsys.readouterr().err
