"""The CUDA path, end to end. Skipped where there is no CUDA (CI); run by benchmarks/device_check.sh on a GPU.

The first GPU runs of iclbench (an H200, 2026-11-28) failed twice before any result:
- the plugin contract check handed a task a CPU generator with device 'cuda', so every `run --device cuda`
  stopped before training;
- at evaluation, the least-squares baseline's batched pseudo-inverse (cuSOLVER's batched eigh) failed with
  CUSOLVER_STATUS_INTERNAL_ERROR on the 4096-sequence evaluation batch. A tiny evaluation batch passes, so these
  tests use the default sizes."""

import json

import pytest
import torch

from conftest import cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHORT = ("--steps", "20", "--quiet", "--device", "cuda", "--set", "eval.ood=false")


def test_every_task_passes_its_contract_on_cuda():
    from iclbench.contracts import check_task
    from iclbench.registry import get_registry

    registry = get_registry()
    for name in sorted(registry.tasks):
        check_task(registry.task(name)(None), name, device="cuda")


def test_every_baseline_scores_the_same_on_a_full_evaluation_batch_on_cuda():
    from iclbench.config import EvalOptions
    from iclbench.registry import get_registry

    registry = get_registry()
    n = EvalOptions().n_sequences
    for name in sorted(registry.tasks):
        task = registry.task(name)(None)
        batch = task.sample(n, torch.Generator().manual_seed(0))
        for baseline, entry in registry.task_baselines(task).items():
            # the score a run reports: rounding differs between devices, the error must not
            errors = [(entry.obj(b).double().cpu() - batch.targets.double()).pow(2).mean().item()
                      for b in (batch, batch.to("cuda"))]
            assert errors[1] == pytest.approx(errors[0], rel=1e-3, abs=1e-9), f"{name}:{baseline}"


def test_a_run_on_cuda_trains_evaluates_and_probes(tmp_path):
    out = cli("run", "--task", "affine", "--model", "gpt2l", "--out", str(tmp_path), *SHORT)
    assert out.returncode == 0, out.stderr
    run = next(tmp_path.glob("affine-gpt2l-*-s0"))
    m = json.loads((run / "metrics.json").read_text())
    assert m["provenance"]["device"].startswith("cuda")
    assert 0 < m["summary"]["model"]["mean"] < 10
    probes = json.loads((run / "probes.json").read_text())["probes"]
    assert "specialization" in probes and not [p for p, r in probes.items() if "error" in r], probes.keys()


def test_stacked_seeds_on_cuda_match_one_seed_alone(tmp_path):
    args = ("--task", "linrec", "--model", "gpt1l", "--no-probes", *SHORT)
    together = cli("run", *args, "--seeds", "0-2", "--stack", "yes", "--out", str(tmp_path / "stacked"))
    assert together.returncode == 0, together.stderr
    alone = cli("run", *args, "--seed", "1", "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    a, b = (json.loads((next((tmp_path / d).glob("*-s1")) / "metrics.json").read_text())["summary"]["model"]["mean"]
            for d in ("stacked", "alone"))
    assert a == pytest.approx(b, rel=1e-2)  # fp32; the vmapped kernels differ from the plain model's


def training_tasks(task, device, steps: int = 1000):
    """Every task a run of ``task`` draws training batches from: each curriculum stage (with the curriculum on
    where it is an option), and a pool's task (:mod:`iclbench.pool`) where the task offers pools."""
    from iclbench.trainer import Curriculum

    staged = task.with_options(curriculum=True) if hasattr(task.options, "curriculum") else task
    curriculum = Curriculum(staged, steps, device)
    stages = {id(stage): stage.task for stage in map(curriculum, range(0, steps, steps // 20))}
    pooled = [task.with_options(pool=16).training_task(0)] if hasattr(task.options, "pool") else []
    return [*stages.values(), *pooled]


def test_drawing_a_training_batch_of_any_task_on_cuda_makes_no_host_sync():
    """A host sync in sampling stalls every training step on a GPU: the host waits for the queue to drain
    (decision trees asked ``any()`` once per tree level, and trained 10 times slower than the other regression
    tasks on an H200, with 10 seeds stacked and other cells beside them). Every curriculum stage and pool too."""
    from iclbench.registry import get_registry

    registry, device = get_registry(), torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    syncing = {}
    for name in sorted(registry.tasks):
        for i, task in enumerate(training_tasks(registry.task(name)(None), device)):
            task.sample(8, generator, device)  # lazy initialisation may sync once
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                task.sample(64, generator, device)
            except RuntimeError as exc:
                syncing[f"{name} ({i})"] = str(exc).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode(0)
    assert not syncing, syncing
