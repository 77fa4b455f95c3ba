"""A battery of hostile and careless inputs (issues 13 and 25), run in-process through ``iclbench.cli.main``.

    python benchmarks/hostile.py [--keep DIR]

Each case damages a copy of one small real run (or passes bad input) and runs one command. A case is
*handled cleanly* when the command exits 0, 1 or 2 with at most one ``iclbench: error`` line and no internal
error or traceback (and, for a report, at most one warning about the damaged run, no raw HTML from a name in
report.md); *data lost* counts cases after which a good run beside the damaged one no longer reads back
identical (or a file outside the results directory changed or appeared). The totals line counts data written
outside a results directory, hangs (a case still running after ``HANG_S`` seconds), internal errors
(tracebacks) and refusals that are not one line. Ray cases need Ray importable (else they are the one-line
"needs Ray" refusal). Not part of CI: a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

FAST = ["model.d_model=16", "model.d_mlp=32", "eval.n_sequences=64", "eval.bootstrap=10", "eval.ood=false",
        "eval.probes=false"]
SETS = [a for s in FAST for a in ("--set", s)]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink() and not p.name.startswith("."):
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


#: a case still running after this many seconds is a hang (the battery goes on with the next)
HANG_S = 120
HANG, ESCAPED = 98, 99


class Hung(BaseException):
    pass


def call(argv) -> tuple[int, str]:
    from iclbench.cli import main

    def hung(*_):
        raise Hung()

    err = io.StringIO()
    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_S)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 2
            except Hung:
                return HANG, f"hang: still running after {HANG_S}s"
            except BaseException as exc:  # escaped main: not clean
                return ESCAPED, f"{type(exc).__name__}: {exc}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    return code, err.getvalue()


def internal(code: int, err: str) -> bool:
    return code == ESCAPED or "internal error" in err or "Traceback" in err


def not_one_line(code: int, err: str) -> bool:
    """A refusal (non-zero exit) that is not one ``iclbench: error`` line (warnings and lines of its own
    listing aside): several error lines, a line of someone else's (torch, Ray), or none at all."""
    if code in (0, HANG) or internal(code, err):
        return False
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("iclbench: error")]
    foreign = [line for line in lines if not line.startswith(("iclbench: ", "usage:", "  "))]
    if code == 1 and not errors:  # a run that completed unstable: one warning, exit 1 (docs/training.md)
        return not any("is unstable" in line for line in lines) or bool(foreign)
    return len(errors) != 1 or bool(foreign)


def clean(code: int, err: str) -> bool:
    return code in (0, 1, 2) and not internal(code, err) and not not_one_line(code, err) and all(
        line.startswith(("iclbench: ", "usage:", "  ")) or not line.strip() for line in err.splitlines())


