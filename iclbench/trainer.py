"""The training loop, one for one model or N seeds trained together: data drawn on the device from each seed's
generator, warmup + cosine, an optional curriculum declared by the task, the loss checked for divergence and
logged, resumable checkpoints. How a step is computed is the stepper's business (:class:`iclbench.step.OneModel`
for one model, :class:`iclbench.stacked.StackedSeeds` for N); logging, checkpoints and divergence happen here,
once, for each seed."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import ICLBenchError, TrainingDiverged
from .options import TrainOptions
from .stacked import StackedSeeds
from .step import OneModel, compile_error, mask_index, normalized_error
from .task import Batch, Task
from .terminal import bar_size


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda, then mps, then cpu. An explicit accelerator that is absent is an error."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_ok else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ICLBenchError(f"unknown device {name!r} (allowed: auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ICLBenchError(f"device {name!r} requested but CUDA is not available on this machine "
                                "(use --device cpu or --device auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ICLBenchError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA "
                                "device(s) exist")
    elif device.type == "mps":
        if not mps_ok:
            raise ICLBenchError(f"device {name!r} requested but MPS is not available on this machine")
    elif device.type != "cpu":
        raise ICLBenchError(f"unknown device {name!r} (allowed: auto, cpu, cuda, cuda:N, mps)")
    return device


def learning_rate(step: int, o: TrainOptions) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    span = max(1, o.steps - o.warmup)
    progress = min(1.0, (step - o.warmup) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


#: the held-out set of ``train.until: flat`` is drawn from this seed (on the CPU, like the evaluation set, and
#: from neither the evaluation's nor the probes' seed), so every training seed is judged on the same sequences
HELDOUT_SEED = 0x51A7
#: 95 % two-sided, for the improvement over a window
FLAT_CONFIDENCE = 0.95
#: a run may stop only once its held-out relative excess over the reference has an interval wholly below this
#: (:data:`iclbench.evaluate.NOT_LEARNED_ABOVE`: at least partly learned); before, it is on a plateau, not flat,
#: and goes on (a looser guard, "not while the interval lies wholly above 0.5", stopped linreg with the
#: curriculum at 0.584, relative excess 0.52, where runs at other settings go on to 0.235)
FLAT_ONLY_BELOW = 0.5


class HeldOut:
    """The fixed held-out sequences ``train.until: flat`` scores: the full task (never a curriculum stage),
    each sequence's error (mean normalized error over the scored positions from the task's ``score_from``),
    beside the reference predictor's (the task's Bayes baseline, where it has one) and the zero predictor's,
    computed once."""

    def __init__(self, task: Task, n: int, device: torch.device, reference: Callable | None = None):
        gen = torch.Generator("cpu").manual_seed(HELDOUT_SEED)
        self.batch = task.sample(n, gen, "cpu").to(device)
        self.normalizer = task.normalizer(device).to(device)
        mask = self.batch.mask & (torch.arange(self.batch.mask.shape[0], device=device) >= task.score_from)
        self.cols = mask_index(mask if bool(mask.any()) else self.batch.mask)
        self.reference = None if reference is None else self.errors(reference(self.batch).float())
        self.zero = self.errors(torch.zeros_like(self.batch.targets))
        from .probes.stats import t_quantile

        self.t = t_quantile(0.5 + FLAT_CONFIDENCE / 2, n - 1)  # once: every scoring has n sequences

    def errors(self, pred: torch.Tensor) -> torch.Tensor:
        """Per-sequence error ``[..., B]`` of predictions ``[..., B, T, d_out]``, float64 on the CPU."""
        err = normalized_error(pred, self.batch, self.normalizer)
        if self.cols is not None:
            err = err.index_select(-1, self.cols)
        return err.mean(-1).double().cpu()


@dataclass
class Stop:
    """One seed's stopping state under ``train.until: flat``: the held-out curve (``history``), the
    per-sequence errors of the last ``2 * flat_window`` scorings (``window``), and once decided, the step the
    cooldown began (``decay_from``) and why (``reason``: "flat", or "cap" when the cap came first)."""
    history: list = field(default_factory=list)
    window: list = field(default_factory=list)
    decay_from: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Schedule:
    """The learning rate and the last step of one seed. ``until: steps``: warmup + cosine to ``steps``
    (:func:`learning_rate`). ``until: flat`` (warmup-stable-decay): warmup, the full rate until the held-out
    error is flat at step S, then a cosine cooldown of ``ceil(cooldown * S)`` steps, and the end; a run that
    is never flat starts its cooldown so that it ends at ``max_steps``."""

    def __init__(self, o: TrainOptions, stop: Stop | None = None):
        self.o, self.stop = o, stop
        self.last_decay = math.floor(o.max_steps / (1 + o.cooldown))  # the cooldown that ends at the cap

    @property
    def decay_from(self) -> int:
        return self.stop.decay_from if self.stop.decay_from is not None else self.last_decay

    @property
    def end(self) -> int:
        if self.stop is None:
            return self.o.steps
        if self.stop.decay_from is None:
            return self.o.max_steps
        return min(self.o.max_steps, self.stop.decay_from + math.ceil(self.o.cooldown * self.stop.decay_from))

    def lr(self, step: int) -> float:
        o = self.o
        if self.stop is None:
            return learning_rate(step, o)
        if step < o.warmup:
            return o.lr * (step + 1) / o.warmup
        start = self.decay_from
        if step < start:
            return o.lr
        progress = min(1.0, (step - start) / max(1, self.end - start))
        return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def flat_check(stop: Stop, errors: torch.Tensor, held: HeldOut, step: int, o: TrainOptions,
               may_stop: bool) -> bool:
    """Record one held-out scoring of a seed in ``stop``; True when it is flat now: the per-sequence mean
    error over the last ``flat_window`` scorings against the ``flat_window`` before them (means over a window,
    because the error at the full learning rate jitters from one scoring to the next; medians with
    ``flat_stat: median``, so that one outlying scoring cannot decide), an improvement whose
    95 % interval (Student's t over the paired sequences) lies wholly below ``flat_tol`` times the reducible
    error (the error over the reference, floored at 0.01; over 0 without a reference).
    Never while ``may_stop`` is False (warmup, a curriculum stage) or before the run is at least partly
    learned (relative excess over the reference below 0.5 by its interval): an in-context learner's curve has
    long plateaus before it learns, and stopping on one would report a plateau as the answer."""
    from .probes.stats import EXCESS_FLOOR

    n, w, t = errors.numel(), o.flat_window, held.t
    ref = held.reference if held.reference is not None else torch.zeros_like(errors)
    excess = errors - ref
    gap = float((held.zero - ref).mean().clamp_min(EXCESS_FLOOR))
    half = t * float(excess.std()) / math.sqrt(n)
    entry = {"step": step, "error": float(errors.mean()),
             "excess": None if held.reference is None else float(excess.mean()),
             "relative_excess": [(float(excess.mean()) - half) / gap, (float(excess.mean()) + half) / gap]}
    stop.window = (stop.window + [errors])[-2 * w:]
    flat = False
    if len(stop.window) == 2 * w:
        scorings = torch.stack(stop.window)  # [2 * w, sequences]
        if o.flat_stat == "median":
            before, recent = scorings[:w].quantile(0.5, dim=0), scorings[w:].quantile(0.5, dim=0)
        else:
            before, recent = scorings[:w].mean(0), scorings[w:].mean(0)
        gain = before - recent
        gain_half = t * float(gain.std()) / math.sqrt(n)
        scale = max(float((recent - ref).mean()), EXCESS_FLOOR)
        entry["improvement"] = [float(gain.mean()) - gain_half, float(gain.mean()) + gain_half]
        entry["tolerance"] = o.flat_tol * scale
        plateau = held.reference is not None and entry["relative_excess"][1] >= FLAT_ONLY_BELOW
        flat = may_stop and not plateau and entry["improvement"][1] < entry["tolerance"]
    stop.history.append(entry)
    return flat


class Stage:
    """One curriculum stage: its task, and what the step needs from it kept on the device — the
    normalizer (computed once, not per step) and the scored positions (found from the stage's first batch;
    a task's mask depends on its options only)."""

    def __init__(self, task: Task, device: torch.device, loss_from: int = 0):
        self.task, self.device, self.loss_from = task, device, loss_from
        self.normalizer = task.normalizer(device).to(device)
        self._scored: torch.Tensor | None | str = "unset"
        self._seeds: dict[int, Task] = {}

    def for_seed(self, seed: int) -> Task:
        """The task training seed ``seed`` samples from in this stage (:meth:`Task.training_task`)."""
        if seed not in self._seeds:
            self._seeds[seed] = self.task.training_task(seed)
        return self._seeds[seed]

    def scored(self, batch: Batch) -> torch.Tensor | None:
        if isinstance(self._scored, str):
            first = torch.arange(batch.mask.shape[0], device=batch.mask.device) >= self.loss_from
            self._scored = mask_index(batch.mask & first)  # once per stage, not per step
        return self._scored


class Curriculum:
    """The stage to train on at each step: the task with ``task.curriculum(step, steps)`` applied. One
    :class:`Stage` per distinct set of changes, so a stage's normalizer is computed once."""

    def __init__(self, task: Task, steps: int, device: torch.device | str = "cpu", loss_from: int = 0):
        self.task, self.steps, self.device, self.stages = task, steps, torch.device(device), {}
        self.loss_from = loss_from  # train.loss_positions: "scored" trains on positions >= score_from only

    def changes(self, step: int) -> dict:
        """The task's option changes at ``step`` ({} once training is on the task as configured)."""
        return self.task.curriculum(step, self.steps) or {}

    def __call__(self, step: int) -> Stage:
        changes = self.changes(step)
        key = repr(sorted(changes.items()))
        if key not in self.stages:
            try:
                task = self.task.with_options(**changes) if changes else self.task
            except TypeError as exc:
                raise ICLBenchError(f"task '{self.task.name}' curriculum at step {step} sets {changes}: "
                                    f"{exc}") from None
            self.stages[key] = Stage(task, self.device, self.loss_from)
        return self.stages[key]


class DeviceLoss:
    """Each seed's running loss and first non-finite step, accumulated on the device without a sync; read
    (one sync) every ``log_every`` steps and before a checkpoint. The sums are float64 (float32 on MPS),
    which adds float32 losses exactly as a Python float would."""

    def __init__(self, device: torch.device, running: list[float]):
        dtype = torch.float32 if device.type == "mps" else torch.float64
        n = len(running)
        self.sum = torch.tensor(running, dtype=dtype, device=device)
        self.bad_step = torch.zeros(n, dtype=torch.int64, device=device)  # 0: none yet
        self.bad_loss = torch.zeros(n, dtype=torch.float32, device=device)
        self.last = torch.full((n,), float("nan"), device=device)

    def add(self, loss: torch.Tensor, step_number: int):
        """``loss``: ``[N]``, one per seed."""
        self.sum += loss
        first = ~torch.isfinite(loss) & (self.bad_step == 0)
        self.bad_step = torch.where(first, step_number, self.bad_step)
        self.bad_loss = torch.where(first, loss.float(), self.bad_loss)
        self.last = loss

    def read(self) -> tuple[list[float], list[int], list[float], list[float]]:
        """Per seed: ``(sum, first non-finite step or 0, its loss, last loss)``: one transfer."""
        total, bad, bad_loss, last = torch.stack([self.sum.double(), self.bad_step.double(),
                                                  self.bad_loss.double(), self.last.double()]).tolist()
        return total, [int(b) for b in bad], bad_loss, last


@dataclass
class TrainingState:
    """Where an unfinished run's training stands (``train_state.pt``): mid-training, all a resumed run needs
    to continue bit for bit (weights, AdamW state, the data generator, the unlogged part of the running
    loss); once trained, the training figures (``trained``), so that a run killed while evaluating or
    probing is not trained again. ``log_offset``: the length of ``train.log`` at this point; ``segments``:
    the thread count and device of each stretch of training."""

    step: int
    device: str
    model: dict | None = None
    optimizer: dict | None = None
    generator: torch.Tensor | None = None
    running_loss: float = 0.0
    window_tokens: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    trained: dict | None = None
    log_offset: int = 0
    segments: list = field(default_factory=list)
    stop: dict | None = None  # train.until: flat: the seed's :class:`Stop`

    def to_dict(self) -> dict:
        """What ``train_state.pt`` holds: tensors, numbers, strings, lists and dicts only (no pickled class)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data) -> "TrainingState":
        if not isinstance(data, dict) or "step" not in data or "device" not in data:
            raise ValueError("not a training state")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Trainee:
    """One seed in the loop: its model (trained in place), its seed (its data stream), where its training
    curve goes (``log(step, metrics)``) and its checkpoints (``checkpoint(state)``), and the state to resume."""
    model: torch.nn.Module
    seed: int
    log: Callable[[int, dict], None] = lambda step, metrics: None
    checkpoint: Callable[[TrainingState], None] | None = None
    resume: TrainingState | None = None


def train_together(trainees: list[Trainee], task: Task, o: TrainOptions, device: torch.device, *,
                   progress: bool = False, reference: Callable | None = None) -> list[dict | TrainingDiverged]:
    """Train every trainee's model in place on ``task``, one model alone or N seeds stacked into one
    (:class:`~iclbench.stacked.StackedSeeds`, fresh starts only); return per seed its training figures, or
    the :class:`TrainingDiverged` that stopped it (a stacked seed that diverges leaves the others training).

    Every ``o.log_every`` steps each seed's ``log`` gets its mean loss; every ``o.checkpoint_every`` steps its
    ``checkpoint`` gets its whole :class:`TrainingState`; passed back as ``resume``, that state continues
    exactly where it was taken, so an interrupted run ends with the same numbers as one that never stopped
    (same device). Each seed draws exactly the batches its separate run would (its own generator).

    With ``o.until == "flat"`` each seed is scored on the :class:`HeldOut` set every ``o.eval_every`` steps
    (``reference``: the task's Bayes predictor, for the excess) and stops on its own (:func:`flat_check`,
    :class:`Schedule`); a stacked seed that has stopped takes no more updates while the others go on."""
    from tqdm.auto import tqdm

    n = len(trainees)
    resume = trainees[0].resume
    if n > 1 and any(t.resume is not None for t in trainees):
        raise ValueError("stacked seeds start afresh; resume each alone")
    if n > 1 and any(task.training_task(t.seed) is not task for t in trainees):
        raise ValueError(f"seeds of {task!r} train on distributions of their own (a pool of rules each); "
                         "train each alone")
    gens = [torch.Generator(device=device).manual_seed(t.seed) for t in trainees]
    for t in trainees:
        t.model.train()
    stepper = OneModel(trainees[0].model, o, device) if n == 1 else StackedSeeds([t.model for t in trainees], o)
    flat = o.until == "flat"
    stops = [Stop() if flat else None for _ in trainees]
    first, running, window_tokens, tokens_done, elapsed = 0, [0.0] * n, 0, 0, 0.0
    if resume is not None:
        stepper.load(0, resume.model, resume.optimizer)
        gens[0].set_state(resume.generator)
        first, running, window_tokens = resume.step, [resume.running_loss], resume.window_tokens
        tokens_done, elapsed = resume.tokens, resume.elapsed_s
        if flat and resume.stop:
            stops[0] = Stop(**resume.stop)
    schedules = [Schedule(o, stop) for stop in stops]
    # the held-out set comes from the distribution the seed trains on (its pool of rules, where it has one)
    held = HeldOut(task.training_task(trainees[0].seed), o.heldout, device, reference) if flat else None
    stages = Curriculum(task, o.cap, device, task.score_from if o.loss_positions == "scored" else 0)
    bar = tqdm(total=o.cap, initial=first, disable=not progress, unit="step", leave=False, file=sys.stderr,
               **bar_size(sys.stderr), desc=f"train {task.name}" if n == 1 else f"train {n} seeds stacked")
    start = window_start = time.perf_counter()
    acc = DeviceLoss(device, running)
    outcomes: list = [None] * n
    ended = [None] * n  # per seed: (its last step, the wall time then)
    last = [float("nan")] * n

    def check() -> list[float]:
        """Sync once: stop each seed whose loss went non-finite since the last check (its log gets that
        step), and return the running sums."""
        nonlocal last
        totals, bad, bad_loss, last = acc.read()
        for i, t in enumerate(trainees):
            if bad[i] and outcomes[i] is None and ended[i] is None:
                t.log(bad[i], {"loss": bad_loss[i], "lr": schedules[i].lr(bad[i] - 1)})
                outcomes[i] = TrainingDiverged(bad[i], bad_loss[i])
        return totals

    def live(i: int) -> bool:
        return outcomes[i] is None and ended[i] is None

    def score_heldout(done: int, ending: list[bool]):
        """Score the live seeds due (every ``eval_every`` steps, and at their last step) on the held-out set;
        start the cooldown of those that are flat. Each scoring is logged as it happens (the held-out error, its
        excess over the reference, and ``last_step``: where the seed's training ends as planned now), so a
        logger and a watcher of ``train.log`` see the curve and a flat stop before the run ends."""
        errors = stepper.heldout_errors(held)
        may_stop = done >= o.warmup and not stages.changes(done)
        now = elapsed + time.perf_counter() - start
        for i in range(n):
            if not (live(i) and (done % o.eval_every == 0 or ending[i])):
                continue
            if flat_check(stops[i], errors[i], held, done, o, may_stop and not ending[i]) \
                    and stops[i].decay_from is None and done < schedules[i].last_decay:
                stops[i].decay_from, stops[i].reason = done, "flat"
            entry = stops[i].history[-1]
            entry["elapsed_s"] = now  # training time so far (time to learned, to flat)
            trainees[i].log(done, {"heldout_error": entry["error"], "heldout_excess": entry["excess"],
                                   "last_step": done if ending[i] else schedules[i].end})

    step = first
    try:
        while any(live(i) for i in range(n)) and step < o.cap:
            stage = stages(step)
            batches = [stage.for_seed(t.seed).sample(o.batch_size, g, device) for t, g in zip(trainees, gens)]
            lrs = [schedules[i].lr(step) if live(i) else 0.0 for i in range(n)]
            try:
                losses = stepper.step(batches, stage.normalizer, lrs, stage.scored(batches[0]))
            except Exception as exc:  # torch.compile fails lazily, on the first call
                if o.compile and step == first and not isinstance(exc, ICLBenchError):
                    raise compile_error(exc) from None
                raise
            acc.add(losses, step + 1)
            window_tokens += batches[0].inputs.shape[0] * batches[0].inputs.shape[1]
            bar.update(1)
            step = done = step + 1
            ending = [live(i) and done >= schedules[i].end for i in range(n)]
            if done % o.log_every == 0 or any(ending):
                totals = check()
                if not any(live(i) for i in range(n)):
                    break
                now = time.perf_counter()
                for i, (t, total) in enumerate(zip(trainees, totals)):
                    if live(i):
                        t.log(done, {"loss": total / ((step - 1) % o.log_every + 1), "lr": schedules[i].lr(step - 1),
                                     "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                                     "elapsed_s": elapsed + now - start})
                if n == 1:
                    bar.set_postfix(loss=f"{totals[0] / ((step - 1) % o.log_every + 1):.4g}")
                tokens_done += window_tokens
                window_tokens, window_start = 0, now
                acc.sum.zero_()
            if flat and (done % o.eval_every == 0 or any(ending)):
                score_heldout(done, ending)
                ending = [e or (live(i) and done >= schedules[i].end) for i, e in enumerate(ending)]  # cooldown 0
            for i in range(n):
                if ending[i] and live(i):
                    if stops[i] is not None and stops[i].reason is None:
                        stops[i].reason = "cap"
                    ended[i] = (done, elapsed + time.perf_counter() - start)
            if o.checkpoint_every and done % o.checkpoint_every == 0:
                totals = check()  # never checkpoint a diverged state
                for i, (t, total) in enumerate(zip(trainees, totals)):
                    if live(i) and t.checkpoint is not None:
                        weights, optimizer = stepper.state(i)
                        t.checkpoint(TrainingState(
                            step=done, device=device.type, model=weights, optimizer=optimizer,
                            generator=gens[i].get_state(), running_loss=total, window_tokens=window_tokens,
                            tokens=tokens_done, elapsed_s=elapsed + time.perf_counter() - start,
                            stop=None if stops[i] is None else stops[i].to_dict()))
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = elapsed + time.perf_counter() - start
    stepper.finish([t.model for t in trainees])
    for i, t in enumerate(trainees):
        t.model.eval()
        if outcomes[i] is None:
            steps, time_s = ended[i] or (step, wall)
            outcomes[i] = {"steps": steps, "final_loss": last[i], "train_time_s": wall,
                           "tokens_per_s": tokens_done / max(wall, 1e-9), "resumed_from_step": first}
            if n > 1:
                outcomes[i]["stacked_with"] = n
            if stops[i] is not None:
                outcomes[i]["stop"] = {"until": "flat", "reason": stops[i].reason, "steps": steps,
                                       "time_s": time_s, "decay_from": stops[i].decay_from,
                                       "heldout": stops[i].history}
    return outcomes


def train(model: torch.nn.Module, task: Task, o: TrainOptions, seed: int, device: torch.device, *,
          log: Callable[[int, dict], None] = lambda step, m: None, progress: bool = False,
          resume: TrainingState | None = None,
          checkpoint: Callable[[TrainingState], None] | None = None, reference: Callable | None = None) -> dict:
    """Train one model in place (:func:`train_together` with N = 1); return its training figures. Raises
    :class:`TrainingDiverged` on a non-finite loss."""
    outcome, = train_together([Trainee(model, seed, log, checkpoint, resume)], task, o, device, progress=progress,
                              reference=reference)
    if isinstance(outcome, TrainingDiverged):
        raise outcome
    return outcome
