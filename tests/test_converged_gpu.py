"""benchmarks/converged_gpu.py, the scheduler that trains the converged study's cells several at once on a GPU
inside a deadline: what it reads from a running cell, which cell it stops, and which cells it plans."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("converged_gpu", ROOT / "benchmarks" / "converged_gpu.py")
cg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cg)


def log(run: Path, *entries, tail: str = "") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "train.log").write_text("".join(json.dumps(e) + "\n" for e in entries) + tail)


def test_a_cells_step_is_its_furthest_run_and_its_end_the_latest_planned_end(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cell = {"runs": [str(a), str(b)], "cap": 1000}
    assert cg.progress(cell) == (0, 1000)  # nothing logged yet: the cap
    log(a, {"step": 100}, {"step": 200}, tail='{"step": 3')  # a line being written is skipped
    log(b, {"step": 100})
    assert cg.progress(cell) == (200, 1000)
    # a's held-out error is flat at 400: its cooldown ends at 480; b has not said, so the cell may reach the cap
    log(a, {"step": 400}, {"step": 400, "heldout_error": 0.1, "last_step": 480}, {"step": 450})
    log(b, {"step": 400}, {"step": 400, "heldout_error": 0.2, "last_step": 1000}, {"step": 450})
    assert cg.progress(cell) == (450, 1000)
    log(b, {"step": 400}, {"step": 400, "heldout_error": 0.2, "last_step": 600}, {"step": 450})
    assert cg.progress(cell) == (450, 600)  # every seed flat: the cell ends with the later cooldown
    log(a, {"step": 480, "heldout_error": 0.1, "last_step": 480}, {"step": 480})  # a ended, b goes on
    assert cg.progress(cell) == (480, 600)
    log(a, {"step": 480}, {"event": "trained", "steps": 480})  # a seed alone, trained early
    log(b, {"step": 600}, {"event": "trained", "steps": 600})  # every seed trained: evaluating
    assert cg.progress(cell) == (600, 600)


def test_a_pace_waits_for_half_a_window_of_logged_steps():
    cell = {"seen": [(0.0, 0), (5.0, 0), (10.0, 100), (15.0, 200)]}
    assert cg.pace(cell, window=30) is None  # 5 s of logged steps: start-up is not a pace
    cell["seen"] += [(20.0, 300), (25.0, 400)]
    assert cg.pace(cell, window=30) == pytest.approx(20.0)
    assert cg.pace({"seen": [(0.0, 50), (20.0, 50)]}, window=30) is None  # steps that did not move


def running_cell(name: str, step: int, cap: int = 10_000) -> dict:
    return {"cell": name, "cap": cap, "seen": [(0.0, step)]}


def test_the_scheduler_stops_nothing_while_every_cell_is_on_time():
    cells = [running_cell("a", 9000), running_cell("b", 9000)]
    assert cg.verdict(cells, [100.0, 100.0], now=0.0, deadline=100 + cg.EVAL_S) is None
    assert cg.verdict(cells, [None, None], now=0.0, deadline=1.0) is None  # not paced yet


def test_a_cell_whose_seeds_are_all_flat_is_projected_to_its_cooldowns_end_not_the_cap():
    cell = running_cell("a", 5000)
    assert cg.verdict([cell], [100.0], now=0.0, deadline=25 + cg.EVAL_S)[0] is cell  # 50 s to the cap
    cell["end"] = 7500
    assert cg.verdict([cell], [100.0], now=0.0, deadline=25 + cg.EVAL_S) is None  # 25 s to its end: on time


def test_a_slightly_late_cell_early_in_the_queue_gets_the_last_cells_share():
    # a needs 1.2x its pace; stopping one of three cells can give up to 1.5x: the last cell goes
    cells = [running_cell("a", 0), running_cell("b", 9000), running_cell("c", 9000)]
    victim, why = cg.verdict(cells, [100.0, 100.0, 100.0], now=0.0, deadline=100 / 1.2 + cg.EVAL_S)
    assert victim is cells[2] and why == "to make room for a"


def test_a_cell_that_no_share_can_save_is_stopped_itself():
    # a needs 3x its pace, more than the 1.5x that stopping one of three cells can give
    cells = [running_cell("a", 0), running_cell("b", 9000), running_cell("c", 9000)]
    victim, why = cg.verdict(cells, [100.0 / 3, 100.0, 100.0], now=0.0, deadline=100 + cg.EVAL_S)
    assert victim is cells[0] and why.startswith("projected to end")
    alone = [running_cell("a", 0)]  # alone, a late cell always goes
    assert cg.verdict(alone, [50.0], now=0.0, deadline=100.0)[0] is alone[0]


def test_the_cells_of_a_part_are_its_entries_with_the_sweeps_run_names(tmp_path, monkeypatch):
    from iclbench.sweep import load_experiment

    part = tmp_path / "part.yaml"
    part.write_text(yaml.safe_dump({
        "name": "converged-test", "base": {"train": {"max_steps": 300}, "out": str(tmp_path / "runs")},
        "runs": [{"task": "linrec", "model": "gpt1l", "train.until": "flat"},
                 {"task": "affine", "model": "gpt1l", "train.steps": 50}],
        "grid": {"seed": [0, 1]}}))
    monkeypatch.chdir(tmp_path)
    cells = cg.cells_of(str(part), tmp_path)
    names = sorted(p.name for p in load_experiment(part).runs)
    assert sorted(Path(r).name for c in cells for r in c["runs"]) == names
    assert [(c["seeds"], c["cap"]) for c in cells] == [([0, 1], 300), ([0, 1], 50)]
