"""Training loop: data drawn on the device from a seeded generator, AdamW, warmup + cosine, clipping, an
optional curriculum declared by the task, resumable checkpoints, opt-in ``torch.compile``."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch

from .config import TrainOptions
from .errors import ICLBenchError, TrainingDiverged
from .task import Batch, Task


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


def autocast(device: torch.device, precision: str):
    """bf16 autocast only when asked for (``train.precision=bf16``). ``auto`` is fp32 on every device: on an H200
    the default job (gpt3l, batch 64) trained 1.14x faster in fp32 than under bf16 autocast, to the same loss
    (BENCHMARKS.md, "CUDA"), because a d_model-64 step is bound by kernel launches, not by GEMM throughput."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def normalized_error(pred: torch.Tensor, batch: Batch, normalizer: torch.Tensor) -> torch.Tensor:
    """Per-sequence, per-position squared error over the prior-mean error: ``[B, T]``."""
    return (pred.float() - batch.targets.float()).pow(2).mean(-1) / normalizer


def scored_positions(mask: torch.Tensor) -> torch.Tensor | None:
    """The indices of the scored positions of a ``[T]`` mask, or ``None`` when every position is scored.
    Syncs with the device once: the trainer calls it once per curriculum stage, never per step."""
    if bool(mask.all()):
        return None
    return mask.nonzero().flatten()


def training_loss(pred: torch.Tensor, batch: Batch, normalizer: torch.Tensor,
                  scored: torch.Tensor | None) -> torch.Tensor:
    """The training objective: mean normalized error over the scored positions (``scored``: their indices,
    ``None`` for all). ``index_select`` with an index tensor kept on the device takes the place of boolean
    indexing, which syncs; the values and their order are the same, so the loss is bitwise unchanged."""
    err = normalized_error(pred, batch, normalizer)
    return (err if scored is None else err.index_select(1, scored)).mean()


