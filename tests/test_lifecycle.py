"""One run's life: the same config and seed give the same numbers whatever the engine's shape, and seeds
trained together (stacked) live the lifecycle of separate runs, hook by hook.

``lifecycle_reference.json`` holds what the engine wrote before the run lifecycle and the training loop were
rewritten as one (issue 20): the numbers of a single run and of three seeds trained as one stacked model,
produced by :func:`produce` below (one torch thread, CPU). A run now must write exactly those numbers;
timing, provenance and where the run was stored aside. On a CPU whose float arithmetic differs from the recording
machine's in the last bits, the numbers must agree to 1e-4 instead, and the digests are left out.
"""

import hashlib
import json
import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

import iclbench
from conftest import PLUGINS
from iclbench.config import FLAT_ONLY, OMIT_AT
from iclbench.registry import build_registry
from iclbench.seeds import run_seeds

REFERENCE = Path(__file__).with_name("lifecycle_reference.json")
#: a run of a couple of seconds that still writes every kind of number: curves, OOD shifts, probes
SETTINGS = {"model.d_model": 32, "model.d_mlp": 64, "eval.n_sequences": 256, "eval.bootstrap": 50,
            "train.log_every": 10, "train.checkpoint_every": 20}
RUN = {"task": "affine", "model": "gpt1l", "steps": 60, "device": "cpu"}
TIMING = ("train_time_s", "tokens_per_s", "elapsed_s", "wall_time_s", "time_s")
#: probes whose own measurements changed after the reference was recorded (issue 21 made the fitted read-outs
#: selective against untrained controls and rebuilt the claims; the circuit probe is new): not an engine matter
PROBES_CHANGED = ("layer_lens", "ladder", "linear_probe", "specialization", "circuit")
#: a sha256 digest (:func:`digest`, a probe table's): exact bytes, so comparable only on the recording machine
DIGEST = re.compile(r"[0-9a-f]{64}")


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def record(run_dir: Path) -> dict:
    """What a run directory holds, less timing, provenance and the results folder's name: its metrics (each
    per-position curve table as a digest), its training log, its probes' summaries and a digest of each probe
    table."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("wall_time_s", "provenance", "extra"):
        metrics.pop(key, None)
    metrics["train"] = {k: v for k, v in metrics["train"].items() if k not in TIMING}
    metrics["config"].pop("out")
    metrics["curves"] = digest(metrics["curves"])
    for shift in metrics["ood"].values():
        if "curves" in shift:
            shift["curves"] = digest(shift["curves"])
    log = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
           for line in (run_dir / "train.log").read_text().splitlines()]
    probes = {name: entry for name, entry in json.loads((run_dir / "probes.json").read_text())["probes"].items()
              if name not in PROBES_CHANGED}
    for name, entry in probes.items():
        entry.pop("time_s", None)
        if "table" in entry:
            entry["table"] = hashlib.sha256((run_dir / entry["table"]).read_bytes()).hexdigest()
    return {"metrics": metrics, "log": log, "probes": probes}


def produce(out: Path, registry=None) -> dict:
    """One single run (seed 0) and seeds 0-2 trained as one stacked model, recorded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = iclbench.run(**RUN, out=str(out / "single"), overrides=dict(SETTINGS), registry=registry)
        stacked = run_seeds([0, 1, 2], jobs=1, stack=True, **RUN, out=str(out / "stacked"),
                            overrides=dict(SETTINGS), **({"registry": registry} if registry else {}))
    finally:
        torch.set_num_threads(threads)
    assert [outcome for _, outcome, _ in stacked] == ["trained (stacked with 3)"] * 3
    return {"single": record(single.run_dir), "stacked": [record(run_dir) for run_dir, _, _ in stacked]}


