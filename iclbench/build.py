"""From a resolved configuration to the objects a run computes with: the task and a freshly initialised model,
refused up front when they cannot fit in memory or break their plugin contracts."""

from __future__ import annotations

import os

import torch

from . import contracts
from .config import RunConfig
from .errors import ICLBenchError
from .registry import Registry


def memory_bytes(device: torch.device) -> int | None:
    """The memory a run on ``device`` can use at most (the GPU's, or this machine's RAM); None if unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None


def check_sizes(cfg: RunConfig, task, model_cls, device: torch.device) -> None:
    """Refuse, before allocating anything, a configuration whose weights (+ gradients and AdamW moments),
    training batch or evaluation set cannot fit in memory: one line, not an allocator traceback. The
    weights are counted on PyTorch's meta device (no memory); a model that cannot be built there is not
    checked."""
    limit = memory_bytes(device)
    if not limit:
        return
    sizes = {}
    try:
        with torch.device("meta"):
            meta = model_cls(cfg.model_options, task.d_in, task.d_out, task.context_len)
        sizes["the model's weights, gradients and optimizer state"] = 16 * sum(
            p.numel() for p in meta.parameters())
    except Exception:
        pass
    width = 4 * task.context_len * (task.d_in + task.d_out)
    sizes["a training batch (train.batch_size)"] = cfg.train.batch_size * width
    sizes["the evaluation set (eval.n_sequences)"] = cfg.eval.n_sequences * width
    checks = [(what, size, limit, device) for what, size in sizes.items()]
    # the bootstrap's resampling counts ([bootstrap, n_sequences]: int64 indices, float32 counts and ones, a
    # float64 copy) are drawn on the CPU, whatever the run's device
    checks.append(("the bootstrap resamples (eval.bootstrap × eval.n_sequences)",
                   24 * cfg.eval.bootstrap * cfg.eval.n_sequences, memory_bytes(torch.device("cpu")), "cpu"))
    for what, size, room, where in checks:
        if room and size > room:
            raise ICLBenchError(f"{what} would take {size / 2 ** 30:,.1f} GiB, more than the "
                                f"{room / 2 ** 30:,.1f} GiB of {where}; choose smaller sizes")


def build(registry: Registry, cfg: RunConfig, device: torch.device):
    """Instantiate the task and a freshly initialised model (initialisation seeded by ``cfg.seed``). The task
    keeps the registry it came from, so that its baselines (the probes' too) are the run's, and the run's seed
    (``task.run_seed``)."""
    task = registry.task(cfg.task)(cfg.task_options)
    task.registry = registry
    task.run_seed = cfg.seed  # a task trained on a pool of rules draws the seed's pool (iclbench.pool)
    model_cls = registry.model(cfg.model)
    check_sizes(cfg, task, model_cls, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = model_cls(cfg.model_options, task.d_in, task.d_out, task.context_len)
    return task, model.to(device)


def check_plugins(registry: Registry, cfg: RunConfig, task, model, device) -> None:
    """The task's and the model's contracts (:mod:`iclbench.contracts`), before any training."""
    contracts.check_task(task, registry.owner("task", cfg.task), device)
    contracts.check_model(model, task, registry.owner("model", cfg.model), device)