def make_optimizer(model: torch.nn.Module, o: TrainOptions) -> torch.optim.Optimizer:
    """AdamW; its fused kernel (one pass over all weights) on devices that have one."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(0.9, 0.99),
                             fused=fused)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Batch, normalizer: torch.Tensor,
               lr: float, o: TrainOptions, scored: torch.Tensor | None | str = "mask") -> torch.Tensor:
    """One optimisation step on ``batch``; returns the loss as a tensor (the caller decides when to sync).
    ``iclbench bench`` times exactly this function for every model it compares. ``scored``: the indices of
    the scored positions (:func:`scored_positions`), or ``"mask"`` to derive them from ``batch.mask``
    (one sync). Nothing in here waits for the device."""
    if isinstance(scored, str):
        scored = scored_positions(batch.mask)
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast(batch.inputs.device, o.precision):
        pred = model(batch.inputs)
    loss = training_loss(pred, batch, normalizer, scored)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip, foreach=True)
    opt.step()
    return loss.detach()


def compile_model(model: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """``torch.compile(model)``, sharing its parameters; a failure is one line, not a compiler traceback.
    On CUDA with mode ``reduce-overhead``: the compiled forward and backward are captured as CUDA graphs
    (the step has no host sync, so capture is possible); elsewhere the default mode, as before."""
    cuda = device is not None and device.type == "cuda"
    try:
        return torch.compile(model, mode="reduce-overhead") if cuda else torch.compile(model)
    except Exception as exc:
        raise compile_error(exc) from None


def compile_error(exc: Exception) -> ICLBenchError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ICLBenchError(f"--compile is not supported here ({type(exc).__name__}: {first[:200]}); "
                         "run without --compile")


class Stage:
    """One curriculum stage: its task, and what the step needs from it kept on the device — the
    normalizer (computed once, not per step) and the scored positions (found from the stage's first batch;
    a task's mask depends on its options only)."""

    def __init__(self, task: Task, device: torch.device, loss_from: int = 0):
        self.task, self.device, self.loss_from = task, device, loss_from
        self.normalizer = task.normalizer(device).to(device)
        self._scored: torch.Tensor | None | str = "unset"

    def scored(self, batch: Batch) -> torch.Tensor | None:
        if isinstance(self._scored, str):
            first = torch.arange(batch.mask.shape[0], device=batch.mask.device) >= self.loss_from
            self._scored = scored_positions(batch.mask & first)  # once per stage, not per step
        return self._scored


class Curriculum:
    """The stage to train on at each step: the task with ``task.curriculum(step, steps)`` applied. One
    :class:`Stage` per distinct set of changes, so a stage's normalizer is computed once."""

    def __init__(self, task: Task, steps: int, device: torch.device | str = "cpu", loss_from: int = 0):
        self.task, self.steps, self.device, self.stages = task, steps, torch.device(device), {}
        self.loss_from = loss_from  # train.loss_positions: "scored" trains on positions >= score_from only

    def __call__(self, step: int) -> Stage:
        changes = self.task.curriculum(step, self.steps) or {}
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
    """The running loss and the first non-finite step, accumulated on the device without a sync; read
    (one sync) every ``log_every`` steps and before a checkpoint. The sum is float64 (float32 on MPS),
    which adds float32 losses exactly as the Python float it replaces did."""

    def __init__(self, device: torch.device, running: float = 0.0):
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.sum = torch.tensor(running, dtype=dtype, device=device)
        self.bad_step = torch.zeros((), dtype=torch.int64, device=device)  # 0: none yet
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.last = torch.full((), float("nan"), device=device)

    def add(self, loss: torch.Tensor, step_number: int):
        self.sum += loss
        first = ~torch.isfinite(loss) & (self.bad_step == 0)
        self.bad_step = torch.where(first, step_number, self.bad_step)
        self.bad_loss = torch.where(first, loss.float(), self.bad_loss)
        self.last = loss

    def read(self) -> tuple[float, int, float, float]:
        """``(sum, first non-finite step or 0, its loss, last loss)``: one transfer."""
        total, bad, bad_loss, last = torch.stack([self.sum.double(), self.bad_step.double(),
                                                  self.bad_loss.double(), self.last.double()]).tolist()
        return total, int(bad), bad_loss, last


def train(model: torch.nn.Module, task: Task, o: TrainOptions, seed: int, device: torch.device, *,
          log: Callable[[int, dict], None] = lambda step, m: None, progress: bool = False,
          resume: dict | None = None, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` in place; return timing figures. Raises :class:`TrainingDiverged` on NaN/inf.

    Every ``o.checkpoint_every`` steps ``checkpoint(state)`` receives the whole training state (model,
    optimizer, step, the data generator's RNG state, the unlogged part of the running loss); passing that
    dict back as ``resume`` continues exactly where it was taken, so an interrupted run ends with the same
    numbers as one that never stopped (same device).
    """
    from tqdm.auto import tqdm

    gen = torch.Generator(device=device).manual_seed(seed)
    opt = make_optimizer(model, o)
    first, running, window_tokens, tokens_done, elapsed = 0, 0.0, 0, 0, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        first, running, window_tokens = resume["step"], resume["running_loss"], resume["window_tokens"]
        tokens_done, elapsed = resume["tokens"], resume["elapsed_s"]
    step_model = compile_model(model, device) if o.compile else model
    stages = Curriculum(task, o.steps, device, task.score_from if o.loss_positions == "scored" else 0)
    model.train()
    bar = tqdm(total=o.steps, initial=first, disable=not progress, desc=f"train {task.name}", unit="step",
               leave=False, dynamic_ncols=True)
    start = window_start = time.perf_counter()
    acc = DeviceLoss(device, running)
    loss_value = float("nan")

    def check() -> tuple[float, float]:
        """Sync once: raise on a non-finite loss since the last check, else ``(running sum, last loss)``."""
        total, bad, bad_loss, last = acc.read()
        if bad:
            log(bad, {"loss": bad_loss, "lr": learning_rate(bad - 1, o)})
            raise TrainingDiverged(f"training diverged at step {bad}: loss is {bad_loss}; "
                                   "try a lower --set train.lr")
        return total, last

    try:
        for step in range(first, o.steps):
            stage = stages(step)
            batch = stage.task.sample(o.batch_size, gen, device)
            try:
                loss = train_step(step_model, opt, batch, stage.normalizer, learning_rate(step, o), o,
                                  stage.scored(batch))
            except Exception as exc:  # torch.compile fails lazily, on the first call
                if o.compile and step == first and not isinstance(exc, ICLBenchError):
                    raise compile_error(exc) from None
                raise
            acc.add(loss, step + 1)
            window_tokens += batch.inputs.shape[0] * batch.inputs.shape[1]
            bar.update(1)
            done = step + 1
            if done % o.log_every == 0 or done == o.steps:
                running, loss_value = check()
                now = time.perf_counter()
                metrics = {"loss": running / ((step % o.log_every) + 1), "lr": learning_rate(step, o),
                           "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                           "elapsed_s": elapsed + now - start}
                log(done, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}")
                tokens_done += window_tokens
                window_tokens, window_start = 0, now
                acc.sum.zero_()
            if checkpoint and o.checkpoint_every and done % o.checkpoint_every == 0 and done < o.steps:
                running, _ = check()  # never checkpoint a diverged state
                checkpoint({"step": done, "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "generator": gen.get_state(), "running_loss": running,
                            "window_tokens": window_tokens, "tokens": tokens_done,
                            "elapsed_s": elapsed + time.perf_counter() - start, "device": device.type})
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = elapsed + time.perf_counter() - start
    model.eval()
    return {"steps": o.steps, "final_loss": loss_value, "train_time_s": wall,
            "tokens_per_s": tokens_done / max(wall, 1e-9), "resumed_from_step": first}
