"""Nothing lost, nothing corrupted: one writer per run, files written safely, damaged results skipped with a
warning naming them, failures as one line (issue 13). Each test reproduces a failure found by the hostile
battery (benchmarks/hostile.py) and fails without its fix."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import iclbench
from conftest import ROOT, overrides, tiny_run
from iclbench import cli as cli_module
from iclbench import runner, store
from iclbench.config import resolve
from iclbench.errors import ICLBenchError, TrainingDiverged
from iclbench.leaderboard import collect, render
from iclbench.registry import get_registry
from iclbench.rundir import load_run

#: the cheapest run that still writes every file kind: no OOD shifts, no probes, a small evaluation set
FAST = overrides(tiny_run(cheap=True))


def fast_run(out, steps=20, **kw):
    return iclbench.run("affine", "gpt1l", steps=steps, out=str(out), overrides=FAST + kw.pop("extra", []), **kw)


def run_dir_of(out, steps=20, extra=()):
    cfg = resolve(get_registry(), task="affine", model="gpt1l", steps=steps, out=str(out),
                  overrides=FAST + list(extra))
    return Path(out) / cfg.run_name


def log_events(run_dir):
    return [json.loads(line) for line in (run_dir / store.LOG).read_text().splitlines()]  # every line valid


HOLD = ("import sys, time; from iclbench import store\n"
        "with store.run_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)\n")


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    return fast_run(tmp_path_factory.mktemp("good")).run_dir


# --- one writer per run directory -------------------------------------------------------------------------

def test_a_live_run_is_never_trained_beside_even_with_force(tmp_path):
    run_dir = run_dir_of(tmp_path)
    run_dir.mkdir(parents=True)
    store.write_json(run_dir / store.STATUS, {"status": "running", "pid": 1})
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for force in (False, True):
            with pytest.raises(ICLBenchError, match=f"being computed by pid {holder.pid} on"):
                fast_run(tmp_path, force=force)
        assert not (run_dir / store.LOG).exists()
        assert json.loads((run_dir / store.STATUS).read_text()) == {"status": "running", "pid": 1}  # untouched
    finally:
        holder.kill()
        holder.wait()
    assert fast_run(tmp_path).outcome == "trained"  # the kernel dropped the lock with its process
    assert not (run_dir / store.LOCK).exists()  # and a clean exit removes the file


@pytest.mark.slow
def test_two_commands_started_together_one_writer_and_a_valid_log(tmp_path):
    args = [sys.executable, "-m", "iclbench.cli", "run", "--task", "affine", "--model", "gpt1l", "--steps", "60",
            "--out", str(tmp_path)] + [a for s in FAST + ["train.log_every=20"] for a in ("--set", s)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    trained = [o for o in outs if o[2] == 0 and "already complete" not in o[0]]
    assert len(trained) == 1, outs
    other = next(o for o in outs if o is not trained[0])
    # the loser names the holder, or "another process" when it looked between the holder's flock and its pid write
    assert (other[2] == 2 and "is being computed by" in other[1]) or "already complete" in other[0], other
    (run_dir,) = tmp_path.iterdir()
    events = log_events(run_dir)
    assert [e["event"] for e in events if "event" in e] == ["start", "trained"]
    assert [e["step"] for e in events if "loss" in e] == [20, 40, 60]


@pytest.mark.slow  # kill -9 of a sweep's driver
def test_a_killed_sweep_takes_its_workers_with_it(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("base: {task: affine, model: gpt1l, train: {steps: 100000, log_every: 1000}, "
                   f"out: {tmp_path / 'results'}}}\nruns: [{{seed: 0}}]\n")
    driver = subprocess.Popen([sys.executable, "-m", "iclbench.cli", "sweep", str(exp), "--jobs", "1", "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    worker = None
    while worker is None and time.monotonic() < deadline:
        for status in (tmp_path / "results").glob("*/status.json"):
            worker = json.loads(status.read_text()).get("pid")
        time.sleep(0.1)
    assert worker is not None and worker != driver.pid
    driver.kill()  # kill -9 of the driver only, not its process group
    driver.wait()
    deadline = time.monotonic() + 15
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the worker outlived its driver"
    with store.run_lock(status.parent):  # and left nothing locked
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except OSError:  # gone
        return False
    return True


# --- files: atomic, never through a symlink, the umask's mode, no stale temporaries ------------------------

def test_train_log_symlink_is_replaced_never_followed(tmp_path):
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("precious\n")
    log = tmp_path / "run" / store.LOG
    log.parent.mkdir()
    log.symlink_to(victim)
    with pytest.raises(store.DamagedRun, match="train.log"):  # a resume does not truncate through it
        store.open_log(log, keep=3)
    with store.open_log(log) as f:  # a new log replaces the link
        f.write("x\n")
    assert victim.read_text() == "precious\n" and not log.is_symlink() and log.read_text() == "x\n"
    run_dir = run_dir_of(tmp_path / "out")
    run_dir.mkdir(parents=True)
    (run_dir / store.LOG).symlink_to(victim)
    fast_run(tmp_path / "out", force=True)
    assert victim.read_text() == "precious\n" and not (run_dir / store.LOG).is_symlink()


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_files_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        store.write_json(tmp_path / "a.json", {"x": 1})
        with store.open_log(tmp_path / "log") as f:
            f.write("\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "log").stat().st_mode & 0o777 == 0o666 & ~mask


def test_disk_full_names_the_file_and_leaves_nothing_behind(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ICLBenchError, match=r"cannot write '.*metrics.json': No space left on device"):
        store.write_json(tmp_path / "metrics.json", {"x": 1})
    assert list(tmp_path.iterdir()) == []


def test_killed_during_evaluation_resumes_without_training_and_cleans_temporaries(complete, tmp_path,
                                                                                 monkeypatch):
    clean = fast_run(complete.parent)  # the uninterrupted run of the same config (found complete)
    real = runner.evaluation_batch
    monkeypatch.setattr(runner, "evaluation_batch", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        fast_run(tmp_path / "killed")
    run_dir = run_dir_of(tmp_path / "killed")
    assert store.load_training_state(run_dir / store.TRAIN_STATE)["trained"]  # the end-of-training checkpoint
    (run_dir / ".metrics.json.abc123.tmp").write_text('{"half')  # a write killed halfway
    monkeypatch.setattr(runner, "evaluation_batch", real)
    again = fast_run(tmp_path / "killed")
    assert again.outcome == "resumed" and again.metrics["summary"] == clean.metrics["summary"]
    assert again.metrics["train"] == clean.metrics["train"] | {"train_time_s": again.metrics["train"]["train_time_s"],
                                                             "tokens_per_s": again.metrics["train"]["tokens_per_s"]}
    assert [e["event"] for e in log_events(run_dir) if "event" in e] == ["start", "trained"]  # trained once
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in clean.run_dir.iterdir())


# --- thread counts per training segment ----------------------------------------------------------------------

def test_thread_count_recorded_per_segment_and_a_change_warned(tmp_path, monkeypatch, capsys):
    threads = torch.get_num_threads()
    saves = []
    real = store.save_training_state

    def killed_after_first_checkpoint(path, state):
        real(path, state)
        saves.append(state["step"])
        if state["step"] == 10:
            raise KeyboardInterrupt

    extra = ["train.checkpoint_every=10", "train.log_every=10"]
    monkeypatch.setattr(store, "save_training_state", killed_after_first_checkpoint)
    torch.set_num_threads(1)
    try:
        with pytest.raises(KeyboardInterrupt):
            fast_run(tmp_path, steps=30, extra=extra)
        monkeypatch.setattr(store, "save_training_state", real)
        torch.set_num_threads(2)
        resumed = fast_run(tmp_path, steps=30, extra=extra)
    finally:
        torch.set_num_threads(threads)
    assert resumed.outcome == "resumed" and "ran with 1: the metrics will not match" in capsys.readouterr().err
    assert [(s["from_step"], s["threads"]) for s in resumed.metrics["provenance"]["train_segments"]] == \
        [(0, 1), (10, 2)]


def test_thread_change_warning_text(tmp_path, capsys):
    from iclbench.rundir import OpenRun, RunDir
    from iclbench.trainer import TrainingState

    cfg = resolve(get_registry(), task="affine", model="gpt1l", overrides=FAST)
    run = OpenRun(RunDir(tmp_path), cfg, get_registry(), torch.device("cpu"), None, None)
    run.earlier = TrainingState(step=10, device="cpu", log_offset=0, segments=[{"from_step": 0, "threads": 97}])
    (tmp_path / store.LOG).write_text("")
    run.start()
    run.log.close()
    err = capsys.readouterr().err
    assert f"with {torch.get_num_threads()} torch threads, but its steps up to 10 ran with 97" in err
    assert run.segments[-1] == {"from_step": 10, "threads": torch.get_num_threads(), "device": "cpu"}


def test_sweep_keeps_a_runs_thread_count(tmp_path):
    from iclbench.sweep import load_experiment, run_threads

    exp = tmp_path / "exp.yaml"
    exp.write_text(f"base: {{task: affine, model: gpt1l, out: {tmp_path / 'a'}}}\nruns: [{{seed: 0}}]\n")
    plan = load_experiment(exp, out=str(tmp_path / "b")).runs[0]
    assert plan.run_dir.parent == tmp_path / "b"  # --out overrides base.out, as documented
    assert run_threads(plan, 4) == 4
    store.write_json(plan.run_dir / store.STATUS, {"status": "running", "threads": 1})
    assert run_threads(plan, 4) == 1


# --- damaged results: skipped with a warning naming the file --------------------------------------------------

def _fifo(path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


DAMAGE = {
    "status-null": lambda d: ((d / store.METRICS).unlink(), (d / store.STATUS).write_text("null")),
    "status-list": lambda d: ((d / store.METRICS).unlink(), (d / store.STATUS).write_text("[1, 2]")),
    "metrics-null": lambda d: (d / store.METRICS).write_text("null"),
    "metrics-list": lambda d: (d / store.METRICS).write_text("[]"),
    "metrics-truncated": lambda d: (d / store.METRICS).write_text((d / store.METRICS).read_text()[:500]),
    "summary-list": lambda d: (d / store.METRICS).write_text(json.dumps(
        {**json.loads((d / store.METRICS).read_text()), "summary": [1]})),
    "no-curves": lambda d: (d / store.METRICS).write_text(json.dumps(
        {k: v for k, v in json.loads((d / store.METRICS).read_text()).items() if k != "curves"})),
    "no-train": lambda d: (d / store.METRICS).write_text(json.dumps(
        {k: v for k, v in json.loads((d / store.METRICS).read_text()).items() if k != "train"})),
    "metrics-fifo": lambda d: _fifo(d / store.METRICS),
    "empty-probe-csv": lambda d: ((d / "probes").mkdir(), (d / "probes" / "layer_lens.csv").write_text("")),
    "probes-json-list": lambda d: (d / "probes.json").write_text("[]"),
    "probes-json-truncated": lambda d: (d / "probes.json").write_text('{"probes": {"specialization": {"su'),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_every_reader_skips_a_damaged_run_with_a_warning(complete, tmp_path, kind):
    from iclbench.probing import collect_probe
    from iclbench.rundir import RunDir
    from iclbench.report import build_report

    results = tmp_path / "results"
    good = shutil.copytree(complete, results / complete.name)
    bad = shutil.copytree(complete, results / ("zz-" + complete.name))
    metrics = json.loads((bad / store.METRICS).read_text())  # another seed: not a copy of good, counted once
    (bad / store.METRICS).write_text(json.dumps({**metrics, "seed": metrics["seed"] + 1}))
    DAMAGE[kind](bad)
    warnings = []
    table = collect(results, warn=warnings.append)  # leaderboard (never blocks on a FIFO)
    assert set(table.run) <= {str(good), str(bad)} and str(good) in set(table.run)
    if str(bad) not in set(table.run):
        assert any(str(bad) in w for w in warnings), warnings
    collect_probe(results, "specialization", warn=warnings.append)  # specialization
    md, _ = build_report([good, bad] if kind in ("no-curves", "no-train", "empty-probe-csv") else [good],
                         tmp_path / "report", results)  # report
    assert complete.name in md.read_text()
    if kind.startswith("probes-json"):  # iclbench probe: what it just computed is stored, not lost
        record = RunDir(bad).save_probes({"p": {"summary": {"x": 1}}})
        assert record["probes"] == {"p": {"summary": {"x": 1}}}


def test_truncated_weights_and_missing_log_are_one_line_or_a_fresh_start(complete, tmp_path, capsys):
    run_dir = shutil.copytree(complete, tmp_path / "out" / complete.name)
    weights = run_dir / store.CHECKPOINT
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ICLBenchError, match="looks complete but cannot be read"):
        fast_run(tmp_path / "out")
    with pytest.raises(ICLBenchError, match="damaged weights"):
        load_run(run_dir)  # iclbench probe
    (run_dir / store.METRICS).unlink()
    (run_dir / store.LOG).unlink()
    store.save_training_state(run_dir / store.TRAIN_STATE, {"step": 5, "device": "cpu", "log_offset": 10})
    assert fast_run(tmp_path / "out").outcome == "trained"  # resume without its log: afresh, warned
    assert "train.log" in capsys.readouterr().err
    (run_dir / store.METRICS).unlink()
    (run_dir / store.TRAIN_STATE).write_bytes(b"\x00garbage")
    assert fast_run(tmp_path / "out").outcome == "trained"
    assert f"damaged checkpoint {run_dir / store.TRAIN_STATE}" in capsys.readouterr().err


# --- report escapes names ---------------------------------------------------------------------------------

def test_report_html_escapes_every_name(tmp_path):
    import pandas as pd

    from iclbench.report import Document

    doc = Document(tmp_path, 'r <script>alert(1)</script>')
    name = 'x" onerror="alert(1)'
    doc.heading(name)
    doc.text(name)
    doc.table(pd.DataFrame({"run": ["<img src=x onerror=alert(1)>"]}))
    doc.blocks.append(("figure", (f"figures/{name}-error.png", name)))
    page = doc.html()
    assert "<script>" not in page and 'onerror="' not in page and "<img src=x" not in page


# --- absurd results, divergence's cause ---------------------------------------------------------------------

def test_an_absurd_run_is_flagged_and_kept_off_the_leaderboard(tmp_path):
    from test_leaderboard import fake_run

    fake_run(tmp_path, "affine", "gpt3l", 0, 0.01)
    fake_run(tmp_path, "affine", "gpt3l", 1, 2.0e7, model_cfg="m2")
    nan = fake_run(tmp_path, "affine", "gpt3l", 2, 0.02, model_cfg="m3") / store.METRICS
    nan.write_text(nan.read_text().replace('"mean": 0.02', '"mean": NaN'))
    warnings = []
    table = collect(tmp_path, warn=warnings.append)
    assert set(table[table.kind == "model"].seed) == {0}
    assert sum("unstable" in w for w in warnings) == 2
    assert set(collect(tmp_path, warn=warnings.append, include_unstable=True).seed) == {0, 1, 2}
    assert store.unstable_reason({"summary": {"model": {"mean": 3.0}}}) is None


def test_a_non_finite_option_is_named_not_blamed_on_the_learning_rate(tmp_path, monkeypatch):
    with pytest.raises(ICLBenchError, match=r"task.noise=nan must be numbers, got NaN") as info:
        fast_run(tmp_path, extra=["task.noise=.nan"])
    assert "train.lr" not in str(info.value)
    # an infinite option that reaches training: the divergence message names it instead of the lr
    monkeypatch.setattr(runner, "check_plugins", lambda *a: None)  # the contracts would refuse inf first
    with pytest.raises(TrainingDiverged, match=r"likely cause: non-finite option\(s\) task.noise=inf, not the lea"):
        fast_run(tmp_path, extra=["task.noise=.inf"])


# --- one line for input that deserves one --------------------------------------------------------------------

def _main(capsys, *argv):
    code = cli_module.main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_hostile_inputs_get_one_line(tmp_path, capsys):
    from test_leaderboard import fake_run

    (tmp_path / "deep.yaml").write_text("[" * 20000)
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "file").write_text("")
    fake_run(tmp_path / "res", "affine", "gpt3l", 0, 0.01)
    cases = [
        (["run", "--task", "affine", "--model", "gpt1l", "--seed", str(2 ** 63)], "seed must be an integer"),
        (["run", "--task", "affine", "--model", "gpt1l", "--set", "out=[1]"], "out must be a directory name"),
        (["run", "--task", "affine", "--model", "gpt1l", "--set", "model.d_model=4000000"], "at most 65,536"),
        # within every size bound, still far more memory than any machine has (weights of ~2 * 10^13 parameters)
        (["run", "--task", "affine", "--model", "gpt1l", "--set", "model.n_layers=256", "--set",
          "model.d_model=65536", "--set", "model.d_mlp=262144"], "GiB"),
        (["run", "--task", "affine", "--model", "gpt1l", "--set", "train.batch_size=10000000000"],
         "at most 1,000,000"),
        (["run", "--config", str(tmp_path / "deep.yaml")], "nested too deeply"),
        (["run", "--config", str(tmp_path / "binary.yaml")], "not UTF-8"),
        (["sweep", str(tmp_path / "deep.yaml"), "--dry-run"], "nested too deeply"),
        (["sweep", str(tmp_path / "binary.yaml"), "--dry-run"], "not UTF-8"),
        (["leaderboard", "--results", str(tmp_path / "res"), "--from", "99"], "past the last scored position"),
        (["report", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "file")], "not a directory"),
    ]
    for argv, message in cases:
        code, err = _main(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert "internal error" not in err


def test_unreachable_ray_address_fails_fast_with_one_line():
    from iclbench.sweep import check_reachable

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ICLBenchError, match="cannot connect to the Ray cluster"):
        check_reachable(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(ICLBenchError, match="expected HOST:PORT"):
        check_reachable("nonsense")
    assert time.monotonic() - started < 10
