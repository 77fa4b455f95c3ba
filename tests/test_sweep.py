"""Sweeps: experiment files validated up front with file and line; runs in parallel locally and on Ray;
complete runs are skipped, failures recorded, and a sweep killed midway loses and repeats nothing."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import yaml

from conftest import ROOT, cli, read_pty, tiny_run
from iclbench.errors import ICLBenchError
from iclbench.leaderboard import collect
from iclbench.sweep import load_experiment, run_sweep

TINY_BASE = tiny_run(eval__probes=False)


def experiment(tmp_path, out, *, steps=20, grid=None, runs=None, name="exp"):
    spec = {"name": name, "base": {"task": "affine", "model": "gpt3l", "train.steps": steps, "out": str(out),
                                   **TINY_BASE}}
    if grid:
        spec["grid"] = grid
    if runs:
        spec["runs"] = runs
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --- experiment files ----------------------------------------------------------------------------------------

def test_runs_list_crossed_with_grid_over_base(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("""
base:
  task: {name: affine, noise: 0.05}
  model: {name: gpt3l, d_model: 32}
  train: {steps: 7}
runs:
  - {model.n_layers: 1}
  - {model.n_layers: 2, task.noise: 0.2}
grid:
  seed: [0, 1]
  model.d_model: [16, 32]
