"""Training loop: data drawn on the device from a seeded generator, AdamW, warmup + cosine, clipping."""

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


def train(model: torch.nn.Module, task: Task, o: TrainOptions, seed: int, device: torch.device, *,
          log: Callable[[int, dict], None] = lambda step, m: None, progress: bool = False) -> dict:
    """Train ``model`` in place; return timing figures. Raises :class:`TrainingDiverged` on NaN/inf."""
    from tqdm.auto import tqdm

    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=(0.9, 0.99))
    norm = task.normalizer(device)
    model.train()
    tokens = o.batch_size * task.context_len
    bar = tqdm(total=o.steps, disable=not progress, desc=f"train {task.name}", unit="step", leave=False,
               dynamic_ncols=True)
    start = window_start = time.perf_counter()
    running = 0.0
    loss_value = float("nan")
    try:
        for step in range(o.steps):
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, o)
            batch = task.sample(o.batch_size, gen, device)
            with autocast(device, o.precision):
                pred = model(batch.inputs)
            loss = normalized_error(pred, batch, norm)[:, batch.mask].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                log(step + 1, {"loss": loss_value, "lr": learning_rate(step, o)})
                raise TrainingDiverged(f"training diverged at step {step + 1}: loss is {loss_value}; "
                                       "try a lower --set train.lr")
            running += loss_value
            bar.update(1)
            if (step + 1) % o.log_every == 0 or step + 1 == o.steps:
                n = (step % o.log_every) + 1
                now = time.perf_counter()
                metrics = {"loss": running / n, "lr": learning_rate(step, o),
                           "tokens_per_s": n * tokens / max(now - window_start, 1e-9),
                           "elapsed_s": now - start}
                log(step + 1, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}")
                running, window_start = 0.0, now
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    model.eval()
    return {"steps": o.steps, "final_loss": loss_value, "train_time_s": wall,
            "tokens_per_s": o.steps * tokens / max(wall, 1e-9)}
