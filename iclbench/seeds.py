"""``iclbench run --seeds 0-9``: N seeds of one configuration, N ordinary run directories.

On a CPU the seeds run as parallel single-thread processes (``--jobs``, default: one per core, at most one per
seed): a small model's step is GEMM-bound on one core, and two 1-thread processes on two cores do as well as
stacking the seeds into one model (measured, BENCHMARKS.md), without OpenMP threads spin-waiting on each other.
On a GPU (or with ``stack=True``) the seeds that have no earlier attempt are trained together as one stacked
model (:func:`iclbench.runner.run_configs`); each is still a run of its own, with its own directory, lock,
lifecycle hooks, log, checkpoints and resume: a stacked job killed mid-training continues seed by seed from
the last checkpoint, a seed that was already complete or interrupted is not stacked, and a seed that
diverges is recorded so while the others train on.
"""

from __future__ import annotations

import os

from .errors import ICLBenchError


def available_cores() -> int:
    """The cores this process may use (its affinity, as ``taskset`` sets it), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: the most seeds one ``--seeds`` may name (each is a run of its own); counted before the range is expanded
MAX_SEEDS = 10000


def parse_seeds(text: str) -> list[int]:
    """``"0-9"``, ``"0,3,7"`` or a mix (``"0-2,10"``) → the seeds, in order, without repeats; at most
    :data:`MAX_SEEDS`, counted before any range is expanded."""
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
                if len(seeds) + hi - lo + 1 > MAX_SEEDS:
                    raise ICLBenchError(f"--seeds {text!r} names {len(seeds) + hi - lo + 1:,} seeds or more: at "
                                        f"most {MAX_SEEDS:,} (one run each)")
                seeds += range(lo, hi + 1)
            else:
                seeds.append(int(part))
    except ValueError:
        raise ICLBenchError(f"--seeds expects seeds like 0-9 or 0,3,7, got {text!r}") from None
    if not seeds:
        raise ICLBenchError(f"--seeds expects at least one seed, got {text!r}")
    if len(seeds) > MAX_SEEDS:
        raise ICLBenchError(f"--seeds {text!r} names {len(seeds):,} seeds: at most {MAX_SEEDS:,} (one run each)")
    return list(dict.fromkeys(seeds))


def _one_thread():
    import torch

    from .sweep import worker_signals

    torch.set_num_threads(1)
    worker_signals()  # a closed terminal (SIGHUP) marks the seed's run interrupted, as Ctrl-C does


def _run_one(kwargs: dict):
    from .runner import run
    from .sweep import _computing

    with _computing():
        r = run(**kwargs)
    return r.run_dir, r.outcome, r.metrics


def stacks_by_default(cfg, device_type: str) -> bool:
    """``--stack auto`` (of ``run --seeds`` and of ``sweep``): seeds of ``cfg`` training on a device of
    ``device_type`` are stacked on a GPU or MPS, where one small model leaves the device idle, not on a CPU,
    where separate 1-thread processes are as fast (BENCHMARKS.md); nor when compiled, as torch.compile does
    not see through the stacked (vmapped) step."""
    return device_type != "cpu" and not cfg.train.compile


def run_seeds(seeds: list[int], *, jobs: int | None = None, stack: bool | None = None, registry=None,
              **kwargs) -> list[tuple]:
    """Run each seed of one configuration (``kwargs`` as :func:`~iclbench.runner.run`, without ``seed``);
    return ``[(run_dir, outcome, metrics)]`` in seed order. ``jobs``: processes on a CPU (1: in this
    process, one after another). ``stack``: train the seeds as one stacked model (default: on a GPU or MPS,
    where one small model leaves the device idle; on a CPU separate 1-thread processes are as fast).
    ``registry``: the plugins to use (default: those installed; processes always use those)."""
    from .config import resolve
    from .registry import get_registry
    from .runner import run, run_configs
    from .trainer import resolve_device

    if jobs is not None and jobs < 1:
        raise ICLBenchError(f"--jobs must be >= 1, got {jobs}")
    registry = registry or get_registry()
    cfgs = [resolve(registry, config=kwargs.get("config"), task=kwargs.get("task"), model=kwargs.get("model"),
                    steps=kwargs.get("steps"), seed=s, device=kwargs.get("device"), out=kwargs.get("out"),
                    overrides=kwargs.get("overrides", ())) for s in seeds]
    device_type = resolve_device(cfgs[0].device).type
    cpu = device_type == "cpu"
    if stack is None:
        stack = stacks_by_default(cfgs[0], device_type)
    jobs = min(len(seeds), jobs or available_cores()) if cpu and not stack else 1
    if jobs <= 1:
        results = run_configs(cfgs, registry, quiet=kwargs.get("quiet", True), resume=kwargs.get("resume", False),
                              force=kwargs.get("force", False), stack=stack) if stack else \
            [run(registry=registry, **{**kwargs, "seed": s}) for s in seeds]
        return [(r.run_dir, _outcome(r), r.metrics) for r in results]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        return list(pool.map(_run_one, [{**kwargs, "seed": s} for s in seeds]))


def _outcome(r) -> str:
    stacked = r.metrics.get("train", {}).get("stacked_with")
    if r.outcome == "resumed" and getattr(r, "resumed_after_training", False):
        return "resumed after training"
    return f"trained (stacked with {stacked})" if r.outcome == "trained" and stacked else r.outcome
