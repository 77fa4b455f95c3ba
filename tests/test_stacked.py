"""Seeds trained together: the stacked step gives each seed the update a separate run would."""

import copy

import pytest

import torch

from iclbench.config import TrainOptions
from iclbench.models.gpt import GPT, GPTOptions
from iclbench.registry import get_registry
from iclbench.stacked import StackedSeeds
from iclbench.step import make_optimizer, mask_index, train_step


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
        scored = mask_index(batches[0].mask)
        assert scored is not None
        together = stacked.step(batches, norm, [1e-3 * (step + 1)] * 3, scored)
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


@pytest.mark.slow
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


def test_run_seeds_starts_no_more_processes_than_the_cores_it_may_use(tmp_path, monkeypatch):
    """Under `taskset -c 1` (one core allowed) the seeds run one after another in this process, not as one
    process per core of the machine sharing that core."""
    from types import SimpleNamespace

    from iclbench import runner, seeds, sweep

    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: {1}, raising=False)
    ran = []

    def here(registry=None, **kw):  # stands in for a run, in this process
        ran.append(kw["seed"])
        return SimpleNamespace(run_dir=tmp_path / str(kw["seed"]), outcome="trained", metrics={})

    monkeypatch.setattr(runner, "run", here)
    seeds.run_seeds([0, 1], stack=False, task="affine", model="gpt1l", device="cpu", out=str(tmp_path))
    assert ran == [0, 1]


from conftest import tiny_run  # noqa: E402

TINY = tiny_run(eval__n_sequences=256, eval__bootstrap=50, eval__ood=False, eval__probes=False,
               train__log_every=10, train__checkpoint_every=20)


def _seeds(tmp_path, stack, seeds=(0, 1, 2), steps=40, **kw):
    from iclbench.seeds import run_seeds

    return run_seeds(list(seeds), jobs=1, stack=stack, task="linrec", model="gpt2l", steps=steps, device="cpu",
                     out=str(tmp_path), overrides=dict(TINY), **kw)


@pytest.mark.slow
def test_stacked_runs_write_ordinary_run_directories_matching_separate_runs(tmp_path):
    """``run --seeds --stack yes``: one stacked model, N run directories whose metrics match separate runs
    within float rounding; each a complete ordinary run (a rerun returns it as recorded)."""
    import json

    from iclbench import store

    together = _seeds(tmp_path / "stacked", True)
    alone = _seeds(tmp_path / "separate", False)
    assert [o for _, o, _ in together] == ["trained (stacked with 3)"] * 3
    assert [o for _, o, _ in alone] == ["trained"] * 3
    for (d1, _, m1), (d2, _, m2) in zip(together, alone):
        assert d1.name == d2.name  # the same config, the same run name
        for name, s in m2["summary"].items():
            assert abs(m1["summary"][name]["mean"] - s["mean"]) <= 1e-3 * abs(s["mean"]) + 1e-6, name
        assert m1["train"]["stacked_with"] == 3 and m1["provenance"]["train_segments"][0]["stacked_with"] == 3
        log = [json.loads(line) for line in (d1 / store.LOG).read_text().splitlines()]
        assert [e["step"] for e in log if "loss" in e] == [10, 20, 30, 40]
        assert [e["event"] for e in log if "event" in e] == ["start", "trained"]
        losses = [e["loss"] for e in log if "loss" in e]
        single = [json.loads(line)["loss"] for line in (d2 / store.LOG).read_text().splitlines()
                  if '"loss"' in line]
        assert losses == pytest.approx(single, rel=1e-3)
        assert not (d1 / store.TRAIN_STATE).exists() and store.read_json(d1 / store.STATUS)["status"] == "complete"
    again = _seeds(tmp_path / "stacked", True)
    assert [o for _, o, _ in again] == ["complete"] * 3


@pytest.mark.slow
def test_stacked_seeds_score_each_baseline_once_and_record_what_separate_runs_do(tmp_path, monkeypatch):
    """The seeds of a stacked cell share one task configuration, so each baseline is screened on and predicts each
    evaluation set (the main one and every OOD shift) once for the cell, not once per seed; every seed still
    records the baseline scores its separate run records, number for number."""
    import collections
    import dataclasses
    import functools

    from iclbench.registry import Registry
    from iclbench.seeds import run_seeds

    calls, task_baselines = collections.Counter(), Registry.task_baselines

    def counting(self, task):
        def count(name, fn):
            @functools.wraps(fn)
            def counted(batch):  # the evaluation sets, and the contract screen's few sequences
                calls[repr(task.options), name, len(batch)] += 1
                return fn(batch)
            return counted
        return {n: dataclasses.replace(e, obj=count(n, e.obj)) for n, e in task_baselines(self, task).items()}

    def seeds(where, stack):
        return run_seeds([0, 1], jobs=1, stack=stack, task="linrec", model="gpt2l", steps=20, device="cpu",
                         out=str(tmp_path / where), overrides={**TINY, "eval.ood": True})

    monkeypatch.setattr(Registry, "task_baselines", counting)
    together = seeds("stacked", True)
    stacked_calls, calls = calls, collections.Counter()
    alone = seeds("separate", False)
    assert len({shift for shift, _, _ in calls}) > 1 and {n for _, _, n in calls} > {256}  # OOD sets; screens
    assert calls == {call: 2 * count for call, count in stacked_calls.items()}  # two seeds alone, once stacked
    def baselines(metrics):  # each evaluation set's baseline scores (the model's differ in the last bits)
        sets = {"main": metrics, **{shift: v for shift, v in metrics["ood"].items()}}
        return {(s, name): p for s, v in sets.items() if "curves" in v  # a shift the model cannot take: skipped
                for name, p in v["curves"]["predictors"].items() if name != "model"}

    for (_, _, m1), (_, _, m2) in zip(together, alone):
        assert len(baselines(m2)) > 10 and baselines(m1) == baselines(m2)


