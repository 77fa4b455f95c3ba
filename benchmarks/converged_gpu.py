"""The converged study's GPU parts (issue 24) inside one deadline on one GPU, several cells at once.

A cell is one entry of a part's file (experiments/converged/PART.yaml) with the seeds no sitting has finished (the
committed records count as finished: run from the repository root after copying them to results/, as
benchmarks/device_check.sh does). Each cell is one `iclbench sweep --stack yes` process, its seeds trained stacked.
A d_model-64 model's stacked step is bound by kernel launches and leaves the GPU mostly idle, so several cells
share it. Every CHECK seconds each running cell's pace (steps per second over the last WINDOW seconds, from its
runs' train.log) projects when it ends: its cap, or earlier once every seed's held-out scorings in train.log say
it is flat and when its cooldown ends (a stacked cell ends when its last seed does). When a cell is
projected to end after the deadline, one cell is stopped (then none for a window, while the paces settle): the late
cell itself if stopping one other could not speed it up enough, else the latest cell in the queue, so that those
before it end in time. A queued cell starts while every running one is on time.

Outputs under OUT: cells.json (each cell's seeds, steps reached, pace, wall time, outcome) and cells-N.tgz,
the finished cells' run directories with their weights but no optimizer state (at most 15.5 MB of files each),
to unpack at the repository root of a CPU machine and probe there (`bash experiments/converged.sh probes records`).
`--dry-run` lists the cells, in the order they would start, and exits.

    python3 benchmarks/converged_gpu.py --deadline 500 --out "$OUT" regression --first decision-tree-gpt2l
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

from iclbench import store
from iclbench.sweep import load_experiment

BUNDLE = 15_500_000  # run-directory bytes in one cells-N.tgz (the device tool brings back 16 MiB a file)
EVAL_S = 60  # evaluation and writing after the last step, allowed for in a projection


def cells_of(part: str, tmp: Path) -> list[dict]:
    """Each entry of ``part`` with unfinished runs: a one-entry sweep file (same name, base and grid, so the
    same run names) and the runs it will train."""
    file = Path(part if part.endswith(".yaml") else f"experiments/converged/{part}.yaml")
    spec = yaml.safe_load(file.read_text())
    cells = []
    for i, entry in enumerate(spec.get("runs") or [{}]):
        path = tmp / f"{file.stem}-{i}.yaml"
        path.write_text(yaml.safe_dump({**spec, "runs": [entry]} if spec.get("runs") else spec))
        todo = [p for p in load_experiment(path).runs if not p.is_complete()]
        if todo:
            train = todo[0].config.train
            cells.append({"cell": todo[0].name.rsplit("-s", 1)[0], "file": str(path), "part": part,
                          "seeds": [p.config.seed for p in todo], "runs": [str(p.run_dir) for p in todo],
                          "cap": train.max_steps if train.until == "flat" else train.steps})
    return cells


def progress(cell: dict) -> tuple[int, int]:
    """The furthest step any of the cell's runs has logged (0 before the first log line), and the step the
    cell's training ends at as planned now: the latest of its runs' ends, a run's being its last step once it
    has logged its end of training, else the ``last_step`` of its latest held-out scoring (the cap until it is
    flat, then the end of its cooldown), else the cap. Once every run has trained (the cell is evaluating),
    both are that end."""
    best, ends, trained = 0, [], 0
    for run in cell["runs"]:
        try:
            lines = (Path(run) / store.LOG).read_text().splitlines()
        except OSError:
            lines = []
        step, end = None, None
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:  # a line being written
                continue
            if entry.get("event") == "trained":
                end, trained = entry["steps"], trained + 1
            elif end is None and "last_step" in entry:
                end = entry["last_step"]
            if step is None and "step" in entry:
                step = entry["step"]
            if step is not None and end is not None:
                break
        best = max(best, step or 0)
        ends.append(cell["cap"] if end is None else end)
    end = max(ends, default=cell["cap"])
    return (end, end) if trained == len(cell["runs"]) else (best, end)


def complete(run: str) -> bool:
    try:
        store.read_run(Path(run))
        return True
    except store.DamagedRun:
        return False


def pace(cell: dict, window: float) -> float | None:
    """Steps per second over the last ``window`` seconds of observations since the first logged step; None
    until they span half a window and the steps moved (start-up is not a pace)."""
    seen = [o for o in cell["seen"] if o[1] > 0]
    recent = [o for o in seen if o[0] >= seen[-1][0] - window] if seen else []
    if len(recent) < 2 or recent[-1][0] - recent[0][0] < window / 2 or recent[-1][1] <= recent[0][1]:
        return None
    return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])


def verdict(running: list[dict], paces: list, now: float, deadline: float) -> tuple[dict, str] | None:
    """The cell to stop and why, when a running cell (in queue order, each with its pace) is projected to end
    after the deadline; None while every paced cell is on time. Stopping one of n cells that share the GPU
    speeds the others up by at most n / (n - 1): a late cell needing more than that goes itself (the latest in
    the queue first); else the latest running cell goes, so that those before it end in time."""
    late = []
    for cell, rate in zip(running, paces):
        if rate:
            cell["ends"] = now + (cell.get("end", cell["cap"]) - cell["seen"][-1][1]) / rate + EVAL_S
            late += [cell] if cell["ends"] > deadline else []
    if not late:
        return None
    n = len(running)
    hopeless = [c for c in late if n == 1 or (c["ends"] - now) / (deadline - now) > n / (n - 1)]
    victim = hopeless[-1] if hopeless else running[-1]
    if victim in late:
        return victim, f"projected to end {victim['ends'] - deadline:.0f} s past the deadline"
    return victim, f"to make room for {late[0]['cell']}"


def start(cell: dict, logs: Path) -> dict:
    argv = [sys.executable, "-m", "iclbench.cli", "sweep", cell["file"], "--stack", "yes", "--jobs", "1",
            "--quiet"]
    with open(logs / f"{cell['cell']}.log", "w") as log:  # the child keeps its own handle
        cell["proc"] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    cell.update(started=time.time(), seen=[], state="running")
    say(f"start {cell['cell']} (seeds {cell['seeds']}, cap {cell['cap']})")
    return cell


def stop(cell: dict, why: str) -> None:
    try:
        os.killpg(cell["proc"].pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    cell["proc"].wait()
    cell.update(state="stopped", why=why, wall_s=round(time.time() - cell["started"]))
    say(f"stop {cell['cell']} at step {progress(cell)[0]}: {why}")


def say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def schedule(cells: list[dict], deadline: float, jobs: int, most: int, check: float, window: float,
             logs: Path) -> None:
    queue, running, calm_from = list(cells), [], 0.0
    for _ in range(min(jobs, len(queue))):
        running.append(start(queue.pop(0), logs))
    while running:
        time.sleep(check)
        now = time.time()
        for cell in list(running):
            if cell["proc"].poll() is None:
                step, cell["end"] = progress(cell)
                cell["seen"].append((now, step))
                if step >= cell["end"]:  # evaluating: how long training took, for the record
                    cell.setdefault("trained_s", round(now - cell["started"]))
                continue
            running.remove(cell)
            done = all(map(complete, cell["runs"]))
            cell.update(state="finished" if done else "failed", rc=cell["proc"].returncode,
                        wall_s=round(now - cell["started"]))
            say(f"{cell['state']} {cell['cell']} in {cell['wall_s']} s")
        if now >= deadline:
            for cell in running:
                stop(cell, "the deadline")
            break
        paces = [pace(c, window) for c in running]
        late = verdict(running, paces, now, deadline)
        if late and now >= calm_from:
            running.remove(late[0])
            stop(*late)
            calm_from = now + window  # judge again on paces measured without it
        elif (not late and queue and len(running) < most and all(paces) and now >= calm_from
              and deadline - now > 120):
            running.append(start(queue.pop(0), logs))
            calm_from = now + window
        if not running and queue and deadline - now > 120:
            running.append(start(queue.pop(0), logs))
    for cell in queue:
        cell["state"] = "not started"


def pack(cells: list[dict], out: Path, most: int) -> None:
    """The finished cells' run directories (no optimizer state) in bundles of at most BUNDLE bytes."""
    bundles: list[list[str]] = [[]]
    filled = 0  # bytes in the last bundle
    for run in (run for cell in cells if cell.get("state") == "finished" for run in cell["runs"]):
        if bundles[-1] and filled + size(run) > BUNDLE:
            bundles.append([])
            filled = 0
        bundles[-1].append(run)
        filled += size(run)
    for i, runs in enumerate(b for b in bundles if b):
        if i >= most:
            print(f"left out (more than {most} bundles): {runs}")
            continue
        with tarfile.open(out / f"cells-{i}.tgz", "w:gz") as tar:
            for run in runs:
                tar.add(run, arcname=run, filter=lambda t: None if t.name.endswith(store.TRAIN_STATE) else t)


