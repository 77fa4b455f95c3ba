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
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def normalized_error(pred: torch.Tensor, batch: Batch, normalizer: torch.Tensor) -> torch.Tensor:
    """Per-sequence, per-position squared error over the prior-mean error: ``[B, T]``."""
    return (pred.float() - batch.targets.float()).pow(2).mean(-1) / normalizer


def make_optimizer(model: torch.nn.Module, o: TrainOptions) -> torch.optim.Optimizer:
    """AdamW; its fused kernel (one pass over all weights) on devices that have one."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(0.9, 0.99),
                             fused=fused)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Batch, normalizer: torch.Tensor,
               lr: float, o: TrainOptions) -> torch.Tensor:
    """One optimisation step on ``batch``; returns the loss as a tensor (the caller decides when to sync).
    ``iclbench bench`` times exactly this function for every model it compares."""
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast(batch.inputs.device, o.precision):
        pred = model(batch.inputs)
    loss = normalized_error(pred, batch, normalizer)[:, batch.mask].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip, foreach=True)
    opt.step()
    return loss.detach()


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)``, sharing its parameters; a failure is one line, not a compiler traceback."""
    try:
        return torch.compile(model)
    except Exception as exc:
        raise compile_error(exc) from None


def compile_error(exc: Exception) -> ICLBenchError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ICLBenchError(f"--compile is not supported here ({type(exc).__name__}: {first[:200]}); "
                         "run without --compile")


class Curriculum:
    """The task to sample from at each step: the task with ``task.curriculum(step, steps)`` applied. One
    Task object per stage, so a stage's normalizer is computed once."""

    def __init__(self, task: Task, steps: int):
        self.task, self.steps, self.stages = task, steps, {}

    def __call__(self, step: int) -> Task:
        changes = self.task.curriculum(step, self.steps) or {}
        key = repr(sorted(changes.items()))
        if key not in self.stages:
            try:
                self.stages[key] = self.task.with_options(**changes) if changes else self.task
            except TypeError as exc:
                raise ICLBenchError(f"task '{self.task.name}' curriculum at step {step} sets {changes}: "
                                    f"{exc}") from None
        return self.stages[key]


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
    step_model = compile_model(model) if o.compile else model
    stages = Curriculum(task, o.steps)
    model.train()
    bar = tqdm(total=o.steps, initial=first, disable=not progress, desc=f"train {task.name}", unit="step",
               leave=False, dynamic_ncols=True)
    start = window_start = time.perf_counter()
    loss_value = float("nan")
    try:
        for step in range(first, o.steps):
            stage = stages(step)
            batch = stage.sample(o.batch_size, gen, device)
            try:
                loss = train_step(step_model, opt, batch, stage.normalizer(device), learning_rate(step, o), o)
            except Exception as exc:  # torch.compile fails lazily, on the first call
                if o.compile and step == first and not isinstance(exc, ICLBenchError):
                    raise compile_error(exc) from None
                raise
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                log(step + 1, {"loss": loss_value, "lr": learning_rate(step, o)})
                raise TrainingDiverged(f"training diverged at step {step + 1}: loss is {loss_value}; "
                                       "try a lower --set train.lr")
            running += loss_value
            window_tokens += batch.inputs.shape[0] * batch.inputs.shape[1]
            bar.update(1)
            if (step + 1) % o.log_every == 0 or step + 1 == o.steps:
                now = time.perf_counter()
                metrics = {"loss": running / ((step % o.log_every) + 1), "lr": learning_rate(step, o),
                           "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                           "elapsed_s": elapsed + now - start}
                log(step + 1, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}")
                tokens_done += window_tokens
                running, window_tokens, window_start = 0.0, 0, now
            done = step + 1
            if checkpoint and o.checkpoint_every and done % o.checkpoint_every == 0 and done < o.steps:
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
