"""Seeds trained together: the stacked step gives each seed the update a separate run would."""

import copy

import torch

from iclbench.config import TrainOptions
from iclbench.models.gpt import GPT, GPTOptions
from iclbench.registry import get_registry
from iclbench.stacked import StackedSeeds
from iclbench.trainer import make_optimizer, scored_positions, train_step


def test_stacked_seeds_match_separate_runs_after_several_steps():
    task = get_registry().task("linrec")(None)  # a task with unscored positions
    o = TrainOptions(steps=5, batch_size=8, lr=3e-3, grad_clip=0.05)  # tight clip: clipping is exercised
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(GPT(GPTOptions(n_layers=2, d_model=32, n_heads=4, d_mlp=64), 1, 1, task.context_len))
    separate = [copy.deepcopy(m) for m in models]
    stacked = StackedSeeds(models, o)
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    norm = task.normalizer("cpu")
    opts = [make_optimizer(m, o) for m in separate]
    for step in range(4):
        batches = [task.sample(o.batch_size, g) for g in gens]
        scored = scored_positions(batches[0].mask)
        assert scored is not None
        together = stacked.step(batches, norm, 1e-3 * (step + 1), scored)
        alone = [train_step(m, opt, b, norm, 1e-3 * (step + 1), o, scored) for m, opt, b in zip(separate, opts, batches)]
        assert torch.allclose(together, torch.stack(alone), rtol=1e-5, atol=1e-6)
    for i, m in enumerate(separate):
        state = stacked.state_dict(i, models[i])
        for name, p in m.state_dict().items():
            assert torch.allclose(state[name], p, rtol=1e-4, atol=1e-5), name


def test_parse_seeds():
    import pytest

    from iclbench.errors import ICLBenchError
    from iclbench.seeds import parse_seeds

    assert parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("5,1-2,5") == [5, 1, 2]
    for bad in ("", "a", "3-1"):
        with pytest.raises(ICLBenchError):
            parse_seeds(bad)


def test_run_seeds_in_processes_writes_ordinary_runs_equal_to_one_seed_alone(tmp_path):
    import json

    from conftest import cli

    args = ("--task", "affine", "--model", "gpt1l", "--steps", "6", "--out", str(tmp_path), "--no-probes",
            "--quiet", "--set", "eval.n_sequences=64", "--set", "eval.bootstrap=10", "--set", "eval.ood=false")
    out = cli("run", *args, "--seeds", "0-1", "--jobs", "2")
    assert out.returncode == 0, out.stderr
    dirs = out.stdout.split()
    assert len(dirs) == 2 and all(d.endswith(f"-s{s}") for d, s in zip(dirs, (0, 1)))
    together = json.loads((tmp_path / dirs[1].split("/")[-1] / "metrics.json").read_text())
    alone = cli("run", *args, "--seed", "1", "--force", "--out", str(tmp_path / "alone"),
                env={"OMP_NUM_THREADS": "1"})  # GEMM rounding depends on the thread count
    assert alone.returncode == 0, alone.stderr
    single = json.loads((tmp_path / "alone" / alone.stdout.split()[0].split("/")[-1] / "metrics.json").read_text())
    assert together["summary"] == single["summary"]  # a worker computes what a 1-thread run does