@pytest.mark.slow
def test_a_single_run_and_a_stacked_run_give_the_recorded_numbers(tmp_path):
    expected = json.loads(REFERENCE.read_text())
    for run in [expected["single"], *expected["stacked"]]:  # fp32's name before issue 20, hashed alike
        assert run["metrics"]["config"]["train"]["precision"] == "auto"
        run["metrics"]["config"]["train"]["precision"] = "fp32"
        run["probes"] = {k: v for k, v in run["probes"].items() if k not in PROBES_CHANGED}
        assert len(run["probes"]) >= 5  # ablation, attention, attribution, similarity, patching still compared
    got = json.loads(json.dumps(produce(tmp_path)))  # through JSON, as the reference was stored
    for run in [got["single"], *got["stacked"]]:  # options added since, at the values that change nothing
        config = run["metrics"]["config"]
        assert config["train"]["until"] == "steps"
        for key in FLAT_ONLY:
            del config["train"][key]
        for (section, key), value in OMIT_AT.items():
            if key in config[section]:
                assert config[section].pop(key) == value
    if got["single"] == expected["single"] and got["stacked"] == expected["stacked"]:
        return  # the recording machine's float arithmetic: every number and digest, exactly
    # Another CPU (another vector unit, so other GEMM kernels) rounds differently in the last bits: the step-10
    # loss moves by 2e-8 and the runs end 5e-5 apart at most (a summary rounded to 6 decimals, one unit in the
    # last place). Then every number must agree to 1e-4 (or 2e-6 absolute) and every other leaf exactly; only
    # the digests of the per-position curves and probe tables, which hash the exact floats, cannot match.
    mismatches = differences(got["single"], expected["single"], "single") + [
        m for seed, (new, old) in enumerate(zip(got["stacked"], expected["stacked"]))
        for m in differences(new, old, f"stacked seed {seed}")]
    assert not mismatches, "\n".join(mismatches[:20])
    warnings.warn("the lifecycle reference was compared within 1e-4, not bit for bit: this CPU's float "
                  "arithmetic differs from the recording machine's")


def differences(got, expected, path: str) -> list[str]:
    """Where ``got`` and ``expected`` differ beyond the cross-CPU tolerance, a line each (digests aside)."""
    if isinstance(got, dict) and isinstance(expected, dict):
        if set(got) != set(expected):
            return [f"{path}: keys {sorted(set(got) ^ set(expected))}"]
        return [m for k in got for m in differences(got[k], expected[k], f"{path}.{k}")]
    if isinstance(got, list) and isinstance(expected, list):
        if len(got) != len(expected):
            return [f"{path}: {len(got)} items, not {len(expected)}"]
        return [m for i, (a, b) in enumerate(zip(got, expected)) for m in differences(a, b, f"{path}[{i}]")]
    floats = any(isinstance(v, float) for v in (got, expected)) and \
        all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (got, expected))  # counts: exact
    if floats and math.isclose(got, expected, rel_tol=1e-4, abs_tol=2e-6):
        return []
    if all(isinstance(v, str) and DIGEST.fullmatch(v) for v in (got, expected)):
        return []
    return [] if got == expected else [f"{path}: {got!r}, recorded {expected!r}"]


def _jsonl_logger():
    sys.path.insert(0, str(PLUGINS / "iclbench-examples"))
    try:
        import iclbench_jsonl_log
    finally:
        sys.path.pop(0)
    return iclbench_jsonl_log


def _events(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_stacked_seeds_fire_every_lifecycle_hook_once_per_seed_as_separate_runs_do(tmp_path):
    """A third-party logger sees a stacked seed's life as a separate run's: started before training, the loss
    every ``log_every`` steps, finished; nothing twice."""
    registry = build_registry(extra_plugins=[_jsonl_logger()])
    kw = dict(jobs=1, **RUN, overrides={**SETTINGS, "eval.probes": False, "eval.ood": False}, registry=registry)
    stacked = run_seeds([0, 1, 2], stack=True, out=str(tmp_path / "stacked"), **kw)
    separate = run_seeds([0, 1, 2], stack=False, out=str(tmp_path / "separate"), **kw)
    for (together, _, _), (alone, _, _) in zip(stacked, separate):
        a, b = _events(together), _events(alone)
        assert [(e["event"], e.get("step")) for e in a] == \
            [("started", None)] + [("train", s) for s in (10, 20, 30, 40, 50, 60)] + [("finished", None)]
        assert [(e["event"], e.get("step")) for e in a] == [(e["event"], e.get("step")) for e in b]
        assert a[0] == b[0]  # the same run, the same config
        assert [e["loss"] for e in a[1:-1]] == pytest.approx([e["loss"] for e in b[1:-1]], rel=1e-3)


def test_probes_take_their_baselines_from_the_registry_the_run_was_given():
    from iclbench import Baseline, hookimpl
    from iclbench.build import build
    from iclbench.config import resolve
    from iclbench.probes.common import baselines
    from iclbench.registry import get_registry

    class ExtraBaseline:
        @hookimpl
        def iclbench_baselines(self):
            return [Baseline("affine", "zeros_elsewhere", lambda batch: torch.zeros_like(batch.targets))]

    registry = build_registry(extra_plugins=[ExtraBaseline()])
    task, _ = build(registry, resolve(registry, task="affine", model="gpt1l"), torch.device("cpu"))
    batch = task.sample(4, torch.Generator().manual_seed(0))
    assert "zeros_elsewhere" in baselines(task, batch)
    assert "zeros_elsewhere" not in baselines(get_registry().task("affine")(), batch)