class Payload:
    """Pickled, it runs ``touch PATH`` when unpickled without weights_only: a tampered train_state.pt."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


@contextlib.contextmanager
def mute_listener():
    """A TCP port on 127.0.0.1 that accepts connections and never answers (not Ray); yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []

    def serve():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for conn in accepted:
            conn.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="work in this directory and keep it")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="iclbench-hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    import iclbench
    from iclbench import store

    good = iclbench.run("affine", "gpt1l", steps=20, out=str(work / "seed"), overrides=FAST).run_dir
    victim = work / "outside.txt"
    victim.write_text("precious\n")
    outside = work / "outside"  # a folder outside every results directory: must stay empty
    outside.mkdir(exist_ok=True)

    def results_with(damage, name="zz-damaged"):
        root = work / "cases" / f"{len(cases_run)}"
        shutil.rmtree(root, ignore_errors=True)
        ok = shutil.copytree(good, root / good.name)
        bad = shutil.copytree(good, root / name)
        damage(bad)
        return root, ok, bad

    def fifo(p):
        p.unlink(missing_ok=True)
        os.mkfifo(p)

    def edit_metrics(fn):
        def damage(d):
            m = json.loads((d / store.METRICS).read_text())
            (d / store.METRICS).write_text(json.dumps(fn(m)))
        return damage

    damages = {
        "status null": lambda d: ((d / store.METRICS).unlink(), (d / store.STATUS).write_text("null")),
        "status list": lambda d: ((d / store.METRICS).unlink(), (d / store.STATUS).write_text("[]")),
        "status fifo": lambda d: ((d / store.METRICS).unlink(), fifo(d / store.STATUS)),
        "metrics null": lambda d: (d / store.METRICS).write_text("null"),
        "metrics list": lambda d: (d / store.METRICS).write_text("[1]"),
        "metrics truncated": lambda d: (d / store.METRICS).write_text((d / store.METRICS).read_text()[:300]),
        "metrics binary": lambda d: (d / store.METRICS).write_bytes(os.urandom(200)),
        "metrics fifo": lambda d: fifo(d / store.METRICS),
        "metrics directory": lambda d: ((d / store.METRICS).unlink(), (d / store.METRICS).mkdir()),
        "metrics deep": lambda d: (d / store.METRICS).write_text("[" * 100000),
        "summary list": edit_metrics(lambda m: {**m, "summary": []}),
        "summary model null": edit_metrics(lambda m: {**m, "summary": {**m["summary"], "model": None}}),
        "no curves": edit_metrics(lambda m: {k: v for k, v in m.items() if k != "curves"}),
        "no train": edit_metrics(lambda m: {k: v for k, v in m.items() if k != "train"}),
        "curves positions null": edit_metrics(lambda m: {**m, "curves": {**m["curves"], "positions": None}}),
        "absurd error": edit_metrics(lambda m: {**m, "summary": {**m["summary"], "model": {"mean": 2e7,
                                                                                          "ci": [2e7, 2e7]}}}),
        "empty probe csv": lambda d: ((d / "probes").mkdir(), (d / "probes" / "layer_lens.csv").write_text("")),
        "garbage probe csv": lambda d: ((d / "probes").mkdir(), (d / "probes" / "attention.csv").write_text("a\n1\n")),
        "probes.json list": lambda d: (d / "probes.json").write_text("[]"),
        "probes.json truncated": lambda d: (d / "probes.json").write_text('{"probes": {"specialization": {"su'),
        "probes.json summary list": lambda d: (d / "probes.json").write_text(
            '{"probes": {"specialization": {"summary": [1]}}}'),
        "config.yaml fifo": lambda d: fifo(d / store.CONFIG),
        "weights truncated": lambda d: (d / store.CHECKPOINT).write_bytes((d / store.CHECKPOINT).read_bytes()[:64]),
        "xss name": lambda d: None,
        # issue 25: a FIFO or a directory where a file of the run belongs, a symlinked folder
        "weights fifo": lambda d: fifo(d / store.CHECKPOINT),
        "weights directory": lambda d: ((d / store.CHECKPOINT).unlink(), (d / store.CHECKPOINT).mkdir()),
        "train_state fifo": lambda d: ((d / store.METRICS).unlink(), fifo(d / store.TRAIN_STATE)),
        "train_state directory": lambda d: ((d / store.METRICS).unlink(), (d / store.TRAIN_STATE).mkdir()),
        "probes symlinked outside": lambda d: (shutil.rmtree(d / "probes", ignore_errors=True),
                                               (d / "probes").symlink_to(outside, target_is_directory=True)),
        # issue 25, second part: links and shapes that used to read unclearly, a tampered training state
        "metrics dangling link": lambda d: ((d / store.METRICS).unlink(),
                                            (d / store.METRICS).symlink_to(d.parent / "gone" / store.METRICS)),
        "config task 5": edit_metrics(lambda m: {**m, "config": {"task": 5}}),
        "status dangling link": lambda d: ((d / store.METRICS).unlink(), (d / store.STATUS).unlink(),
                                           (d / store.STATUS).symlink_to(d.parent / "gone.json")),
        "status garbage": lambda d: ((d / store.METRICS).unlink(), (d / store.STATUS).write_text('{"status": "ru')),
        "train_state pickle payload": lambda d: ((d / store.METRICS).unlink(), torch.save(
            {"step": 3, "x": Payload(outside / "pwned")}, d / store.TRAIN_STATE)),
        "svg name": lambda d: None,
        "img name": lambda d: None,
    }
    names = {"xss name": 'x" onerror="alert(1)', "svg name": "<svg onload=alert(1)>",
             "img name": "<img src=x onerror=alert(1)>"}
    cases_run: list[tuple] = []

    def record(name, code, err, ok_dir, note=None):
        lost = digest(ok_dir) != good_digest or victim.read_text() != "precious\n" or any(outside.iterdir())
        ok = clean(code, err) and note is None
        cases_run.append((name, ok, lost, note or " ".join(err.split())[:160], code == HANG, internal(code, err),
                          not_one_line(code, err)))

    good_digest = digest(good)
    for dname, damage in damages.items():
        for command in ("leaderboard", "report", "specialization", "probe", "rerun", "resume"):
            root, ok, bad = results_with(damage, names.get(dname, "zz-damaged"))
            note = None
            if command == "leaderboard":
                code, err = call(["leaderboard", "--results", root])
            elif command == "report":
                code, err = call(["report", "--results", root, "--out", root / "report"])
                page, md = root / "report" / "report.html", root / "report" / "report.md"
                if page.exists() and 'onerror="' in page.read_text():
                    note = "unescaped name in report.html"
                if md.exists() and re.search(r"<\s*(script|svg|img)\b", md.read_text(), re.I):
                    note = "raw HTML from a name in report.md"
                about = [line for line in err.splitlines() if str(bad) in line]
                if len(about) > 1:
                    note = f"{len(about)} warnings about one damaged run: " + " | ".join(about)[:200]
            elif command == "specialization":
                code, err = call(["specialization", "--results", root])
            elif command == "probe":
                code, err = call(["probe", bad, "--probe", "attention"])
            else:  # the same config rerun (or resumed) into the damaged directory: must not crash
                target = root / command
                damage(shutil.copytree(good, target / good.name))
                code, err = call(["run", "--task", "affine", "--model", "gpt1l", "--steps", "20", "--out", target,
                                  "--quiet", *SETS, *(["--resume"] if command == "resume" else [])])
                if "never run there" in err and (target / good.name).exists():
                    note = "--resume over a run directory says 'never run there'"
            record(f"{command}: {dname}", code, err, ok, note)

    # run-level hostility
    def run_case(name, argv, prepare=lambda out: None):
        out = work / "runs" / str(len(cases_run))
        out.mkdir(parents=True)
        prepare(out)
        code, err = call(argv(out) if callable(argv) else argv)
        record(name, code, err, good)

    base = lambda out, *extra: ["run", "--task", "affine", "--model", "gpt1l", "--steps", "20", "--out", out,  # noqa
                                "--quiet", *SETS, *extra]
    for name, extra in {
        "seed 2^63": ["--seed", str(2 ** 63)], "seed -1": ["--seed", "-1"], "out=[1]": ["--set", "out=[1]"],
        "d_model 4e6": ["--set", "model.d_model=4000000"], "batch 1e10": ["--set", "train.batch_size=10000000000"],
        "n_sequences 1e12": ["--set", "eval.n_sequences=1000000000000"], "noise nan": ["--set", "task.noise=.nan"],
        "lr 10": ["--set", "train.lr=10"], "lr 1e6": ["--set", "train.lr=1e6", "--set", "train.grad_clip=0"],
        "steps 0": ["--steps", "0"], "unknown key": ["--set", "model.nope=1"], "device cuda:99": ["--device", "cuda:99"],
        "resume nothing": ["--resume"],
        # issue 25: sizes that drive memory or time, bounded before anything is built
        "n_layers 1e5": ["--set", "model.n_layers=100000"], "bootstrap 1e10": ["--set", "eval.bootstrap=10000000000"],
        "steps 1e20": ["--steps", "99999999999999999999"], "seeds 1e11": ["--seeds", "0-99999999999"],
        "jobs 0": ["--seeds", "0-1", "--jobs", "0"],
        # issue 25, second part: absurd but finite training ends unstable (one warning, exit 1)
        "lr 10 without clipping": ["--set", "train.lr=10", "--set", "train.grad_clip=0", "--set", "train.warmup=0"],
        "device tpu": ["--device", "tpu"],
    }.items():
        run_case(f"run: {name}", lambda out, extra=extra: base(out, *extra))
    (work / "deep.yaml").write_text("[" * 50000)
    (work / "binary.yaml").write_bytes(os.urandom(512))
    (work / "list.yaml").write_text("- 1\n- 2\n")
    os.mkfifo(work / "fifo.yaml")
    for f in ("deep", "binary", "list", "fifo"):
        run_case(f"run --config {f}", ["run", "--config", work / f"{f}.yaml"])
        run_case(f"sweep {f}", ["sweep", work / f"{f}.yaml", "--dry-run"])
    (work / "twice.yaml").write_text("task: affine\nmodel: gpt1l\ntask: regression\n")
    run_case("run --config with a key twice", ["run", "--config", work / "twice.yaml"])
    (work / "huge.yaml").write_text("base: {task: affine, model: gpt1l}\ngrid:\n" + "".join(
        f"  task.{k}: [{', '.join(str(v / 100) for v in range(10))}]\n"
        for k in ("a_low", "b_max", "x0_max", "noise", "a_high")) + "  seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n"
        "  train.steps: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n")
    run_case("sweep of 10^7 runs", ["sweep", work / "huge.yaml", "--dry-run"])
    run_case("ray port 99999", lambda out: ["sweep", work / "exp.yaml", "--executor", "ray", "--address",
                                            "127.0.0.1:99999"],
             lambda out: (work / "exp.yaml").write_text(f"base: {{task: affine, model: gpt1l, out: {out}}}\n"
                                                         "runs: [{seed: 0}]\n"))

    def symlinked_figures(out):
        (out / "report").mkdir()
        (out / "report" / "figures").symlink_to(outside, target_is_directory=True)
    run_case("report --out with figures/ symlinked outside",
             lambda out: ["report", "--results", good.parent, "--out", out / "report"], symlinked_figures)
    (work / "invalid.yaml").write_text(
        "base: {task: affine, model: gpt1l}\nruns:\n  - {device: cuda}\n"
        "  - {model.d_model: 65536, model.d_mlp: 262144}\n  - {model.bogus: 3}\n  - {seed: 1}\n")
    run_case("sweep --dry-run of invalid runs (cuda, a width past memory, an unknown key)",
             lambda out: ["sweep", work / "invalid.yaml", "--dry-run", "--out", out])
    run_case("rescore --device tpu (nothing to score)", ["rescore", good, "--device", "tpu"])
    with mute_listener() as port:
        run_case("ray address that accepts TCP but is not Ray",
                 lambda out: ["sweep", work / "exp.yaml", "--executor", "ray", "--address", f"127.0.0.1:{port}",
                              "--connect-timeout", "5", "--quiet"],
                 lambda out: (work / "exp.yaml").write_text(f"base: {{task: affine, model: gpt1l, out: {out}}}\n"
                                                             "runs: [{seed: 0}]\n"))
    run_case("leaderboard --from past", ["leaderboard", "--results", good.parent, "--from", "999"])
    run_case("leaderboard missing dir", ["leaderboard", "--results", work / "nope"])
    run_case("report --out a file", ["report", "--results", good.parent, "--out", victim])
    run_case("ray unreachable", lambda out: ["sweep", work / "exp.yaml", "--executor", "ray", "--address",
                                             "127.0.0.1:1"],
             lambda out: (work / "exp.yaml").write_text(f"base: {{task: affine, model: gpt1l, out: {out}}}\n"
                                                         "runs: [{seed: 0}]\n"))

    def symlinked_log(out):
        iclbench.run("affine", "gpt1l", steps=20, out=str(out), overrides=FAST)
        (log := next(out.iterdir()) / store.LOG).unlink()
        log.symlink_to(victim)
    run_case("--force over a symlinked train.log", lambda out: base(out, "--force"), symlinked_log)

    def stale_pid(out):
        run_dir = iclbench.run("affine", "gpt1l", steps=20, out=str(out), overrides=FAST).run_dir
        (run_dir / store.METRICS).unlink()
        store.write_json(run_dir / store.STATUS, {"status": "running", "pid": os.getppid(), "host": os.uname()[1]})
    run_case("stale pid owned by another process", base, stale_pid)

    holder = {}

    def locked(out):
        from iclbench.config import resolve
        from iclbench.registry import get_registry

        cfg = resolve(get_registry(), task="affine", model="gpt1l", steps=20, out=str(out), overrides=FAST)
        (out / cfg.run_name).mkdir(parents=True)
        holder["p"] = subprocess.Popen([sys.executable, "-c", "import sys,time; from iclbench import store\n"
                                        "with store.run_lock(sys.argv[1]):\n print('l',flush=True); time.sleep(60)",
                                        str(out / cfg.run_name)], stdout=subprocess.PIPE, text=True)
        holder["p"].stdout.readline()
    run_case("--force on a live run", lambda out: base(out, "--force"), locked)
    busy = cases_run[-1]
    cases_run[-1] = (busy[0], busy[1] and "being computed" in busy[3], *busy[2:])
    holder["p"].kill()

    unclean = [c for c in cases_run if not c[1]]
    for name, ok, lost, err, *_ in cases_run:
        print(f"{'ok ' if ok else 'BAD'} {'LOST' if lost else '    '} {name}: {err}")
    print(f"\n{len(cases_run)} cases, {len(cases_run) - len(unclean)} handled cleanly, "
          f"{sum(c[2] for c in cases_run)} with data lost")
    print(f"data written outside a results directory (or lost): {sum(c[2] for c in cases_run)}; "
          f"hangs: {sum(c[4] for c in cases_run)}; internal errors: {sum(c[5] for c in cases_run)}; "
          f"refusals that are not one line: {sum(c[6] for c in cases_run)}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if unclean or any(c[2] for c in cases_run) else 0


if __name__ == "__main__":
    sys.exit(main())
