"""``iclbench run --seeds 0-9``: N seeds of one configuration, N ordinary run directories.

On a CPU the seeds run as parallel single-thread processes (``--jobs``, default: one per core, at most one per
seed): a small model's step is GEMM-bound on one core, and two 1-thread processes on two cores do as well as
stacking the seeds into one model (measured, BENCHMARKS.md), without OpenMP threads spin-waiting on each other.
Elsewhere they run one after another in this process. Each seed is an ordinary :func:`~iclbench.runner.run`:
its own directory, its own resume and its own writer. Seeds stacked into one model on a GPU
(:mod:`iclbench.stacked`) are tested equal to separate runs and measured by ``iclbench bench --seeds``; the
runner does not yet train through them (each run evaluates and writes itself).
"""

from __future__ import annotations

import os

from .errors import ICLBenchError


def parse_seeds(text: str) -> list[int]:
    """``"0-9"``, ``"0,3,7"`` or a mix (``"0-2,10"``) → the seeds, in order, without repeats."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in str(text).split(",")):
            if not part:
                continue
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(lo), int(hi)
                if hi < lo:
                    raise ValueError
                seeds += range(lo, hi + 1)
            else:
                seeds.append(int(part))
    except ValueError:
        raise ICLBenchError(f"--seeds expects seeds like 0-9 or 0,3,7, got {text!r}") from None
    if not seeds:
        raise ICLBenchError(f"--seeds expects at least one seed, got {text!r}")
    return list(dict.fromkeys(seeds))


def _one_thread():
    import torch

    torch.set_num_threads(1)


def _run_one(kwargs: dict):
    from .runner import run

    r = run(**kwargs)
    return r.run_dir, r.outcome, r.metrics


def run_seeds(seeds: list[int], *, jobs: int | None = None, **kwargs) -> list[tuple]:
    """Run each seed of one configuration (``kwargs`` as :func:`~iclbench.runner.run`, without ``seed``);
    return ``[(run_dir, outcome, metrics)]`` in seed order. ``jobs``: processes on a CPU (1: in this
    process, one after another)."""
    from .config import resolve
    from .registry import get_registry
    from .trainer import resolve_device

    cfg = resolve(get_registry(), config=kwargs.get("config"), task=kwargs.get("task"),
                  model=kwargs.get("model"), device=kwargs.get("device"), overrides=kwargs.get("overrides", ()))
    cpu = resolve_device(cfg.device).type == "cpu"
    jobs = min(len(seeds), jobs or (os.cpu_count() or 1)) if cpu else 1
    calls = [{**kwargs, "seed": s} for s in seeds]
    if jobs <= 1:
        return [_run_one(c) for c in calls]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        return list(pool.map(_run_one, calls))
