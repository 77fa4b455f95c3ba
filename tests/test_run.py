"""End to end: a user trains, evaluates and records a run; bad input gets one line and a non-zero exit."""

import json

import pytest
import torch
import yaml

import iclbench
from conftest import TINY, cli
from iclbench.config import resolve
from iclbench.registry import get_registry
from iclbench.evaluate import evaluation_batch
from iclbench.rundir import load_run
from iclbench.evaluate import predict


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    return iclbench.run("affine", "gpt3l", steps=400, seed=1, out=str(out), overrides=TINY)


@pytest.mark.slow
def test_small_model_learns_affine_far_below_copy_last(trained):
    s = trained.metrics["summary"]
    assert s["model"]["mean"] < 0.25 * s["copy_last"]["mean"], s
    assert s["model"]["mean"] < 0.25 * s["context_mean"]["mean"], s
    assert s["least_squares"]["mean"] < 1e-6 and s["oracle"]["mean"] < 1e-9
    lo, hi = s["model"]["ci"]
    assert lo <= s["model"]["mean"] <= hi


def test_run_directory_is_complete_and_reloadable(trained):
    d = trained.run_dir
    # probes run by default after evaluation (eval.probes): probes.json plus one tidy table per probe
    assert {p.name for p in d.iterdir()} == {"config.yaml", "metrics.json", "model.safetensors", "train.log",
                                           "status.json", "probes.json", "probes"}
    probes = json.loads((d / "probes.json").read_text())["probes"]
    assert "specialization" in probes and (d / probes["specialization"]["table"]).exists()
    m = json.loads((d / "metrics.json").read_text())
    prov = m["provenance"]
    for key in ("iclbench_version", "git_commit", "torch_version", "device", "seed"):
        assert key in prov
    assert m["train"]["tokens_per_s"] > 0 and m["wall_time_s"] > 0
    assert len(m["curves"]["predictors"]["model"]["curve"]) == 16
    cfg = resolve(get_registry(), config=d / "config.yaml")
    assert cfg.run_name == d.name  # the stored config reproduces the run's identity
    log = [json.loads(line) for line in (d / "train.log").read_text().splitlines()]
    assert log[-1]["event"] == "trained" and any(r.get("step") == 400 for r in log)
    # the checkpoint reproduces the recorded error
    cfg, task, model = load_run(d)
    batch = evaluation_batch(task, cfg.eval, torch.device("cpu"))
    err = ((predict(model, batch) - batch.targets).pow(2).mean(-1) / task.normalizer())[:, 3:].mean()
    assert float(err) == pytest.approx(m["summary"]["model"]["mean"], rel=1e-4)


@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path):
    a = iclbench.run("affine", "gpt3l", steps=15, out=str(tmp_path / "a"), overrides=TINY)
    b = iclbench.run("affine", "gpt3l", steps=15, out=str(tmp_path / "b"), overrides=TINY)
    assert a.metrics["summary"] == b.metrics["summary"]


@pytest.mark.slow
def test_cli_run_prints_the_table_and_leaderboard_reads_it(tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    out = cli("run", "--task", "affine", "--model", "gpt3l", "--steps", "20", "--out", str(tmp_path), *sets)
    assert out.returncode == 0, out.stderr
    assert "| t " in out.stdout and "least_squares" in out.stdout and "mean t>=3" in out.stdout
    board = cli("leaderboard", "--results", str(tmp_path), "--format", "plain")
    assert board.returncode == 0 and "gpt3l" in board.stdout and "baseline: least_squares" in board.stdout


@pytest.mark.slow
def test_config_file_and_quiet(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump({"task": {"name": "affine", "context_len": 8}, "model": "gpt3l",
                                 "train": {"steps": 10}, "eval": {"n_sequences": 64, "bootstrap": 10},
                                 "out": str(tmp_path / "r")}))
    out = cli("run", "--config", str(f), "--quiet")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("-s0") and "train affine" not in out.stderr  # no progress bar


@pytest.mark.parametrize("args,message", [
    (["--task", "afine", "--model", "gpt3l"], "unknown task 'afine' (did you mean 'affine'"),
    (["--task", "affine", "--model", "gpt"], "unknown model 'gpt'"),
    (["--task", "affine", "--model", "gpt3l", "--steps", "-1"], "steps must be > 0, got -1"),
    (["--task", "affine", "--model", "gpt3l", "--device", "tpu"], "unknown device 'tpu'"),
    (["--task", "affine", "--model", "gpt3l", "--set", "task.nosie=1"], "unknown key 'task.nosie'"),
    (["--task", "affine", "--model", "gpt3l", "--set", "noequals"], "expects key=value"),
])
@pytest.mark.slow
def test_bad_input_one_line_nonzero_exit(args, message, tmp_path):
    out = cli("run", *args, "--out", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip() == f"iclbench: error: {message}" or message in out.stderr.strip()
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert not any(tmp_path.iterdir())  # nothing written for a rejected config


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda():
    out = cli("run", "--task", "affine", "--model", "gpt3l", "--device", "cuda")
    assert out.returncode == 2 and "CUDA is not available" in out.stderr


@pytest.mark.slow
def test_divergence_stops_names_the_step_and_keeps_the_log(tmp_path):
    out = cli("run", "--task", "affine", "--model", "gpt3l", "--steps", "50", "--out", str(tmp_path),
              "--quiet", "--set", "train.lr=1e6", "--set", "train.grad_clip=0", "--set", "train.warmup=0")
    assert out.returncode == 1
    assert "training diverged at step" in out.stderr and "Traceback" not in out.stderr
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "train.log").exists() and not (run_dir / "metrics.json").exists()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "diverged"
    board = cli("leaderboard", "--results", str(tmp_path))
    assert board.returncode == 0 and "skipping damaged run directory" in board.stderr


def test_training_bar_shows_on_a_terminal_that_reports_no_size(tmp_path):
    """stderr a real terminal that reports no size (0 x 0: a fresh pty, some CI and remote terminals), where
    tqdm's own sizing hid the training bar, as it hid the sweep's (iclbench.terminal.bar_size serves both)."""
    import os
    import sys

    from conftest import read_pty, tiny_run
    from iclbench.runner import run

    master, slave = os.openpty()
    with open(slave, "w", closefd=True) as tty:
        assert tuple(os.get_terminal_size(tty.fileno())) == (0, 0)
        real, sys.stderr = sys.stderr, tty
        try:
            run("affine", "gpt3l", steps=5, out=str(tmp_path), quiet=False, overrides=tiny_run(cheap=True))
        finally:
            sys.stderr = real
        tty.flush()
        seen = read_pty(master, "/5")
    os.close(master)
    assert "train affine" in seen and "/5" in seen, seen
