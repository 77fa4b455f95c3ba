"""``iclbench rescore RUN_DIR...``: score baselines installed after a run finished, without retraining.

A baseline sees only the evaluation batch, which depends on the task's options and ``eval.seed`` alone, so a
newly installed baseline is scored on exactly the sequences the run's model was scored on; its bootstrap
intervals use the same resampling (``eval.seed``), so they stay paired with the model's. The contract checks
of ``iclbench run`` apply (a baseline that peeks or reads latents unmarked is refused, not added).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import contracts, store
from .config import resolve
from .errors import ICLBenchError
from .evaluate import error_curves
from .registry import Registry, get_registry


def rescore(run_dir, registry: Registry | None = None, device: str = "cpu") -> dict:
    """Add every baseline registered now but absent from the run's record to its ``metrics.json``.
    Returns ``{"added": [names], "refused": {name: reason}}``; the main evaluation only (not OOD shifts)."""
    registry = registry or get_registry()
    run_dir = Path(run_dir)
    try:
        metrics = store.read_run(run_dir)
    except store.DamagedRun as exc:
        raise ICLBenchError(f"{run_dir} is not a complete run directory: {exc}") from None
    cfg = resolve(registry, config=metrics["config"])
    task = registry.task(cfg.task)(cfg.task_options)
    known = set(metrics["summary"]) | set(metrics.get("refused_baselines", {}))
    entries = {n: e for n, e in registry.task_baselines(task).items() if n not in known and n != "model"}
    if not entries:
        return {"added": [], "refused": {}}
    from .runner import evaluation_batch

    dev = torch.device(device)
    batch = evaluation_batch(task, cfg, dev)
    owners = {n: f"baseline '{cfg.task}:{n}' (plugin '{e.plugin}')" for n, e in entries.items()}
    accepted, refused = contracts.screen_baselines({n: e.obj for n, e in entries.items()}, batch, owners)
    predictions = {n: fn(batch).float() for n, fn in accepted.items()}
    for name, pred in predictions.items():
        problem = contracts.predictions_problem(pred, batch, "gave predictions")
        if problem:
            refused[name] = f"{owners[name]}: {problem}"
    predictions = {n: p for n, p in predictions.items() if n not in refused}
    curves = metrics["curves"]
    if predictions:
        scored = error_curves(predictions, batch, task.normalizer(dev), curves["score_from"],
                              curves.get("bootstrap", cfg.eval.bootstrap), curves.get("confidence",
                                                                                      cfg.eval.confidence),
                              cfg.eval.seed)["predictors"]
        curves["predictors"].update(scored)
        metrics["summary"].update({n: {"mean": p["mean"], "ci": p["ci"]} for n, p in scored.items()})
    metrics["baselines"] = sorted(set(metrics.get("baselines", [])) | set(predictions))
    metrics["refused_baselines"] = {**metrics.get("refused_baselines", {}), **refused}
    metrics["oracles"] = sorted(set(metrics.get("oracles", []))
                                | {n for n in predictions if contracts.is_oracle(n, accepted[n])})
    metrics.setdefault("rescored", []).append({"time": time.time(), "added": sorted(predictions),
                                               "refused": sorted(refused), "plugins": registry.plugin_versions()})
    store.write_json(run_dir / store.METRICS, metrics)
    return {"added": sorted(predictions), "refused": refused}