""")
    exp = load_experiment(path, out=str(tmp_path / "r"))
    assert exp.name == "e" and len(exp.runs) == 8
    got = [(r.config.model_options.n_layers, r.config.task_options.noise, r.config.seed,
            r.config.model_options.d_model) for r in exp.runs]
    assert got == [(1, 0.05, 0, 16), (1, 0.05, 0, 32), (1, 0.05, 1, 16), (1, 0.05, 1, 32),
                   (2, 0.2, 0, 16), (2, 0.2, 0, 32), (2, 0.2, 1, 16), (2, 0.2, 1, 32)]
    assert all(r.config.train.steps == 7 and r.config.out == str(tmp_path / "r") for r in exp.runs)
    assert exp.runs[0].label == "model.n_layers=1, seed=0, model.d_model=16"


def test_grid_points_that_resolve_to_one_run_are_merged(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("base: {task: affine, model: gpt3l}\ngrid:\n  task.noise: [0, 0.0, 0.1]\n")
    exp = load_experiment(path)
    assert len(exp.runs) == 2 and exp.duplicates == 1


def test_reference_experiment_is_valid():
    exp = load_experiment(ROOT / "experiments" / "reference.yaml")
    assert len(exp.runs) == 24 and {r.config.model_options.n_layers for r in exp.runs} == {1, 2, 3, 6}


#: the converged study's parts (issue 24): runs per part; the CPU and GPU halves of scale and pool together make
#: width 32/128/256 x depth 2/3/6 x 2 tasks and K = 1...1024 x 2 tasks, 10 seeds each
CONVERGED = {"affine": 60, "recurrences": 200, "priors": 30, "regression": 160, "scale": 60, "scale-gpu": 120,
             "pool": 60, "pool-linreg": 60, "gpt12l": 100}


def test_every_shipped_experiment_file_is_valid():
    for path in sorted((ROOT / "experiments").rglob("*.yaml")):
        exp = load_experiment(path)
        assert exp.runs, path
        if path.parent.name == "converged":
            assert len(exp.runs) == CONVERGED[path.stem], path
            assert next(iter(yaml.safe_load(path.read_text())["grid"])) == "seed", path  # a stopped part: low seeds


BASE = "base: {task: affine, model: gpt3l}\n"


@pytest.mark.parametrize("text,message", [
    ("grdi:\n  seed: [0]\n", "line 1: unknown key 'grdi' in the experiment file (did you mean 'grid'?)"),
    (BASE + "grid:\n  seed: 3\n", "line 3: grid seed: expected a non-empty list of values"),
    (BASE + "grid:\n  seed: [0]\n  seed: [1]\n", "line 4: key 'seed' in grid is written twice (first on line 3)"),
    (BASE + "grid:\n  seed: [0, 1]\n  model.n_layer: [1, 2]\n",
     "line 4 (grid model.n_layer: 1): unknown key 'model.n_layer' (did you mean 'n_layers'"),
    (BASE + "grid:\n  model.n_layers:\n    - 2\n    - 0\n",
     "line 5 (grid model.n_layers: 0): model: n_layers must be >= 1, got 0"),
    (BASE + "grid:\n  model.d_model: [fast]\n", "line 3 (grid model.d_model: 'fast'): model.d_model: expected int"),
    ("base: {model: gpt3l}\nruns:\n  - {task: affine}\n  - {task: afine}\n",
     "line 4 (runs[1] task: 'afine'): unknown task 'afine' (did you mean 'affine'"),
    (BASE + "runs:\n  - {seed: 1}\ngrid:\n  seed: [0]\n",
     "line 3: runs[0] sets 'seed', which the grid also sets (line 5)"),
    (BASE + "grid:\n  out: [a, b]\n", "line 3: 'out' may be set only in base"),
    (BASE + "grid:\n  trian.steps: [1]\n", "line 3: unknown key 'trian.steps' in grid (did you mean 'train'?)"),
    (BASE + "grid:\n  seed: [0\n", "malformed YAML in"),
    (BASE, "has neither 'grid' nor 'runs'"),
])
def test_bad_experiment_names_key_and_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ICLBenchError) as info:
        load_experiment(path)
    assert str(info.value).startswith(str(path)) or str(info.value).startswith("malformed YAML in")
    assert message in str(info.value)


@pytest.mark.slow
def test_cli_bad_experiment_is_one_line_and_nonzero(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + "grid:\n  model.n_heads: [3]\n")
    out = cli("sweep", str(path), "--dry-run")
    assert out.returncode == 2 and out.stdout == ""
    # the dry run lists each invalid run in one line, then one error line (docs/usage.md, Sweeps)
    assert out.stderr.strip().splitlines() == [
        f"iclbench: invalid run: {path} line 3 (grid model.n_heads: 3): model: d_model (64) must be divisible by "
        "n_heads (3)",
        f"iclbench: error: 1 invalid run(s) in {path} (listed above); fix them before running the sweep"]


def test_only_narrows_a_sweep_to_the_runs_it_names_and_a_pattern_matching_none_is_one_line(tmp_path):
    """One cell of a study part, by the names the part gives its runs, with no hand-made file whose names could
    drift from the part's."""
    path = experiment(tmp_path, tmp_path / "results", grid={"seed": [0, 1, 2, 3]}, runs=[{"task": "affine"},
                                                                                         {"task": "linrec"}])
    names = [p.name for p in load_experiment(path).runs]
    keep = [n for n in names if n.startswith("linrec-") and n[-1] in "13"]
    assert [p.name for p in load_experiment(path).only(["linrec-*-s[13]"]).runs] == keep
    assert len(load_experiment(path).only(["*-s0", "*-s1"]).runs) == 4  # repeated: the union
    out = cli("sweep", str(path), "--dry-run", "--only", "linrec-*-s[13]")
    assert out.returncode == 0 and [n for n in names if n in out.stdout] == keep
    out = cli("sweep", str(path), "--dry-run", "--only", "poly-*")
    assert out.returncode == 2 and out.stdout == "" and out.stderr.strip().splitlines() == [
        f"iclbench: error: {path}: no run matches --only 'poly-*'; its runs are named like {names[0]}, "
        f"{names[1]}, ... (--dry-run lists them)"]


# --- running: local process pool ----------------------------------------------------------------------------

GOOD_AND_BROKEN = [{"seed": 0}, {"seed": 1}, {"seed": 2, "device": "cuda:99"}]  # cuda:99 exists nowhere


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    exp = load_experiment(experiment(tmp, tmp / "results", runs=GOOD_AND_BROKEN))
    return exp, run_sweep(exp, "local", jobs=2, cpus_per_run=1, progress=False)


