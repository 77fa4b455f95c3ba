"""Checkpoints and resumption: an interrupted run (kill -9, Ctrl-C) continues from its last checkpoint and
ends with exactly the metrics of a run that never stopped; a complete run is not trained again."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import iclbench
from conftest import TINY, cli
from iclbench import store
from iclbench.config import TrainOptions
from iclbench.errors import ICLBenchError
from iclbench.models.gpt import GPT, GPTOptions
from iclbench.registry import get_registry
from iclbench.rundir import OpenRun, RunDir
from iclbench.trainer import TrainingState, train

CPU = torch.device("cpu")


def fresh_model():
    torch.manual_seed(0)
    return GPT(GPTOptions(n_layers=2, d_model=16, n_heads=2, d_mlp=32), 1, 1, 16)


def test_resumed_training_is_bitwise_the_uninterrupted_one(tmp_path):
    task = get_registry().task("affine")()
    o = TrainOptions(steps=40, batch_size=8, warmup=5, log_every=10, checkpoint_every=15)
    full, full_log = fresh_model(), {}
    train(full, task, o, seed=3, device=CPU, log=lambda step, m: full_log.update({step: m["loss"]}))

    def interrupt_at_20(step, metrics):
        if step == 20:
            raise KeyboardInterrupt

    path = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), task, o, seed=3, device=CPU, log=interrupt_at_20,
              checkpoint=lambda state: store.save_training_state(path, state.to_dict()))
    state = TrainingState.from_dict(store.load_training_state(path))  # the checkpoint at step 15, as a file
    assert state.step == 15
    resumed, resumed_log = fresh_model(), {}  # a new process would start from a fresh model too
    stats = train(resumed, task, o, seed=3, device=CPU, resume=state,
                  log=lambda step, m: resumed_log.update({step: m["loss"]}))
    assert stats["resumed_from_step"] == 15
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # the log window 11..20 straddles the checkpoint: its running loss was restored, not restarted
    assert resumed_log == {k: v for k, v in full_log.items() if k > 15}


def _run_args(out):
    # no probes: they are half of each of the three runs' time and nothing here reads them (a loaded machine ran
    # this test past the 300 s limit of one command)
    sets = [a for s in TINY + ["train.checkpoint_every=40", "train.log_every=20", "eval.probes=false"]
            for a in ("--set", s)]
    return ["run", "--task", "affine", "--model", "gpt3l", "--steps", "160", "--seed", "2", "--out", str(out),
            *sets]


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / store.LOG).read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "step" in r and "loss" in r]


@pytest.mark.slow  # kill -9 of a training process
def test_run_killed_with_sigkill_resumes_on_rerun_to_the_same_metrics(tmp_path):
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-m", "iclbench.cli", *_run_args(killed_out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(killed_out.glob(f"*/{store.TRAIN_STATE}")):
        assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stderr.read()}"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = killed_out.iterdir()
    assert not (run_dir / store.METRICS).exists(), "the run finished before it could be killed"
    assert json.loads((run_dir / store.STATUS).read_text())["status"] == "running"  # as kill -9 leaves it

    resumed = cli(*_run_args(killed_out))  # the same command again continues it
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from the checkpoint at step" in resumed.stdout
    clean = cli(*_run_args(clean_out), "--quiet")
    assert clean.returncode == 0, clean.stderr

    a = json.loads((run_dir / store.METRICS).read_text())
    b = json.loads((clean_out / run_dir.name / store.METRICS).read_text())
    assert a["summary"] == b["summary"] and a["curves"] == b["curves"]
    assert a["train"]["final_loss"] == b["train"]["final_loss"] and a["train"]["resumed_from_step"] > 0
    assert _losses(run_dir) == _losses(clean_out / run_dir.name)  # no step lost or logged twice
    assert not (run_dir / store.TRAIN_STATE).exists()  # complete: nothing left to resume


@pytest.mark.slow
def test_complete_run_is_not_retrained_unless_forced(tmp_path):
    first = iclbench.run("affine", "gpt1l", steps=10, out=str(tmp_path), overrides=TINY)
    log = (first.run_dir / store.LOG).read_text()
    again = iclbench.run("affine", "gpt1l", steps=10, out=str(tmp_path), overrides=TINY)
    assert again.outcome == "complete" and again.metrics == first.metrics
    assert (first.run_dir / store.LOG).read_text() == log
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                 again.model.state_dict().values()))
    forced = iclbench.run("affine", "gpt1l", steps=10, out=str(tmp_path), overrides=TINY, force=True)
    assert forced.outcome == "trained" and forced.metrics["summary"] == first.metrics["summary"]


@pytest.mark.slow
def test_resume_with_nothing_to_resume_is_one_line(tmp_path):
    out = cli("run", "--task", "affine", "--model", "gpt1l", "--out", str(tmp_path), "--resume")
    assert out.returncode == 2 and "nothing to resume" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def earlier_attempt(run_dir, device, *, force):
    """What :meth:`RunDir.open` finds an earlier attempt left in ``run_dir``."""
    run = OpenRun(RunDir(run_dir), None, None, device, None, None)
    run.find_earlier(force=force)
    return run.earlier


def test_checkpoint_from_another_device_or_a_live_process_is_refused(tmp_path):
    store.write_json(tmp_path / store.STATUS, {"status": "interrupted"})
    store.save_training_state(tmp_path / store.TRAIN_STATE, {"step": 5, "device": "cuda"})
    with pytest.raises(ICLBenchError, match="written on cuda, this run is on cpu"):
        earlier_attempt(tmp_path, CPU, force=False)
    assert earlier_attempt(tmp_path, CPU, force=True) is None  # --force starts afresh
    # a stale status whose pid now belongs to another (live) process does not block the run: the lock decides
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store.write_json(tmp_path / store.STATUS, {"status": "running", "pid": sleeper.pid,
                                                   "host": socket.gethostname()})
        with pytest.raises(ICLBenchError, match="written on cuda"):
            earlier_attempt(tmp_path, CPU, force=False)
    finally:
        sleeper.kill()
        sleeper.wait()
