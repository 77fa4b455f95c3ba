"""The second hostile battery (issue 25): nothing written outside a results directory, nothing that hangs, no
internal error on a hostile input. Each test reproduces a case of benchmarks/hostile.py and fails without its
fix; each takes a few seconds at most."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from iclbench import cli as cli_module
from iclbench import store
from iclbench.errors import ICLBenchError
from iclbench.report import Document
from iclbench.rundir import RunDir


def one_line_refusal(proc, *words):
    """A non-zero exit with one line on stderr (no traceback) holding each of ``words``."""
    err = proc.stderr.strip()
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "internal error" not in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def main(capsys, *argv):
    """``iclbench ARGV`` in this process (no interpreter to start): its exit code and output."""
    code = cli_module.main(list(argv))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


# --- nothing written through a symlinked folder --------------------------------------------------------------

def test_symlinked_probes_folder_is_replaced_never_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    run_dir = tmp_path / "results" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "probes").symlink_to(outside, target_is_directory=True)
    RunDir(run_dir).save_probes({"p": {"summary": {"x": 1.0}, "table": pd.DataFrame({"a": [1, 2]})}})
    assert list(outside.iterdir()) == []
    assert not (run_dir / "probes").is_symlink() and (run_dir / "probes" / "p.csv").is_file()


def test_symlinked_figures_folder_is_replaced_never_written_through(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "report"
    out.mkdir()
    (out / "figures").symlink_to(outside, target_is_directory=True)
    doc = Document(out, "t")
    fig, _ = plt.subplots()
    doc.figure(fig, "f", "a figure")
    assert list(outside.iterdir()) == []
    assert not (out / "figures").is_symlink() and (out / "figures" / "f.png").is_file()


def test_symlinked_folder_deeper_down_and_a_file_in_the_way(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "b").symlink_to(outside, target_is_directory=True)
    store.write_atomic(root / "a" / "b" / "c" / "f.txt", "x", root=root)
    assert list(outside.iterdir()) == [] and (root / "a" / "b" / "c" / "f.txt").read_text() == "x"
    (root / "file").write_text("keep")
    with pytest.raises(ICLBenchError, match="not a directory"):
        store.write_atomic(root / "file" / "f.txt", "x", root=root)
    assert (root / "file").read_text() == "keep"


# --- sizes that drive memory or time: bounded before anything is allocated or trained ---------------------

@pytest.mark.parametrize("args, words", [
    (["--set", "model.n_layers=100000"], ["model.n_layers=100000", "at most 256"]),
    (["--set", "model.n_heads=4096", "--set", "model.d_model=8192"], ["model.n_heads=4096", "at most 1,024"]),
    (["--set", "model.d_model=1048576"], ["model.d_model", "at most 65,536"]),
    (["--set", "model.d_mlp=10000000"], ["model.d_mlp", "at most 262,144"]),
    (["--set", "eval.bootstrap=10000000000"], ["eval.bootstrap", "at most 100,000"]),
    (["--set", "eval.n_sequences=100000000"], ["eval.n_sequences", "at most 10,000,000"]),
    (["--set", "train.steps=10000000000"], ["train.steps", "at most 1,000,000,000"]),
    (["--steps", "99999999999999999999"], ["train.steps=99999999999999999999", "at most"]),
    (["--seeds", "0-99999999999"], ["--seeds", "at most 10,000"]),
    (["--seeds", "0-3", "--jobs", "0"], ["--jobs must be >= 1"]),
    (["--jobs", "0"], ["--jobs must be >= 1"]),
])
def test_sizes_are_bounded_before_anything_is_built(tmp_path, capsys, args, words):
    one_line_refusal(main(capsys, "run", "--task", "affine", "--model", "gpt1l", "--out", str(tmp_path), *args),
                     *words)
    assert not any(tmp_path.iterdir())  # refused before a run directory was made


def test_bootstrap_resamples_are_checked_against_memory(tmp_path, monkeypatch):
    from iclbench import build as build_module
    from iclbench.config import resolve
    from iclbench.registry import get_registry

    registry = get_registry()
    cfg = resolve(registry, task="affine", model="gpt1l", out=str(tmp_path),
                  overrides=["eval.bootstrap=100000", "eval.n_sequences=10000000"])
    monkeypatch.setattr(build_module, "memory_bytes", lambda device: 2 ** 34)  # 16 GiB
    with pytest.raises(ICLBenchError, match="bootstrap resamples"):
        build_module.build(registry, cfg, __import__("torch").device("cpu"))


# --- a sweep grid is counted before it is expanded --------------------------------------------------------

def test_sweep_grid_counted_before_expanding(tmp_path, capsys):
    grid = "\n".join(f"  task.{k}: [{', '.join(str(v / 100) for v in range(10))}]"
                     for k in ("a_low", "b_max", "x0_max", "noise", "a_high"))
    (tmp_path / "big.yaml").write_text("base: {task: affine, model: gpt1l}\ngrid:\n" + grid
                                       + "\n  seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n"
                                       + "  train.steps: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n")
    err = one_line_refusal(main(capsys, "sweep", str(tmp_path / "big.yaml"), "--dry-run", "--out", str(tmp_path)),
                           "10,000,000 runs", "--max-runs", "100,000")
    assert "10 × 10 × 10 × 10 × 10 × 10 × 10" in err
    (tmp_path / "small.yaml").write_text("base: {task: affine, model: gpt1l}\ngrid:\n  seed: [0, 1, 2]\n")
    one_line_refusal(main(capsys, "sweep", str(tmp_path / "small.yaml"), "--dry-run", "--max-runs", "2"),
                     "3 runs", "limit of 2")
    assert main(capsys, "sweep", str(tmp_path / "small.yaml"), "--dry-run", "--max-runs", "3").returncode == 0
    one_line_refusal(main(capsys, "sweep", str(tmp_path / "small.yaml"), "--dry-run", "--max-runs", "0"),
                     "--max-runs must be >= 1")


# --- a FIFO or a directory where a file of the run belongs: never blocks, never an internal error ----------

@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) where a reader blocks opening a FIFO."""
    import signal

    def hung(*_):
        raise TimeoutError("blocked: a reader opened a FIFO")

    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


