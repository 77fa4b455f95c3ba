"""``iclbench rescore RUN_DIR...``: score baselines installed after a run finished, without retraining.

A baseline sees only the evaluation batch, which depends on the task's options and ``eval.seed`` alone, so a
newly installed baseline is scored on exactly the sequences the run's model was scored on; its bootstrap
intervals use the same resampling (``eval.seed``), so they stay paired with the model's. The contract checks
of ``iclbench run`` apply (a baseline that peeks or reads latents unmarked is refused, not added).
"""

from __future__ import annotations

import time

from . import store
from .config import resolve
from .errors import ICLBenchError
from .evaluate import evaluation_batch, score
from .registry import Registry, get_registry
from .rundir import RunDir


def rescore(run_dir, registry: Registry | None = None, device: str = "cpu") -> dict:
    """Add every baseline registered now but absent from the run's record to its ``metrics.json``.
    Returns ``{"added": [names], "refused": {name: reason}}``; the main evaluation only (not OOD shifts)."""
    from .trainer import resolve_device

    dev = resolve_device(device)  # refused in one line even when nothing needs scoring
    registry = registry or get_registry()
    run = RunDir(run_dir)
    try:
        metrics = run.metrics()
    except store.DamagedRun as exc:
        raise ICLBenchError(f"{run.path} is not a complete run directory: {exc}") from None
    cfg = resolve(registry, config=metrics["config"])
    task = registry.task(cfg.task)(cfg.task_options)
    task.run_seed = cfg.seed  # a task trained on a pool of rules: dMMSE over the run's pool
    known = set(metrics["summary"]) | set(metrics.get("refused_baselines", {}))
    entries = {n: e for n, e in registry.task_baselines(task).items() if n not in known and n != "model"}
    if not entries:
        return {"added": [], "refused": {}}
    curves = metrics["curves"]
    scores = score(None, {n: e.obj for n, e in entries.items()}, task,
                   evaluation_batch(task, cfg.eval, dev), score_from=curves["score_from"],
                   replicates=curves.get("bootstrap", cfg.eval.bootstrap),
                   confidence=curves.get("confidence", cfg.eval.confidence), seed=cfg.eval.seed,
                   owners={n: f"baseline '{cfg.task}:{n}' (plugin '{e.plugin}')" for n, e in entries.items()},
                   strict=False)
    added = sorted(scores.baselines)
    if scores.curves is not None:
        scored = scores.curves["predictors"]
        curves["predictors"].update(scored)
        metrics["summary"].update({n: {"mean": p["mean"], "ci": p["ci"]} for n, p in scored.items()})
    metrics["baselines"] = sorted(set(metrics.get("baselines", [])) | set(added))
    metrics["refused_baselines"] = {**metrics.get("refused_baselines", {}), **scores.refused}
    metrics["oracles"] = sorted(set(metrics.get("oracles", [])) | set(scores.oracles))
    metrics.setdefault("rescored", []).append({"time": time.time(), "added": added,
                                               "refused": sorted(scores.refused), "plugins": registry.plugin_versions()})
    store.write_json(run.path / store.METRICS, metrics)
    return {"added": added, "refused": scores.refused}