def size(run: str) -> int:
    return sum(f.stat().st_size for f in Path(run).iterdir() if f.is_file() and f.name != store.TRAIN_STATE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parts", nargs="+", help="regression, gpt12l, scale-gpu (a pool's seeds never stack)")
    ap.add_argument("--deadline", type=float, default=500, help="seconds from now at which every cell stops")
    ap.add_argument("--jobs", type=int, default=4, help="cells started at once (default 4)")
    ap.add_argument("--most", type=int, default=8, help="cells at once while all are on time (default 8)")
    ap.add_argument("--check", type=float, default=10, help="seconds between looks at the paces")
    ap.add_argument("--window", type=float, default=30, help="seconds of steps a pace is measured over")
    ap.add_argument("--first", default="", help="comma-separated cell prefixes (task-model) to run first")
    ap.add_argument("--out", default=".", help="where cells.json and cells-N.tgz go")
    ap.add_argument("--bundles", type=int, default=4, help="at most this many cells-N.tgz (default 4)")
    ap.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    a = ap.parse_args()
    t0, out = time.time(), Path(a.out)
    tmp = Path(tempfile.mkdtemp())
    cells = [c for part in a.parts for c in cells_of(part, tmp)]
    first = [p for p in a.first.split(",") if p]
    cells.sort(key=lambda c: next((i for i, p in enumerate(first) if c["cell"].startswith(p + "-")), len(first)))
    print(f"{len(cells)} cells, {sum(len(c['seeds']) for c in cells)} runs")
    for cell in cells:
        print(f"  {cell['cell']}: seeds {cell['seeds']}, cap {cell['cap']}")
    if a.dry_run:
        return
    schedule(cells, t0 + a.deadline, a.jobs, a.most, a.check, a.window, tmp)
    for cell in cells:
        cell["step"] = progress(cell)[0]
        seen = cell.pop("seen", [])
        if len(seen) > 1 and seen[-1][1] > seen[0][1]:
            cell["steps_per_s"] = round((seen[-1][1] - seen[0][1]) / (seen[-1][0] - seen[0][0]), 2)
        cell.pop("proc", None), cell.pop("ends", None)
        log = tmp / f"{cell['cell']}.log"
        cell["log_tail"] = log.read_text()[-600:] if log.exists() else ""
    (out / "cells.json").write_text(json.dumps(cells, indent=1))
    pack(cells, out, a.bundles)
    print(f"done in {time.time() - t0:.0f} s: " + ", ".join(f"{c['cell']} {c['state']}" for c in cells))


if __name__ == "__main__":
    main()
