"""``train.until: flat``: the held-out stop rule, its schedule, its record in metrics.json, its hash, resuming
it and stopping stacked seeds one by one; and the regression family's curriculum."""

import dataclasses
import math

import pytest
import torch

import iclbench
from conftest import tiny_run
from iclbench import store
from iclbench.config import resolve
from iclbench.models.gpt import GPT, GPTOptions
from iclbench.options import TrainOptions
from iclbench.registry import get_registry
from iclbench.trainer import (Curriculum, HeldOut, Schedule, Stop, Trainee, TrainingState, flat_check,
                              train, train_together)

CPU = torch.device("cpu")
FLAT = TrainOptions(until="flat", max_steps=1200, warmup=10, eval_every=10, flat_window=2, heldout=256,
                    batch_size=16, log_every=10, checkpoint_every=0)


class Held:
    """A stand-in :class:`HeldOut`: a reference of 0.1 per sequence, the zero predictor at 1."""

    t = 1.966  # Student's t, 95 %, 399 degrees of freedom

    def __init__(self, n=400, reference=True):
        self.reference = torch.full((n,), 0.1, dtype=torch.float64) if reference else None
        self.zero = torch.ones(n, dtype=torch.float64)


def scorings(levels, noise=0.02, n=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [level + noise * torch.randn(n, generator=gen, dtype=torch.float64) for level in levels]


def first_flat(levels, o=FLAT, held=None, **kw):
    stop, held = Stop(), held or Held()
    for k, errors in enumerate(scorings(levels, **kw)):
        if flat_check(stop, errors, held, (k + 1) * o.eval_every, o, may_stop=True):
            return k, stop
    return None, stop


def test_flat_is_declared_where_the_curve_stops_falling_not_before():
    falling = [0.5 * 0.8 ** k + 0.1 for k in range(12)]  # still falling by much more than 5 % of its excess
    assert first_flat(falling)[0] is None
    k, stop = first_flat(falling[:6] + [falling[5]] * 8)
    assert k == 6 + 2  # the window (2 scorings) of the flat part against the 2 before it must both be flat
    lo, hi = stop.history[-1]["improvement"]
    assert hi < stop.history[-1]["tolerance"] and lo < 0 < hi


def test_noise_alone_never_makes_a_falling_curve_flat():
    """The improvement's interval clears the tolerance only when the data say so: with sequences too noisy to
    tell, a curve that falls is not declared flat (an interval, not a point estimate below a cut)."""
    falling = [0.3 - 0.01 * k for k in range(12)]  # 0.01 a scoring: twice the tolerance over a window
    assert first_flat(falling, noise=0.5)[0] is None


def test_one_outlying_scoring_stops_a_falling_curve_by_window_means_but_not_by_medians():
    """A spike at one scoring (the error at the full learning rate jumps for every sequence) inflates the recent
    window's mean: under ``flat_stat: mean`` a curve still falling by ~3 times the tolerance a window is called
    flat there. Medians over the window's scorings ignore it, and still find the curve flat once it stops
    falling."""
    mean, median = (dataclasses.replace(FLAT, flat_window=4, flat_stat=s) for s in ("mean", "median"))
    falling = [0.1 + 0.3 - 0.01 * k for k in range(16)]  # excess 0.30 → 0.15: tolerance ≤ 0.014, gain 0.04
    spiked = falling[:10] + [falling[10] + 0.15] + falling[11:]
    assert first_flat(falling, mean)[0] is None and first_flat(falling, median)[0] is None
    assert first_flat(spiked, mean)[0] == 10  # flat on the spike itself
    assert first_flat(spiked, median)[0] is None
    level = falling[:8] + [falling[7]] * 10
    assert first_flat(level, median)[0] == first_flat(level, mean)[0] == 8 + 4  # the flat part's first window
    assert first_flat([0.3 - 0.01 * k for k in range(16)], median, noise=0.5)[0] is None  # noise alone: never


def test_flat_stat_mean_keeps_every_recorded_hash_and_anything_else_is_one_clear_error():
    registry = get_registry()
    flat = resolve(registry, task="affine", model="gpt1l", overrides=["train.until=flat"])
    assert resolve(registry, task="affine", model="gpt1l", overrides=["train.until=flat", "train.flat_stat=mean"]) \
        .config_hash == flat.config_hash
    assert resolve(registry, task="affine", model="gpt1l", overrides=["train.until=flat", "train.flat_stat=median"]) \
        .config_hash != flat.config_hash
    assert resolve(registry, task="affine", model="gpt1l", overrides=["train.flat_stat=median"]).config_hash \
        == resolve(registry, task="affine", model="gpt1l").config_hash  # meaningless under until: steps
    with pytest.raises(ValueError, match="flat_stat must be mean or median, got 'mode'"):
        TrainOptions(until="flat", flat_stat="mode").validate()


def test_a_plateau_not_yet_partly_learned_is_not_flat_but_the_same_without_a_reference_is():
    """ICL curves sit on long plateaus before they learn; stopping on one would report the plateau."""
    plateau = [0.9] * 10
    assert first_flat(plateau)[0] is None
    assert first_flat([0.58] * 10)[0] is None  # relative excess 0.53: not even partly learned
    assert first_flat([0.45] * 10)[0] is not None  # 0.39: partly learned, and flat
    assert first_flat(plateau, held=Held(reference=False))[0] is not None


def test_schedule_warms_up_holds_then_cools_down_for_a_share_of_the_steps_so_far():
    o = TrainOptions(until="flat", max_steps=1000, warmup=10, lr=1e-3, min_lr_ratio=0.05, cooldown=0.2)
    stop = Stop()
    sched = Schedule(o, stop)
    assert sched.lr(4) == pytest.approx(5e-4) and sched.lr(500) == 1e-3
    assert sched.last_decay == 833 and sched.end == 1000  # never flat: the cooldown ends at the cap
    assert sched.lr(999) == pytest.approx(5e-5, rel=0.01) and sched.lr(1000) == pytest.approx(5e-5)
    stop.decay_from = 300
    assert sched.end == 360 and sched.lr(299) == 1e-3 and sched.lr(330) == pytest.approx(0.525e-3)
    steps = TrainOptions(steps=100, warmup=10)
    assert Schedule(steps).end == 100  # until steps: the old schedule exactly
    from iclbench.trainer import learning_rate
    assert [Schedule(steps).lr(s) for s in range(100)] == [learning_rate(s, steps) for s in range(100)]


def tiny_model(task, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTOptions(n_layers=1, d_model=16, n_heads=2, d_mlp=32), task.d_in, task.d_out, task.context_len)


def test_training_until_flat_stops_records_why_and_is_deterministic():
    task = get_registry().task("affine")()
    bayes = task.baselines()["bayes"]
    logs = [[], []]
    outcomes = [train(tiny_model(task), task, FLAT, seed=1, device=CPU, reference=bayes,
                      log=lambda step, m, lines=lines: lines.append({"step": step, **m})) for lines in logs]
    untimed = [{**o["stop"], "time_s": 0, "heldout": [{**h, "elapsed_s": 0} for h in o["stop"]["heldout"]]}
               for o in outcomes]
    assert untimed[0] == untimed[1]
    stop = outcomes[0]["stop"]
    assert stop["reason"] in ("flat", "cap") and stop["steps"] == outcomes[0]["steps"] <= FLAT.max_steps
    assert [h["step"] for h in stop["heldout"]][:3] == [10, 20, 30] and stop["heldout"][-1]["step"] == stop["steps"]
    if stop["reason"] == "flat":
        assert stop["steps"] == stop["decay_from"] + math.ceil(FLAT.cooldown * stop["decay_from"])
    # each scoring is logged as it happens, with the step training ends at as planned then: the cap until the
    # cooldown starts, then the run's end
    held_lines = [line for line in logs[0] if "heldout_error" in line]
    assert [(h["step"], h["heldout_error"], h["heldout_excess"]) for h in held_lines] \
        == [(h["step"], h["error"], h["excess"]) for h in stop["heldout"]]
    decay = stop["decay_from"] if stop["reason"] == "flat" else stop["steps"]
    assert {h["last_step"] for h in held_lines if h["step"] < decay} == {FLAT.max_steps}
    assert {h["last_step"] for h in held_lines if h["step"] >= decay} == {stop["steps"]}
    # the held-out errors are the model's on the full task's held-out sequences, over Bayes'
    model = tiny_model(task)
    train(model, task, FLAT, seed=1, device=CPU, reference=bayes)
    held = HeldOut(task, FLAT.heldout, CPU, bayes)
    with torch.no_grad():
        errors = held.errors(model(held.batch.inputs))
    assert stop["heldout"][-1]["error"] == pytest.approx(float(errors.mean()), rel=1e-5)
    assert stop["heldout"][-1]["excess"] == pytest.approx(float((errors - held.reference).mean()), rel=1e-4)


def test_a_run_resumed_mid_way_stops_where_the_uninterrupted_one_did(tmp_path):
    task = get_registry().task("affine")()
    o = dataclasses.replace(FLAT, checkpoint_every=40)
    full = tiny_model(task)
    whole = train(full, task, o, seed=2, device=CPU)
    train(tiny_model(task), task, o, seed=2, device=CPU,  # each checkpoint as a file, as a run writes it
          checkpoint=lambda s: store.save_training_state(tmp_path / f"{s.step:06d}.pt", s.to_dict()))
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) >= 2
    state = TrainingState.from_dict(store.load_training_state(files[len(files) // 2]))
    resumed = tiny_model(task)
    again = train(resumed, task, o, seed=2, device=CPU, resume=state)
    untimed = lambda stop: [{k: v for k, v in h.items() if k != "elapsed_s"} for h in stop["heldout"]]  # noqa: E731
    assert untimed(again["stop"]) == untimed(whole["stop"]) and again["steps"] == whole["steps"]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_stacked_seeds_stop_each_on_its_own_as_their_separate_runs_do():
    task = get_registry().task("affine")()
    o = dataclasses.replace(FLAT, flat_tol=0.2)
    alone = [train(tiny_model(task, seed), task, o, seed=seed, device=CPU) for seed in (0, 1, 2)]
    models = [tiny_model(task, seed) for seed in (0, 1, 2)]
    together = train_together([Trainee(m, seed) for seed, m in enumerate(models)], task, o, CPU)
    for a, b in zip(alone, together):
        assert (a["steps"], a["stop"]["reason"]) == (b["steps"], b["stop"]["reason"])
        assert [h["step"] for h in a["stop"]["heldout"]] == [h["step"] for h in b["stop"]["heldout"]]
    assert len({a["steps"] for a in alone}) > 1, "the seeds must stop at different steps for this to test anything"


def test_until_steps_keeps_every_recorded_hash_and_naming_steps_means_steps():
    registry = get_registry()
    base = resolve(registry, task="affine", model="gpt1l")
    # the hashes these configurations had before the stop rule and the curriculum options existed
    assert base.config_hash == "1013c344"
    old_recipe = ["train.lr=0.0005", "train.batch_size=64", "train.warmup=200"]  # the regression defaults before
    assert resolve(registry, task="linreg", model="gpt3l", overrides=["train.until=steps", *old_recipe]) \
        .config_hash == "1cfdbc58"
    assert resolve(registry, task="relu-nn", model="gpt3l", overrides=["train.steps=1500", *old_recipe]) \
        .config_hash == "7821b60b"
    for key, value in (("eval_every", 7), ("max_steps", 5), ("flat_tol", 0.5)):
        assert resolve(registry, task="affine", model="gpt1l", overrides=[f"train.{key}={value}"]).config_hash \
            == base.config_hash  # meaningless under until: steps
    flat = resolve(registry, task="affine", model="gpt1l", overrides=["train.until=flat"])
    assert flat.config_hash != base.config_hash
    assert resolve(registry, task="affine", model="gpt1l", overrides=["train.until=flat", "train.steps=5"]).config_hash \
        == flat.config_hash  # steps means nothing until flat
    assert resolve(registry, task="affine", model="gpt1l", overrides=["train.until=flat", "train.eval_every=7"]) \
        .config_hash != flat.config_hash
    assert resolve(registry, task="linreg", model="gpt3l",
                   overrides=["train.until=steps", "task.curriculum=false", *old_recipe]).config_hash == "1cfdbc58"
    explicit = resolve(registry, task="linreg", model="gpt1l", overrides=["train.steps=50"])
    assert explicit.train.until == "steps" and explicit.train.steps == 50


def test_regression_curriculum_grows_dimension_and_points_and_evaluation_uses_the_full_task():
    task = get_registry().task("linreg")()
    task = task.with_options(curriculum=True, d=8, n_points=12)
    sched = [task.curriculum(step, 6000) for step in (0, 399, 400, 800, 1200, 1600, 1999, 2000, 5999)]
    assert sched[0] == {"active_dims": 2, "n_points": 4} == sched[1]
    assert sched[2] == {"active_dims": 4, "n_points": 6}
    assert sched[3] == {"active_dims": 5, "n_points": 8} and sched[4] == {"active_dims": 6, "n_points": 10}
    assert sched[5] == sched[6] == sched[7] == sched[8] == {}  # full task from the last stage on
    assert task.with_options(curriculum=False).curriculum(0, 6000) == {}
    assert task.curriculum(0, 300)["n_points"] == 4 and task.curriculum(100, 300) == {}  # ramp: a third of 300
    # a stage zeroes the unused coordinates, and its normalizer is its own signal's variance (closed form
    # against the Monte-Carlo estimate of the base class)
    stage = Curriculum(task, 6000)(0).task
    batch = stage.sample(4096, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == (4096, 8, 9) and bool((batch.inputs[:, 0::2, 2:8] == 0).all())
    mc = iclbench.task.Task.normalizer(stage)[0]
    assert float(stage.normalizer()[0]) == pytest.approx(float(mc), rel=0.03)
    for name in ("sparse-linreg", "relu-nn"):
        other = get_registry().task(name)().with_options(active_dims=2)
        assert float(other.normalizer()[0]) == pytest.approx(float(iclbench.task.Task.normalizer(other)[0]),
                                                             rel=0.04), name
    # the held-out set (and so the evaluation) is the task as configured, whatever stage training is on
    assert HeldOut(task, 16, CPU).batch.inputs.shape == (16, 24, 9)


@pytest.mark.slow
def test_a_run_until_flat_records_its_stop_in_metrics_and_the_report_draws_the_heldout_curve(tmp_path):
    overrides = tiny_run(train__until="flat", train__max_steps=300, train__eval_every=20, train__flat_window=2,
                         train__heldout=128, eval__probes=False, eval__ood=False)
    result = iclbench.run(task="affine", model="gpt1l", out=str(tmp_path / "runs"), overrides=overrides)
    stop = result.metrics["train"]["stop"]
    assert stop["reason"] in ("flat", "cap") and stop["heldout"]
    from iclbench.report import build_report
    build_report([result.run_dir], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Stopped at" in text and "learning.png" in text


def test_bench_to_learned_reads_both_recipes_off_their_heldout_curves(capsys):
    from iclbench.cli import main
    from iclbench.learned import GARG, recipes

    assert recipes(get_registry().task("linreg").Options())["garg"] == {**GARG, "task.curriculum": True}
    assert "task.curriculum" not in recipes(get_registry().task("affine").Options())["garg"]
    code = main(["bench", "--task", "affine", "--model", "gpt1l", "--to-learned", "--max-steps", "120",
                 "--device", "cpu", "--set", "model.d_model=16", "--set", "model.d_mlp=32",
                 "--set", "train.eval_every=20", "--set", "train.heldout=64", "--set", "train.flat_window=1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| ours " in out and "| garg " in out and "Garg et al.'s recipe over ours" in out
    assert main(["bench", "--task", "affine", "--model", "gpt1l", "--to-learned", "--max-steps", "0"]) == 2


def test_without_a_cooldown_training_ends_at_the_step_it_was_flat():
    task = get_registry().task("affine")()
    stats = train(tiny_model(task), task, dataclasses.replace(FLAT, cooldown=0.0, flat_tol=0.5), seed=0, device=CPU)
    assert stats["stop"]["reason"] == "flat" and stats["steps"] == stats["stop"]["decay_from"]