@pytest.mark.parametrize("name", [store.CHECKPOINT, store.TRAIN_STATE])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_weights_and_training_state_readers_want_a_regular_file(tmp_path, no_hang, name, kind):
    path = tmp_path / name
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    read = store.load_state_dict if name == store.CHECKPOINT else store.load_training_state
    with pytest.raises(store.DamagedRun, match="not a regular file"):
        read(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from test_reliability import fast_run

    return fast_run(tmp_path_factory.mktemp("finished")).run_dir


def test_probe_on_a_fifo_weights_file_is_one_line(finished, tmp_path, capsys, no_hang):
    import shutil

    run_dir = tmp_path / finished.name
    shutil.copytree(finished, run_dir)
    (run_dir / store.CHECKPOINT).unlink()
    os.mkfifo(run_dir / store.CHECKPOINT)
    one_line_refusal(main(capsys, "probe", str(run_dir)), "damaged weights", "not a regular file")
    (run_dir / store.CHECKPOINT).unlink()
    (run_dir / store.CHECKPOINT).mkdir()
    one_line_refusal(main(capsys, "probe", str(run_dir)), "damaged weights", "not a regular file")


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_resume_over_a_fifo_or_directory_training_state_starts_afresh(tmp_path, capsys, no_hang, kind):
    from test_reliability import fast_run, run_dir_of

    run_dir = run_dir_of(tmp_path)
    run_dir.mkdir(parents=True)
    store.write_json(run_dir / store.STATUS, {"status": "interrupted", "message": "Ctrl-C"})
    state = run_dir / store.TRAIN_STATE
    os.mkfifo(state) if kind == "fifo" else state.mkdir()
    result = fast_run(tmp_path, resume=True)
    assert result.outcome == "trained" and state.is_file() is False and not state.exists()
    assert "damaged checkpoint" in capsys.readouterr().err


def test_a_full_directory_where_metrics_belong_is_one_line(tmp_path, capsys):
    from test_reliability import FAST, run_dir_of

    run_dir = run_dir_of(tmp_path)
    (run_dir / store.METRICS).mkdir(parents=True)
    (run_dir / store.METRICS / "keep").write_text("x")
    args = ["run", "--task", "affine", "--model", "gpt1l", "--steps", "20", "--out", str(tmp_path), "--force"]
    one_line_refusal(main(capsys, *args, *[a for item in FAST for a in ("--set", item)]),
                     "is a directory where iclbench keeps a file")
    assert (run_dir / store.METRICS / "keep").read_text() == "x"


# --- a Ray address that cannot be one -----------------------------------------------------------------------

@pytest.mark.parametrize("address, words", [("127.0.0.1:99999", ["invalid port 99999", "1 to 65535"]),
                                            ("ray://127.0.0.1:0", ["invalid port 0"]),
                                            (":6379", ["no host"])])
def test_an_impossible_ray_address_is_one_line(address, words):
    from iclbench.sweep import check_reachable

    with pytest.raises(ICLBenchError) as info:
        check_reachable(address)
    assert all(w in str(info.value) for w in words) and "\n" not in str(info.value)


# --- a key written twice in a config file ------------------------------------------------------------------

def test_a_duplicate_key_in_a_config_file_is_one_line(tmp_path, capsys):
    (tmp_path / "twice.yaml").write_text("task: affine\nmodel: gpt1l\ntask: regression\n")
    one_line_refusal(main(capsys, "run", "--config", str(tmp_path / "twice.yaml"), "--out", str(tmp_path)),
                     "line 3", "key 'task' is written twice (first on line 1)")
    (tmp_path / "nested.yaml").write_text("task: {name: affine, noise: 0.1, noise: 0.2}\nmodel: gpt1l\n")
    one_line_refusal(main(capsys, "run", "--config", str(tmp_path / "nested.yaml"), "--out", str(tmp_path)),
                     "key 'noise' is written twice")
    assert not any(p.is_dir() for p in tmp_path.iterdir())


def test_a_report_into_a_new_directory_still_writes_its_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = Document(tmp_path / "new" / "report", "t")
    fig, _ = plt.subplots()
    doc.figure(fig, "f", "a figure")
    assert (tmp_path / "new" / "report" / "figures" / "f.png").is_file()


# --- a sweep's --dry-run checks each run as the run would before training -----------------------------------

def test_sweep_dry_run_reports_each_invalid_run_in_one_line(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, whatever this one is
    (tmp_path / "e.yaml").write_text(
        "base: {task: affine, model: gpt1l, train: {steps: 2}}\n"
        "runs:\n"
        "  - {device: cuda}\n"
        "  - {model.d_model: 65536, model.d_mlp: 262144}\n"
        "  - {model.bogus: 3}\n"
        "  - {model.d_model: 99999}\n"
        "  - {seed: 7}\n")
    proc = main(capsys, "sweep", str(tmp_path / "e.yaml"), "--dry-run", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("iclbench: invalid run: ") for line in lines[:4]), lines
    assert lines[-1].startswith("iclbench: error: 4 invalid run(s)"), lines
    lines = lines[:4]
    assert any("CUDA is not available" in line for line in lines)
    assert any("GiB" in line and "model.d_model=65536" in line for line in lines)
    assert any("line 5" in line and "unknown key 'model.bogus'" in line for line in lines)
    assert any("line 6" in line and "d_model" in line for line in lines)
    assert "4 invalid" in proc.stdout and "s7  to run" in proc.stdout
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    (tmp_path / "ok.yaml").write_text("base: {task: affine, model: gpt1l}\nruns:\n  - {seed: 7}\n")
    assert main(capsys, "sweep", str(tmp_path / "ok.yaml"), "--dry-run", "--out", str(tmp_path / "r")).returncode == 0


# --- a Ray address that accepts TCP but does not speak Ray --------------------------------------------------

@pytest.fixture
def mute_listener():
    """A TCP listener on 127.0.0.1 that accepts connections and never answers; yields its port."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []

    def serve():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed
                return

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in accepted:
        conn.close()


def test_a_ray_start_that_gets_no_answer_times_out_in_one_line(tmp_path, capsys, monkeypatch, mute_listener):
    import socket
    import sys
    import time
    import types

    def init(address=None, **_):  # as Ray's client against something mute: connects, then waits for an answer
        host, port = address.rsplit(":", 1)
        socket.create_connection((host, int(port))).recv(1)

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init)
    monkeypatch.setitem(sys.modules, "ray", fake)
    (tmp_path / "e.yaml").write_text("base: {task: affine, model: gpt1l, train: {steps: 2}}\nruns: [{seed: 0}]\n")
    started = time.monotonic()
    proc = main(capsys, "sweep", str(tmp_path / "e.yaml"), "--out", str(tmp_path / "r"), "--executor", "ray",
                "--address", f"127.0.0.1:{mute_listener}", "--connect-timeout", "1", "--quiet")
    one_line_refusal(proc, f"127.0.0.1:{mute_listener}", "no answer from Ray within 1s", "--connect-timeout")
    assert time.monotonic() - started < 10
    one_line_refusal(main(capsys, "sweep", str(tmp_path / "e.yaml"), "--out", str(tmp_path / "r"), "--executor",
                          "ray", "--address", "127.0.0.1:1", "--connect-timeout", "0"), "--connect-timeout must be > 0")


@pytest.mark.slow
def test_a_real_ray_start_against_a_mute_listener_times_out(tmp_path, mute_listener):
    pytest.importorskip("ray")
    from conftest import cli

    (tmp_path / "e.yaml").write_text("base: {task: affine, model: gpt1l, train: {steps: 2}}\nruns: [{seed: 0}]\n")
    proc = cli("sweep", str(tmp_path / "e.yaml"), "--out", str(tmp_path / "r"), "--executor", "ray", "--address",
               f"127.0.0.1:{mute_listener}", "--connect-timeout", "8", "--quiet", timeout=120)
    one_line_refusal(proc, "no answer from Ray within 8s")


# --- a damaged run: one clear warning, wherever it is read ---------------------------------------------------

def damaged_copy(finished, results, name, how):
    """A copy of the finished run under ``results/name``, damaged ``how``: a dangling metrics.json link (with
    probe summaries, which the report's probe sections read too), or a config ``{'task': 5}``."""
    import json
    import shutil

    run_dir = results / name
    shutil.copytree(finished, run_dir)
    metrics = run_dir / store.METRICS
    if how == "dangling":
        from iclbench.registry import get_registry

        (run_dir / "probes.json").write_text(json.dumps(
            {"probes": {n: {"summary": {"x": 1.0}} for n in get_registry().probes}}))
        metrics.unlink()
        metrics.symlink_to(results / "gone" / store.METRICS)
    else:
        data = json.loads(metrics.read_text())
        data["config"] = {"task": 5}
        metrics.write_text(json.dumps(data))
    return run_dir


@pytest.mark.parametrize("how, words", [("dangling", ["metrics.json is a dangling link", "gone"]),
                                        ("config", ["the recorded config's 'task' is 5", "not a mapping"])])
def test_a_damaged_run_says_what_is_wrong(finished, tmp_path, how, words):
    run_dir = damaged_copy(finished, tmp_path, "damaged", how)
    with pytest.raises(store.DamagedRun) as info:
        store.read_run(run_dir)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert "complete ()" not in str(info.value)


def test_a_run_whose_metrics_vanished_after_completing_says_so(finished, tmp_path):
    import shutil

    shutil.copytree(finished, tmp_path / "run")
    (tmp_path / "run" / store.METRICS).unlink()
    store.write_json(tmp_path / "run" / store.STATUS, {"status": "complete", "message": ""})
    with pytest.raises(store.DamagedRun, match="metrics.json is missing although status.json says the run"):
        store.read_run(tmp_path / "run")


def test_report_and_leaderboard_warn_once_per_damaged_run(finished, tmp_path, capsys):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(finished, results / finished.name)
    damaged_copy(finished, results, "dangling", "dangling")
    damaged_copy(finished, results, "config", "config")
    proc = main(capsys, "report", "--results", str(results), "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == 2, warnings
    assert sum("dangling link" in w for w in warnings) == 1 and sum("'task' is 5" in w for w in warnings) == 1
    for args in (["leaderboard", "--results", str(results)], ["leaderboard", "--compare", str(results),
                                                               str(results)]):
        proc = main(capsys, *args)
        assert proc.returncode == 0 and "internal error" not in proc.stderr, proc.stderr
        assert "'task' is 5" in proc.stderr and "subscriptable" not in proc.stderr


# --- diverged, unstable or complete (docs/training.md) -------------------------------------------------------

def test_an_absurd_but_finite_result_is_unstable():
    metrics = {"summary": {"model": {"mean": 5.57}}, "reference": {"zero": {"mean": 1.0}},
               "train": {"final_loss": 127.3}}
    reason = store.unstable_reason(metrics)
    assert "5.57" in reason and "3x the zero predictor's" in reason and "final training loss 127.3" in reason
    assert store.unstable_reason({**metrics, "summary": {"model": {"mean": 1.4}}}) is None  # poor, not absurd


def test_a_pool_model_that_recalls_its_pool_is_not_unstable_on_fresh_rules():
    """Found in the converged study's pool part: gpt3l trained on one affine rule (task.pool=1) learned it
    (training loss 3e-6, error 1e-6 on the pool's rule) and scores 3.3 on fresh rules. That is memorisation, the
    point of the pool sweep, not a diverged run; it was flagged unstable and left off the leaderboard. A pool
    run is judged on its pool's rules, and a stored flag from the old rule no longer hides it."""
    pool = lambda err: {"ood": {"pool_rules": {"summary": {"model": {"mean": err}}}}}  # noqa: E731
    memoriser = {"summary": {"model": {"mean": 3.317}}, "reference": {"zero": {"mean": 1.0}},
                 "train": {"final_loss": 2.864e-06}, **pool(1.4e-06)}
    assert store.unstable_reason(memoriser) is None
    assert store.unstable_reason({**memoriser, "unstable": "model error 3.317 is over 3x"}) is None
    assert "3.317" in store.unstable_reason({**memoriser, **pool(4.0)})  # absurd on its own pool too: unstable
    assert "3.317" in store.unstable_reason({**memoriser, **pool(float("nan"))})
    assert "inf" in store.unstable_reason({**memoriser, "summary": {"model": {"mean": float("inf")}}})


def test_an_unstable_run_warns_at_its_end_and_stays_off_the_leaderboard(tmp_path, capsys):
    from conftest import CHEAP, sets, tiny_run

    args = ["run", "--task", "affine", "--model", "gpt1l", "--steps", "40", "--out", str(tmp_path), "--quiet",
            *sets(tiny_run(cheap=True)), "--set", "train.lr=10", "--set", "train.grad_clip=0",
            "--set", "train.warmup=0"]
    assert CHEAP["eval.probes"] is False
    for attempt in ("trained", "found complete"):
        proc = main(capsys, *args)
        assert proc.returncode == 1, (attempt, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "is unstable" in lines[0] and "left off the leaderboard" in lines[0], lines
    run_dir = tmp_path / proc.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]
    assert store.read_json(run_dir / store.STATUS)["status"] == "unstable"
    assert "unstable" in store.read_run(run_dir)
    board = main(capsys, "leaderboard", "--results", str(tmp_path))
    assert "gpt1l" not in board.stdout and "leaving out unstable run" in board.stderr
    assert "gpt1l" in main(capsys, "leaderboard", "--results", str(tmp_path), "--include-unstable").stdout


# --- resuming: what is wrong, and from where it resumed -----------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "dangling", "directory"])
def test_resume_over_a_damaged_status_says_so(tmp_path, capsys, damage):
    from test_reliability import FAST, run_dir_of

    run_dir = run_dir_of(tmp_path)
    run_dir.mkdir(parents=True)
    status = run_dir / store.STATUS
    if damage == "garbage":
        status.write_text('{"status": "runn')
    elif damage == "dangling":
        status.symlink_to(tmp_path / "gone.json")
    else:
        status.mkdir()
    args = ["run", "--task", "affine", "--model", "gpt1l", "--steps", "20", "--out", str(tmp_path), "--resume"]
    err = one_line_refusal(main(capsys, *args, *[a for item in FAST for a in ("--set", item)]),
                           "status.json is damaged", "no checkpoint", "rerun without --resume")
    assert "never run there" not in err
    elsewhere = [str(tmp_path / "elsewhere") if a == str(tmp_path) else a for a in args]
    one_line_refusal(main(capsys, *elsewhere, *[a for item in FAST for a in ("--set", item)]), "never run there")


def test_a_run_killed_after_training_says_it_resumed_after_training(tmp_path, capsys, monkeypatch):
    from test_reliability import FAST

    from iclbench import runner

    evaluate = runner.evaluate

    def killed(*a, **k):  # as a kill while evaluating or probing leaves it: trained, not evaluated
        raise KeyboardInterrupt

    args = ["run", "--task", "affine", "--model", "gpt1l", "--steps", "20", "--out", str(tmp_path),
            *[a for item in FAST for a in ("--set", item)]]
    monkeypatch.setattr(runner, "evaluate", killed)
    assert main(capsys, *args).returncode == 130
    monkeypatch.setattr(runner, "evaluate", evaluate)
    proc = main(capsys, *args)
    assert proc.returncode == 0, proc.stderr
    assert "resumed after training" in proc.stdout and "training figures are kept" in proc.stdout
    assert "checkpoint at step 0" not in proc.stdout


# --- report.md escapes what it takes from user data -------------------------------------------------------

HOSTILE_NAMES = ["<script>alert(1)</script>", "<svg onload=alert(1)>", "<img src=x onerror=alert(1)>"]


def raw_html(text):
    import re

    return re.findall(r"<\s*(?:script|svg|img)\b", text, flags=re.I)


def test_report_markdown_escapes_every_name(tmp_path):
    doc = Document(tmp_path, f"report {HOSTILE_NAMES[0]}")
    for name in HOSTILE_NAMES:
        doc.heading(f"run {name}")
        doc.text(f"task {name}, see `iclbench report` and **this**")
        doc.bullets([f"probe label {name}"])
        doc.table(pd.DataFrame({f"col {name}": [name, "a|b"], "x": [1.5, 2.0]}))
        doc.blocks.append(("figure", (f"figures/{name}-error.png", f"curves of {name}")))
    md = doc.markdown()
    assert raw_html(md) == [], raw_html(md)
    assert "&lt;script&gt;" in md and "`iclbench report`" in md and "**this**" in md and "a\\|b" in md
    assert "(figures/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E-error.png)" in md


def test_report_of_hostile_directory_names_has_no_raw_markup(finished, tmp_path, capsys):
    import shutil

    results = tmp_path / "results"
    for seed, name in enumerate(HOSTILE_NAMES[1:]):
        shutil.copytree(finished, results / name)
        if seed:  # another seed, so that it is not a copy of the first
            import json

            m = json.loads((results / name / store.METRICS).read_text())
            (results / name / store.METRICS).write_text(json.dumps({**m, "seed": seed}))
    proc = main(capsys, "report", "--results", str(results), "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert raw_html(md) == [] and "&lt;svg onload=alert(1)&gt;" in md


# --- rescore's device, a tampered training state, steps past their bound ----------------------------------

def test_rescore_refuses_an_impossible_device_even_with_nothing_to_score(finished, capsys):
    one_line_refusal(main(capsys, "rescore", str(finished), "--device", "tpu"), "unknown device 'tpu'")
    assert main(capsys, "rescore", str(finished)).returncode == 0  # nothing to score on the CPU: fine


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_tampered_training_state_is_refused_in_one_line_of_ours(tmp_path, capsys, monkeypatch):
    import warnings

    import torch

    monkeypatch.chdir(tmp_path)
    path = tmp_path / store.TRAIN_STATE
    torch.save({"step": 3, "x": _Payload()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own warning would fail here
        with pytest.raises(store.DamagedRun) as info:
            store.load_training_state(path)
    assert "objects other than tensors" in str(info.value) and "weights_only" not in str(info.value)
    assert not (tmp_path / "pwned.txt").exists()
    path.write_bytes(b"garbage, not a checkpoint")
    with pytest.raises(store.DamagedRun, match="unreadable"):
        store.load_training_state(path)


def test_a_reader_that_goes_away_stops_the_output_quietly(monkeypatch):
    """Found piping a sweep's plan into `head`: the closed pipe gave "internal error: BrokenPipeError". A
    reader that goes away ends the command as it ends a shell tool: exit 141 (128 + SIGPIPE), nothing on
    stderr."""
    import io

    class Gone(io.StringIO):  # stdout whose reader has gone away
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    err = io.StringIO()
    monkeypatch.setattr(sys, "stdout", Gone())
    monkeypatch.setattr(sys, "stderr", err)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert cli_module.main(["sweep", os.path.join(root, "experiments", "converged", "regression.yaml"),
                            "--dry-run"]) == 141
    assert err.getvalue() == ""