@pytest.mark.slow
def test_local_sweep_runs_everything_and_records_the_failure(local_sweep):
    exp, report = local_sweep
    good, broken = exp.runs[:2], exp.runs[2]
    assert sorted(report.ran) == sorted(r.name for r in good) and report.skipped == []
    assert list(report.failed) == [broken.name] and "cuda:99" in report.failed[broken.name]
    assert all(r.is_complete() for r in good) and not broken.is_complete()
    status = json.loads((broken.run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "cuda:99" in status["message"]
    record = json.loads(report.record_path.read_text())["runs"]
    assert [record[r.name]["state"] for r in exp.runs] == ["ran", "ran", "failed"]
    table = collect(exp.out, warn=lambda msg: None)
    assert sorted(table[table.kind == "model"].seed) == [0, 1]
    assert "2 ran, 0 skipped (already complete), 1 failed" in report.summary()


@pytest.mark.slow
def test_rerun_skips_complete_runs_and_retries_failed_ones(local_sweep):
    exp, _ = local_sweep
    before = {r.name: (r.run_dir / "metrics.json").stat().st_mtime_ns for r in exp.runs[:2]}
    again = run_sweep(load_experiment(exp.path), "local", jobs=1, cpus_per_run=1, progress=False)
    assert sorted(again.skipped) == sorted(before) and again.ran == [] and list(again.failed) == [exp.runs[2].name]
    assert before == {r.name: (r.run_dir / "metrics.json").stat().st_mtime_ns for r in exp.runs[:2]}


@pytest.mark.slow  # kill -9 of a sweep
def test_sweep_killed_midway_continues_where_it_stopped(tmp_path):
    out = tmp_path / "results"
    path = experiment(tmp_path, out, steps=30, grid={"seed": list(range(4))})
    args = ["sweep", str(path), "--jobs", "1", "--cpus-per-run", "1", "--quiet"]
    cmd = [sys.executable, "-m", "iclbench.cli", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*/metrics.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, as a cluster scheduler would
        proc.communicate()
    done = {p.parent.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*/metrics.json")}
    assert 1 <= len(done) < 4, f"kill landed at {len(done)} of 4 runs"

    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert f"4 runs: {4 - len(done)} ran, {len(done)} skipped (already complete), 0 failed" in again.stdout
    exp = load_experiment(path)
    assert all(r.is_complete() for r in exp.runs)
    for name, (mtime, content) in done.items():  # nothing redone, nothing lost
        metrics = out / name / "metrics.json"
        assert metrics.stat().st_mtime_ns == mtime and metrics.read_bytes() == content


@pytest.mark.slow  # a real sweep, a real signal to its process group (as a terminal sends), and its rerun
@pytest.mark.parametrize("sig", ["SIGINT", "SIGHUP"])
def test_signal_marks_the_run_in_flight_interrupted_and_the_rerun_resumes_it(tmp_path, sig):
    """Ctrl-C and a closed terminal reach the driver and its workers alike: the run in flight is marked
    interrupted (not left "running" with a dead pid), the record says so, and the rerun continues it from its
    checkpoint, not from step 0; output that is not a terminal gets no progress-bar redraws."""
    out = tmp_path / "results"
    path = experiment(tmp_path, out, steps=400, grid={"seed": [0]})
    spec = yaml.safe_load(path.read_text())
    spec["base"].update({"train.checkpoint_every": 10, "train.log_every": 10})
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    args = ["sweep", str(path), "--jobs", "1", "--cpus-per-run", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "iclbench.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*/train_state.pt")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the sweep ended before its first checkpoint"
        os.killpg(proc.pid, getattr(signal, sig))
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr
    run_dir, = [p.parent for p in out.glob("*/status.json")]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and sig in status["message"], status
    step = status["resumes_from_step"]
    assert isinstance(step, int) and 10 <= step < 400 and step % 10 == 0
    assert "1 interrupted (stopped by " in stdout and f"continues from its checkpoint at step {step}" in stdout
    record = json.loads((out / ".sweeps" / "exp.json").read_text())
    assert record["runs"][run_dir.name]["state"] == "interrupted" and sig in record["interrupted_by"]
    assert "Traceback" not in stderr, stderr

    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert "1 ran, 0 skipped" in again.stdout and "\r" not in again.stderr  # a log, not a redrawn bar
    assert f"[1/1] ran {run_dir.name} (seed=0) in " in again.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["resumed_from_step"] == step
    events = [json.loads(line) for line in (run_dir / "train.log").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [step]


@pytest.mark.slow  # a real `iclbench run` and a real signal
def test_a_closed_terminal_marks_a_single_run_interrupted(tmp_path):
    """`iclbench run` (not a sweep) under SIGHUP: the run says interrupted, with the step its rerun continues
    from, and the command exits 130 with one line (no traceback)."""
    from conftest import sets

    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "iclbench.cli", "run", "--task", "affine", "--model", "gpt3l", "--steps", "2000",
           "--out", str(out), *sets(tiny_run(cheap=True, train__checkpoint_every=10))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*/train_state.pt")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGHUP)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130 and stderr.strip().splitlines() == [
        "iclbench: interrupted by SIGHUP (the terminal closed); rerun the same command to continue from the latest "
        "checkpoint"], stderr
    status = json.loads(next(out.glob("*/status.json")).read_text())
    assert status["status"] == "interrupted" and status["resumes_from_step"] >= 10, status


@pytest.mark.parametrize("sig", ["SIGINT", "SIGHUP", "SIGTERM"])
def test_the_local_pool_forwards_the_drivers_signal_to_its_live_workers(monkeypatch, sig):
    """A worker records whichever interrupting signal it handles first, so the driver forwards the one it got
    (not always SIGINT): a closed terminal is named SIGHUP however the two signals race."""
    from iclbench import sweep

    class Process:
        def __init__(self, pid, alive):
            self.pid, self.alive = pid, alive

        def is_alive(self):
            return self.alive

    sent = []
    monkeypatch.setattr(sweep.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    executor = object.__new__(sweep.LocalExecutor)  # no real pool: only its processes are read
    executor.pool = types.SimpleNamespace(_processes={1: Process(101, True), 2: Process(102, False)})
    executor.interrupt([], sig)
    assert sent == [(101, getattr(signal, sig))]


@pytest.mark.parametrize("sig", [None, "SIGHUP"])
@pytest.mark.parametrize("stack", [False, True])
def test_an_interrupted_sweep_records_each_run_and_never_waits_forever(tmp_path, monkeypatch, stack, sig):
    """The driver's side of Ctrl-C (a plain KeyboardInterrupt) and of a closed terminal: the job in flight is
    told, by the signal the driver got, a job that does not answer within the grace period is stopped (closing
    the pool cannot hang) and each of its runs (every seed of a stacked job) recorded interrupted, the rest not
    run."""
    from iclbench import sweep
    from iclbench.errors import Interrupted

    class Pool:  # one slot; its run never answers
        ships_files, calls = False, []

        def submit(self, job):
            return job[0].name

        def wait(self, handles, timeout):
            if not self.calls:
                self.calls.append("wait")
                raise Interrupted(sig) if sig else KeyboardInterrupt
            time.sleep(min(timeout, 0.05))
            return []

        def interrupt(self, handles, signame):
            self.calls.append(("interrupt", tuple(handles), signame))

        def terminate(self):
            self.calls.append("terminate")

        def close(self):
            self.calls.append("close")

    pool = Pool()
    monkeypatch.setattr(sweep, "_start_executor", lambda *a: (pool, 1, "fake"))
    monkeypatch.setattr(sweep, "INTERRUPT_GRACE", 0.2)
    exp = load_experiment(experiment(tmp_path, tmp_path / "results", grid={"seed": [0, 1, 2]}))
    report = run_sweep(exp, progress=False, stack=stack)
    names = [r.name for r in exp.runs]
    first, in_flight, rest = names[0], names if stack else names[:1], [] if stack else names[1:]
    assert pool.calls == ["wait", ("interrupt", (first,), sig or "SIGINT"), "terminate", "close"]
    assert report.interrupted == dict.fromkeys(in_flight) and report.not_run == rest
    assert report.signal == ("SIGHUP (the terminal closed)" if sig else "Ctrl-C (SIGINT)")
    assert f"interrupted {first}: no checkpoint yet: the rerun starts it afresh" in report.summary()
    record = json.loads(report.record_path.read_text())
    assert [record["runs"][n]["state"] for n in names] == ["interrupted"] * len(in_flight) + \
        ["not run (interrupted)"] * len(rest)
    assert record["interrupted_by"] == report.signal


def test_two_sweeps_of_one_name_each_keep_their_runs_in_the_record(tmp_path, monkeypatch):
    """Two sweep files of one experiment name (or one file run twice at once) write one record file: each
    writes its own runs' states into it and keeps the other's, instead of the last writer replacing them."""
    from iclbench import sweep

    class Pool:  # every run fails at once
        ships_files = False

        def submit(self, job):
            return job[0].name

        def wait(self, handles, timeout):
            return handles

        def result(self, handle):
            return sweep.Outcome(error="boom", wall_s=0.0)

        def close(self):
            pass

    monkeypatch.setattr(sweep, "_start_executor", lambda *a: (Pool(), 1, "fake"))
    out = tmp_path / "results"
    for folder in "ab":
        (tmp_path / folder).mkdir()
    first = load_experiment(experiment(tmp_path / "a", out, grid={"seed": [0, 1]}))
    second = load_experiment(experiment(tmp_path / "b", out, grid={"seed": [2]}))
    run_sweep(first, progress=False, stack=False)
    report = run_sweep(second, progress=False, stack=False)
    record = json.loads(report.record_path.read_text())
    assert {name: run["state"] for name, run in record["runs"].items()} == \
        dict.fromkeys([r.name for r in first.runs + second.runs], "failed")
    assert record["experiment"] == str(second.path)  # the top-level keys: the last writer's
    assert not (out / ".sweeps" / ".lock").exists()


def test_progress_on_a_terminal_shows_done_running_failed_and_eta():
    import io

    from iclbench.sweep import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    class Plan:
        name, label = "affine-gpt3l-0-s0", "seed=0"

    screen = Terminal()
    shown = Progress(3, True, stream=screen)
    shown.update(2)
    shown.finished(Plan(), None, 1.0, 1)
    shown.finished(Plan(), "boom", 1.0, 0)
    shown.close()
    last = screen.getvalue().split("\r")[-1]
    assert "2/3 runs done, 0 running, 1 failed" in last and "ETA" in last and "elapsed" in last
    assert "failed affine-gpt3l-0-s0 (seed=0): boom" in screen.getvalue()

    # stderr a real terminal that reports no size (0 x 0: a fresh pty, some IDE and remote terminals), where
    # tqdm's own sizing hid the bar (issue 26: "silent in a terminal")
    master, slave = os.openpty()
    with open(slave, "w", closefd=True) as tty:
        assert tuple(os.get_terminal_size(tty.fileno())) == (0, 0)
        real, sys.stderr = sys.stderr, tty
        try:
            shown = Progress(3, True)
            shown.update(1)
            shown.close()
        finally:
            sys.stderr = real
        tty.flush()
        seen = read_pty(master, "0/3 runs done, 1 running, 0 failed")
    os.close(master)
    assert "0/3 runs done, 1 running, 0 failed" in seen, seen

    log = io.StringIO()  # not a terminal: one line per finished run, no redraws
    shown = Progress(2, True, stream=log)
    shown.update(1)
    shown.finished(Plan(), None, 1.25, 0)
    shown.close()
    assert log.getvalue() == "[1/2] ran affine-gpt3l-0-s0 (seed=0) in 1.2s\n"


def test_local_threads_follow_the_environment(monkeypatch):
    from iclbench.sweep import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads(cores=8, jobs=1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(cores=8, jobs=None) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads(cores=8, jobs=2) == 4 and default_threads(cores=8, jobs=None) == 1


# --- running: Ray ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.mark.slow  # a local Ray cluster
def test_ray_workers_return_results_and_the_driver_records_them(ray_cluster, local_sweep, tmp_path):
    exp = load_experiment(experiment(tmp_path, tmp_path / "results", runs=GOOD_AND_BROKEN))
    report = run_sweep(exp, "ray", progress=False)
    assert sorted(report.ran) == sorted(r.name for r in exp.runs[:2])
    assert list(report.failed) == [exp.runs[2].name] and "cuda:99" in report.failed[exp.runs[2].name]
    local_exp, _ = local_sweep
    for ray_run, local_run in zip(exp.runs[:2], local_exp.runs[:2]):
        files = sorted(p.relative_to(ray_run.run_dir) for p in ray_run.run_dir.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(local_run.run_dir) for p in local_run.run_dir.rglob("*") if p.is_file())
        assert {"config.yaml", "metrics.json", "model.safetensors", "train.log"} <= {str(f) for f in files}
        # the worker computed in a temporary directory; the stored config names the driver's results
        assert yaml.safe_load((ray_run.run_dir / "config.yaml").read_text())["out"] == str(tmp_path / "results")
        # one torch thread in either executor: the same numbers
        ray_metrics = json.loads((ray_run.run_dir / "metrics.json").read_text())
        local_metrics = json.loads((local_run.run_dir / "metrics.json").read_text())
        assert ray_metrics["summary"] == local_metrics["summary"]

    # a second driver joins the running cluster by address: complete runs are skipped, the broken one retried
    again = cli("sweep", str(exp.path), "--executor", "ray", "--address", ray_cluster, "--quiet", timeout=120)
    assert again.returncode == 1, again.stderr
    assert "3 runs: 0 ran, 2 skipped (already complete), 1 failed" in again.stdout


# --- seeds stacked into one job (--stack) ---------------------------------------------------------------------

def test_stack_groups_the_seeds_of_each_config_into_one_job(tmp_path):
    """``--stack yes``: runs that differ only in seed are one job; a config whose seeds train on pools of
    rules of their own is run seed by seed, said once; ``auto`` stacks where the seeds' device is a GPU."""
    from iclbench.sweep import plan_jobs, plan_table

    path = experiment(tmp_path, tmp_path / "results", runs=[{"model.n_layers": 1}, {"model.n_layers": 2},
                                                           {"model.n_layers": 1, "task.pool": 4}],
                      grid={"seed": [0, 1, 2]})
    exp = load_experiment(path)
    one, two, pooled = exp.runs[:3], exp.runs[3:6], exp.runs[6:]
    jobs, notes = plan_jobs(exp.runs, True)
    assert jobs == [one, two] + [[p] for p in pooled]
    assert len(notes) == 1 and "task.pool > 0" in notes[0] and pooled[0].name[:-3] in notes[0]
    assert plan_jobs(exp.runs, False) == ([[p] for p in exp.runs], [])
    # a group with seeds already complete: the missing ones stacked, or alone when one is left
    assert plan_jobs(one[1:], True)[0] == [one[1:]] and plan_jobs(one[2:], True)[0] == [one[2:]]
    # auto: a Ray worker that gets a GPU stacks (device auto); one without, or a CPU here, does not
    assert plan_jobs(one, None, "ray", gpus_per_run=1)[0] == [one]
    assert plan_jobs(one, None, "ray", gpus_per_run=0)[0] == [[p] for p in one]
    cpu = load_experiment(experiment(tmp_path, tmp_path / "results", grid={"seed": [0, 1], "device": ["cpu"]},
                                     name="cpu"))
    assert plan_jobs(cpu.runs, None)[0] == [[p] for p in cpu.runs]
    table = plan_table(exp, jobs=jobs).splitlines()
    assert [line for line in table if line.startswith("stacked job")] == [
        f"stacked job: {one[0].name[:-3]} (model.n_layers=1): seeds 0, 1, 2 trained together",
        f"stacked job: {two[0].name[:-3]} (model.n_layers=2): seeds 0, 1, 2 trained together"]


STACK_RUN = tiny_run(cheap=True, train__checkpoint_every=10, train__log_every=10)


def _configs(tmp_path, seeds=(0, 1, 2)):
    from iclbench.config import resolve
    from iclbench.registry import get_registry

    return [resolve(get_registry(), task="affine", model="gpt3l", steps=20, seed=s, device="cpu",
                    out=str(tmp_path), overrides=STACK_RUN).to_dict() for s in seeds]


def test_a_stacked_job_reports_each_seed_and_ships_each_seeds_files(tmp_path, seed_1_diverges_at_step_7):
    """A seed of a stacked job that diverges is a failure of its own; the others complete. With shipped files
    (the Ray worker's way) each seed's files come back apart."""
    import torch

    from iclbench import store
    from iclbench.sweep import compute_job

    outcomes = compute_job(_configs(tmp_path), torch.get_num_threads(), ship_files=True)
    assert [o.error is None for o in outcomes] == [True, False, True]
    assert outcomes[1].error.startswith("training diverged at step 7") and outcomes[1].interrupted is None
    assert all(store.METRICS in o.files for o in (outcomes[0], outcomes[2])) and store.METRICS not in outcomes[1].files
    assert json.loads(outcomes[1].files[store.STATUS])["status"] == "diverged"
    assert not list(tmp_path.iterdir())  # computed elsewhere: the driver stores the files


def test_an_interrupted_stacked_job_marks_every_seed_interrupted_and_resumes(tmp_path, monkeypatch):
    import torch

    from iclbench import stacked, store
    from iclbench.sweep import compute_job

    real, calls = stacked.StackedSeeds.step, {"n": 0}

    def interrupted_at_step_15(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(stacked.StackedSeeds, "step", interrupted_at_step_15)
    outcomes = compute_job(_configs(tmp_path, (0, 1)), torch.get_num_threads())
    assert [o.interrupted for o in outcomes] == ["Ctrl-C (SIGINT)"] * 2
    dirs = sorted(tmp_path.iterdir())
    assert [(store.read_json(d / store.STATUS)["status"], store.read_json(d / store.STATUS)["resumes_from_step"])
            for d in dirs] == [("interrupted", 10)] * 2
    again = compute_job(_configs(tmp_path, (0, 1)), torch.get_num_threads())  # seed by seed, from step 10
    assert [o.error for o in again] == [None, None]
    assert [store.read_run(d)["train"]["resumed_from_step"] for d in dirs] == [10, 10]


@pytest.mark.slow  # three small sweeps, each in a worker process
def test_a_stacked_sweep_writes_the_runs_of_separate_ones_and_trains_only_missing_seeds(tmp_path, capsys):
    """``--stack yes`` against ``--stack no``: the same run directories and status files, metrics within the
    tolerance of stacked against separate runs (tests/test_stacked.py); a seed already complete is skipped and
    the two missing ones are trained stacked, each with its own progress line and record."""
    from iclbench import store

    stacked_out, separate_out = tmp_path / "stacked", tmp_path / "separate"
    first = run_sweep(load_experiment(experiment(tmp_path, stacked_out, grid={"seed": [0]}, name="first")),
                      jobs=1, cpus_per_run=1, progress=False, stack=True)
    assert len(first.ran) == 1
    capsys.readouterr()
    exp = load_experiment(experiment(tmp_path, stacked_out, grid={"seed": [0, 1, 2]}, name="all"))
    report = run_sweep(exp, jobs=1, cpus_per_run=1, stack=True)
    err = capsys.readouterr().err
    assert report.skipped == [exp.runs[0].name] and report.ran == [r.name for r in exp.runs[1:]]
    assert "3 runs: 1 already complete, 2 to run, 2 of them as 1 stacked job(s)" in err
    assert [line.split(" in ")[0] for line in err.splitlines() if line.startswith("[")] == [
        f"[{i}/2] ran {r.name} ({r.label})" for i, r in enumerate(exp.runs[1:], 1)]
    record = json.loads(report.record_path.read_text())["runs"]
    assert [record[r.name]["state"] for r in exp.runs] == ["skipped", "ran", "ran"]
    separate = run_sweep(load_experiment(experiment(tmp_path, separate_out, grid={"seed": [0, 1, 2]}, name="sep")),
                         jobs=1, cpus_per_run=1, progress=False, stack=False)
    assert len(separate.ran) == 3
    files = {out: sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and ".sweeps" not in p.parts)
             for out in (stacked_out, separate_out)}
    assert files[stacked_out] == files[separate_out]
    for run in exp.runs:
        m1, m2 = store.read_run(stacked_out / run.name), store.read_run(separate_out / run.name)
        assert store.read_json(stacked_out / run.name / store.STATUS)["status"] == "complete"
        assert m1["train"].get("stacked_with") == (None if run.config.seed == 0 else 2)
        for name, s in m2["summary"].items():
            assert abs(m1["summary"][name]["mean"] - s["mean"]) <= 1e-3 * abs(s["mean"]) + 1e-6, (run.name, name)