@pytest.mark.slow
def test_a_killed_stacked_job_resumes_seed_by_seed(tmp_path, monkeypatch):
    """Killed after its checkpoint at step 20: each seed holds an ordinary checkpoint, and a rerun continues
    each seed from it (not stacked again) to metrics that match the uninterrupted stacked job."""
    from iclbench import stacked, store

    reference = _seeds(tmp_path / "whole", True, seeds=(0, 1))
    real = stacked.StackedSeeds.step
    calls = {"n": 0}

    def dies_at_step_25(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(stacked.StackedSeeds, "step", dies_at_step_25)
    with pytest.raises(KeyboardInterrupt):
        _seeds(tmp_path / "killed", True, seeds=(0, 1))
    monkeypatch.setattr(stacked.StackedSeeds, "step", real)
    dirs = sorted((tmp_path / "killed").iterdir())
    assert [store.read_json(d / store.STATUS)["status"] for d in dirs] == ["interrupted"] * 2
    assert all(store.load_training_state(d / store.TRAIN_STATE)["step"] == 20 for d in dirs)
    resumed = _seeds(tmp_path / "killed", True, seeds=(0, 1))
    assert [o for _, o, _ in resumed] == ["resumed"] * 2
    for (_, _, m1), (_, _, m2) in zip(resumed, reference):
        assert m1["summary"]["model"]["mean"] == pytest.approx(m2["summary"]["model"]["mean"], rel=1e-3)



def test_a_stacked_seed_that_diverges_stops_alone_and_the_others_train_on(seed_1_diverges_at_step_7):
    """The loop checks each seed's loss: a seed whose loss turns non-finite gets that step logged and a
    TrainingDiverged; the other seeds keep training to the end, logged as before."""
    from iclbench.errors import TrainingDiverged
    from iclbench.trainer import Trainee, train_together

    task = get_registry().task("affine")(None)
    logged = {seed: [] for seed in range(3)}
    trainees = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = GPT(GPTOptions(n_layers=1, d_model=16, n_heads=2, d_mlp=16), 1, 1, task.context_len)
        trainees.append(Trainee(model, seed, log=lambda step, m, seed=seed: logged[seed].append(step)))
    out = train_together(trainees, task, TrainOptions(steps=20, batch_size=4, warmup=0, log_every=5),
                         torch.device("cpu"))
    assert isinstance(out[1], TrainingDiverged) and out[1].step == 7 and "diverged at step 7" in str(out[1])
    assert logged[1] == [5, 7] and logged[0] == logged[2] == [5, 10, 15, 20]
    assert out[0]["stacked_with"] == out[2]["stacked_with"] == 3 and out[0]["steps"] == 20


def test_a_diverged_stacked_seed_is_recorded_so_and_the_others_complete(tmp_path, seed_1_diverges_at_step_7):
    from iclbench import store
    from iclbench.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="diverged at step 7"):
        _seeds(tmp_path, True)
    dirs = sorted(tmp_path.iterdir())
    assert [store.read_json(d / store.STATUS)["status"] for d in dirs] == ["complete", "diverged", "complete"]
    assert "diverged at step 7" in store.read_json(dirs[1] / store.STATUS)["message"]


def test_stacked_seeds_take_their_own_learning_rates_and_a_stopped_seed_stays_put():
    """``train.until: flat`` stops seeds one by one: a stopped seed gets lr 0 and its weights must not move,
    while the others take exactly the update a separate run would at their own rate."""
    task = get_registry().task("linreg")(None)
    o = TrainOptions(steps=5, batch_size=8, lr=3e-3, weight_decay=0.1)  # decay: the update is not just Adam's
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(GPT(GPTOptions(n_layers=1, d_model=16, n_heads=2, d_mlp=32), task.d_in, 1, task.context_len))
    separate = [copy.deepcopy(m) for m in models]
    frozen = copy.deepcopy(models[2].state_dict())
    stacked = StackedSeeds(models, o)
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    norm = task.normalizer("cpu")
    opts = [make_optimizer(m, o) for m in separate]
    rates = [2e-3, 5e-4, 0.0]
    for step in range(3):
        batches = [task.sample(o.batch_size, g) for g in gens]
        stacked.step(batches, norm, rates, None)
        for m, opt, b, lr in zip(separate[:2], opts, batches, rates):
            train_step(m, opt, b, norm, lr, o, None)
    for i in range(2):
        state = stacked.state_dict(i, models[i])
        for name, p in separate[i].state_dict().items():
            assert torch.allclose(state[name], p, rtol=1e-4, atol=1e-5), (i, name)
    stopped = stacked.state_dict(2, models[2])
    assert all(torch.equal(stopped[name], p) for name, p in frozen.items())
