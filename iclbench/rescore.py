"""``iclbench rescore RUN_DIR...``: score baselines installed after a run finished, without retraining.

A baseline sees only the evaluation batch, which depends on the task's options and ``eval.seed`` alone, so a
newly installed baseline is scored on exactly the sequences the run's model was scored on; its bootstrap
intervals use the same resampling (``eval.seed``), so they stay paired with the model's. The contract checks
of ``iclbench run`` apply (a baseline that peeks or reads latents unmarked is refused, not added).

``--set task.KEY=VALUE`` turns on a baseline that a task option registers (decision-tree's ``sklearn``), for
the options a task declares ``scoring_only`` (they add baselines and never change the data); any other option
would change the sequences, so it is refused. The run's ``config.yaml`` is left as trained; the ``rescored``
entry records what was set.
"""

from __future__ import annotations

import time

from . import store
from .config import resolve
from .errors import ICLBenchError
from .evaluate import evaluation_batch, score
from .registry import Registry, get_registry
from .rundir import RunDir


def check_scoring_only(registry: Registry, task_name: str, overrides) -> None:
    """Refuse an override (``KEY=VALUE``) that is not an option of the run's task that only adds baselines."""
    allowed = sorted(getattr(registry.task(task_name).Options, "scoring_only", ()))
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not (key.startswith("task.") and key[5:] in allowed):
            might = ", ".join(f"task.{k}" for k in allowed) or "none for this task"
            raise ICLBenchError(f"rescore --set {item}: only options that add baselines without changing the "
                                f"evaluation data may be set after a run ({task_name}: {might})")


def rescore(run_dir, registry: Registry | None = None, device: str = "cpu", overrides=()) -> dict:
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
    if overrides:
        check_scoring_only(registry, cfg.task, overrides)
        cfg = resolve(registry, config=metrics["config"], overrides=overrides)
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
    metrics.setdefault("rescored", []).append({"time": time.time(), "added": added, "refused": sorted(scores.refused),
                                               "plugins": registry.plugin_versions(),
                                               **({"set": list(overrides)} if overrides else {})})
    store.write_json(run.path / store.METRICS, metrics)
    return {"added": added, "refused": scores.refused}
