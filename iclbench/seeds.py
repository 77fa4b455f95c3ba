"""``iclbench run --seeds 0-9``: N seeds of one configuration, N ordinary run directories.

On a CPU the seeds run as parallel single-thread processes (``--jobs``, default: one per core, at most one per
seed): a small model's step is GEMM-bound on one core, and two 1-thread processes on two cores do as well as
stacking the seeds into one model (measured, BENCHMARKS.md), without OpenMP threads spin-waiting on each other.
On a GPU (or with ``stack=True``) the seeds that have no earlier attempt are trained together as one stacked
model (:func:`iclbench.stacked.train_stacked`), which leaves each run directory as a run killed right after
training leaves it; each seed is then an ordinary :func:`~iclbench.runner.run` that evaluates and writes its
own directory. Every seed keeps its own lock, its own checkpoints and its own resume: a stacked job killed
mid-training continues seed by seed from the last checkpoint, and a seed that was already complete or
interrupted is not stacked. A divergence in any stacked seed falls back to training every seed separately.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class Plan:
    """One seed about to be trained in a stack: its run directory (locked), config, task, model, open log."""
    run_dir: Path
    cfg: object
    task: object
    model: object
    log: object = None
    segments: list = field(default_factory=list)


def run_seeds(seeds: list[int], *, jobs: int | None = None, stack: bool | None = None, **kwargs) -> list[tuple]:
    """Run each seed of one configuration (``kwargs`` as :func:`~iclbench.runner.run`, without ``seed``);
    return ``[(run_dir, outcome, metrics)]`` in seed order. ``jobs``: processes on a CPU (1: in this
    process, one after another). ``stack``: train the seeds as one stacked model (default: on a GPU or MPS,
    where one small model leaves the device idle; on a CPU separate 1-thread processes are as fast)."""
    from .config import resolve
    from .registry import get_registry
    from .trainer import resolve_device

    cfg = resolve(get_registry(), config=kwargs.get("config"), task=kwargs.get("task"),
                  model=kwargs.get("model"), device=kwargs.get("device"), overrides=kwargs.get("overrides", ()))
    dev = resolve_device(cfg.device)
    cpu = dev.type == "cpu"
    if stack is None:  # torch.compile does not see through the stacked (vmapped) step: compiled runs go alone
        stack = not cpu and not cfg.train.compile
    if stack and len(seeds) > 1 and not kwargs.get("resume"):
        stacked = _train_together(seeds, dev, kwargs)
        after = {**kwargs, "force": False}  # the stacked seeds are trained; run() evaluates them
        results = []
        for s in seeds:
            run_dir, outcome, metrics = _run_one({**(after if s in stacked else kwargs), "seed": s})
            results.append((run_dir, f"trained (stacked with {len(stacked)})" if s in stacked else outcome,
                            metrics))
        return results
    jobs = min(len(seeds), jobs or (os.cpu_count() or 1)) if cpu else 1
    calls = [{**kwargs, "seed": s} for s in seeds]
    if jobs <= 1:
        return [_run_one(c) for c in calls]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        return list(pool.map(_run_one, calls))


def _train_together(seeds: list[int], dev, kwargs: dict) -> set[int]:
    """Train, as one stacked model, the seeds whose run directories have no earlier attempt (all of them with
    ``force``) and that no other process holds; return those seeds. The others are left to
    :func:`~iclbench.runner.run` (complete: returned as recorded; interrupted: resumed; busy: named)."""
    import time

    import torch

    from . import store
    from .config import resolve
    from .errors import TrainingDiverged
    from .registry import get_registry
    from .runner import build, check_plugins, warn
    from .stacked import train_stacked

    registry = get_registry()
    with contextlib.ExitStack() as held:
        plans = []
        for s in seeds:
            cfg = resolve(registry, config=kwargs.get("config"), task=kwargs.get("task"), model=kwargs.get("model"),
                          steps=kwargs.get("steps"), seed=s, device=kwargs.get("device"), out=kwargs.get("out"),
                          overrides=kwargs.get("overrides", ()))
            run_dir = Path(cfg.out) / cfg.run_name
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                held.enter_context(store.run_lock(run_dir))
            except (OSError, store.RunBusy, ICLBenchError):
                continue  # run() reports it, naming the holder or the error
            earlier = (run_dir / store.METRICS).exists() or (run_dir / store.TRAIN_STATE).exists()
            if earlier and not kwargs.get("force"):
                continue
            task_obj, model_obj = build(registry, cfg, dev)
            check_plugins(registry, cfg, task_obj, model_obj, dev)
            plans.append(Plan(run_dir, cfg, task_obj, model_obj))
        if len(plans) < 2:
            return set()
        threads = torch.get_num_threads()
        for p in plans:
            store.remove_stale_temporaries(p.run_dir)
            for name in (store.METRICS, store.TRAIN_STATE):
                (p.run_dir / name).unlink(missing_ok=True)
            store.write_yaml(p.run_dir / store.CONFIG, p.cfg.to_dict())
            store.write_json(p.run_dir / store.STATUS, {"status": "running", "started": time.time(),
                                                        "pid": os.getpid(), "stacked_with": len(plans)})
            p.segments = [{"from_step": 0, "threads": threads, "device": dev.type, "stacked_with": len(plans)}]
            p.log = held.enter_context(store.open_log(p.run_dir / store.LOG))
        try:
            train_stacked(plans, dev, plans[0].cfg.train, progress=not kwargs.get("quiet", True))
        except TrainingDiverged as exc:
            warn(f"{exc}; training the seeds {[p.cfg.seed for p in plans]} one by one instead")
            for p in plans:
                (p.run_dir / store.TRAIN_STATE).unlink(missing_ok=True)
            return set()
        except BaseException as exc:
            status = ({"status": "interrupted", "message": "Ctrl-C"} if isinstance(exc, KeyboardInterrupt) else
                      {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "time": time.time()})
            for p in plans:
                store.write_json(p.run_dir / store.STATUS, status)
            raise
        return {p.cfg.seed for p in plans}
