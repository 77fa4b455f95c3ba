"""The CUDA path, end to end. Skipped where there is no CUDA (CI); run by benchmarks/device_check.sh on a GPU.

The first GPU run of iclbench failed here: the plugin contract check handed a task a CPU generator with
device 'cuda', so every `run --device cuda` stopped before training."""

import json

import pytest
import torch

from conftest import cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TINY = ("--steps", "20", "--quiet", "--device", "cuda", "--set", "eval.n_sequences=64",
        "--set", "eval.bootstrap=10", "--set", "eval.ood=false")


def test_every_task_passes_its_contract_on_cuda():
    from iclbench.contracts import check_task
    from iclbench.registry import get_registry

    registry = get_registry()
    for name in sorted(registry.tasks):
        check_task(registry.task(name)(None), name, device="cuda")


def test_a_run_on_cuda_trains_evaluates_and_probes(tmp_path):
    out = cli("run", "--task", "affine", "--model", "gpt2l", "--out", str(tmp_path), *TINY)
    assert out.returncode == 0, out.stderr
    run = next(tmp_path.glob("affine-gpt2l-*-s0"))
    m = json.loads((run / "metrics.json").read_text())
    assert m["provenance"]["device"].startswith("cuda")
    assert 0 < m["summary"]["model"]["mean"] < 10
    assert "specialization" in json.loads((run / "probes.json").read_text())["probes"]


def test_stacked_seeds_on_cuda_match_one_seed_alone(tmp_path):
    args = ("--task", "linrec", "--model", "gpt1l", "--no-probes", *TINY)
    together = cli("run", *args, "--seeds", "0-2", "--stack", "yes", "--out", str(tmp_path / "stacked"))
    assert together.returncode == 0, together.stderr
    alone = cli("run", *args, "--seed", "1", "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    a, b = (json.loads((next((tmp_path / d).glob("*-s1")) / "metrics.json").read_text())["summary"]["model"]["mean"]
            for d in ("stacked", "alone"))
    assert a == pytest.approx(b, rel=0.05)  # bf16 autocast: close, not bit-equal
