"""Reference models: a finished run's trained weights, its resolved config and a small manifest in a folder of
their own, which ``iclbench probe`` and :func:`iclbench.load` open without the run's other files (Garg et al.
released their trained models; ``results/reference/models/`` holds ours).

An exported model is a directory::

    <run name>/            affine-gpt3l-2e61ff81-s0
        model.safetensors  the weights, stored as float16 (see STORAGE_DTYPE) or float32
        config.yaml        the run's resolved configuration (``iclbench run --config`` retrains it, with --out)
        manifest.json      task, model, seed, config hash, steps, stop reason, the run's headline error and
                           learned label, that error re-evaluated on the stored weights, provenance

It is never written to after export: probing it prints, or writes under ``iclbench probe --out DIR``, and a run
refuses to train into it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import yaml

from . import store
from .errors import ICLBenchError, one_line
from .rundir import EXPORT_MANIFEST, RunDir, mark_not_runs

FORMAT = "iclbench-reference-model"
FORMAT_VERSION = 1
#: the dtype exported weights are stored in: float16 halves the size of float32 and moved the normalized error of
#: nine trained gpt3l runs by at most 6e-4 of itself (bfloat16: up to 2e-2); docs/usage.md has the numbers
STORAGE_DTYPE = "float16"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: how far the stored weights' error may lie from the float32 weights' (relative, absolute), both evaluated here
#: on the run's evaluation set; beyond it the model is stored in float32 instead
TOLERANCE = (1e-3, 1e-5)


def within_tolerance(stored: float, full: float) -> bool:
    rel, abs_ = TOLERANCE
    return abs(stored - full) <= rel * abs(full) + abs_


def is_export(path) -> bool:
    """Whether ``path`` is an exported reference model (it holds ``manifest.json``)."""
    return (Path(path) / EXPORT_MANIFEST).is_file()


def read_manifest(path) -> dict:
    """The manifest of the exported model at ``path``; one line saying what is wrong otherwise."""
    path = Path(path)
    try:
        manifest = store.read_json(path / EXPORT_MANIFEST)
    except store.DamagedRun as exc:
        raise ICLBenchError(f"{path} is not a readable exported model: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ICLBenchError(f"{path / EXPORT_MANIFEST} is not an iclbench reference-model manifest "
                            f"(format {manifest.get('format')!r}, expected {FORMAT!r})")
    for name in (store.CONFIG, store.CHECKPOINT):
        if not (path / name).is_file():
            raise ICLBenchError(f"exported model {path} lacks {name}; export the run again (iclbench export)")
    return manifest


def export_run(run_dir, out, *, dtype: str = STORAGE_DTYPE, registry=None) -> dict:
    """Export the finished run at ``run_dir`` to ``out/<run name>/`` (replacing an earlier export there) and
    mark ``out`` as holding no runs. The stored weights are re-evaluated on the run's evaluation set (on the
    CPU) beside the float32 weights; where rounding moves the error beyond :data:`TOLERANCE`, float32 is
    stored instead. Returns the manifest."""
    from .evaluate import error_curves, evaluation_batch, predict
    from .registry import get_registry

    if dtype not in DTYPES:
        raise ICLBenchError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    run = RunDir(run_dir)
    if is_export(run.path):
        raise ICLBenchError(f"{run.path} is already an exported model; export the run directory it came from")
    try:
        metrics = run.metrics()
    except store.DamagedRun as exc:
        raise ICLBenchError(f"{run.path} is not a complete run directory: {exc}") from None
    registry = registry or get_registry()
    cpu = torch.device("cpu")
    cfg, task, model = run.load(registry, cpu)
    dest = Path(out) / run.path.name
    if dest.resolve() == run.path.resolve() or (dest / store.METRICS).exists():
        raise ICLBenchError(f"cannot export to {dest}: a run directory is there; choose another --out")

    batch = evaluation_batch(task, cfg.eval, cpu)
    score_from = metrics["curves"]["score_from"]
    full = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def error(state) -> dict:
        model.load_state_dict(state)
        curve = error_curves({"model": predict(model, batch)}, batch, task.normalizer(cpu), score_from,
                             replicates=cfg.eval.bootstrap, confidence=cfg.eval.confidence,
                             seed=cfg.eval.seed)["predictors"]["model"]
        return {"mean": curve["mean"], "ci": curve["ci"]}

    error_fp32 = error(full)
    stored_dtype, stored = dtype, {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in full.items()}
    error_stored = error_fp32 if dtype == "float32" else error(stored)
    fallback = None
    if dtype != "float32" and not (all(bool(torch.isfinite(v).all()) for v in stored.values() if v.is_floating_point())
                                   and within_tolerance(error_stored["mean"], error_fp32["mean"])):
        fallback = (f"{dtype} moved the error from {error_fp32['mean']:.6g} to {error_stored['mean']:.6g}, beyond "
                    "the tolerance: stored as float32")
        stored_dtype, stored, error_stored = "float32", full, error_fp32

    train = metrics.get("train") or {}
    stop = train.get("stop") or {}
    excess = (metrics["curves"]["predictors"].get("model") or {}).get("excess_bayes") or {}
    from .labels import run_labels

    task_label, model_label = run_labels(metrics["config"], registry)
    provenance = metrics.get("provenance") or {}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": run.path.name,
        "task": metrics["task"],
        "model": metrics["model"],
        "seed": metrics["seed"],
        "config_hash": metrics.get("config_hash"),
        "label": {"task": task_label, "model": model_label},
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": stored_dtype,
        "steps": train.get("steps"),
        "stop": stop.get("reason") or "steps",  # flat, cap (train.until: flat) or steps (a fixed count)
        "flat_at_step": stop.get("decay_from"),
        "error": metrics["summary"]["model"],  # the run's headline, as it was recorded (its device)
        "learned": excess.get("learned"),
        "excess_bayes": {"relative": excess.get("relative"), "relative_ci": excess.get("relative_ci")} if excess
        else None,
        "score_from": score_from,
        "reevaluated": {"device": "cpu", "float32": error_fp32, "stored": error_stored,
                        "tolerance": {"relative": TOLERANCE[0], "absolute": TOLERANCE[1]}}
        | ({"fallback": fallback} if fallback else {}),
        "source": {"run": run.path.name, "git_commit": provenance.get("git_commit"),
                   "iclbench_version": provenance.get("iclbench_version"), "device": provenance.get("device"),
                   "torch_version": provenance.get("torch_version")},
        "exported": {"git_commit": store.git_commit(), "time": time.time()},
    }
    written = yaml.safe_load(store.read_regular(run.path / store.CONFIG))
    if isinstance(written, dict):
        written["out"] = "results"  # where a retraining goes, not the training machine's folder
    else:
        written = metrics["config"]
    mark_not_runs(Path(out))
    dest.mkdir(parents=True, exist_ok=True)
    store.save_state_dict(dest / store.CHECKPOINT, stored, {"format": FORMAT, "dtype": stored_dtype,
                                                            "config_hash": str(manifest["config_hash"])})
    store.write_yaml(dest / store.CONFIG, written)
    manifest["bytes"] = (dest / store.CHECKPOINT).stat().st_size
    store.write_json(dest / EXPORT_MANIFEST, _finite(manifest))
    return manifest


def _finite(obj):
    """``obj`` with non-finite floats as None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def load_export(path, registry=None, device: str = "cpu"):
    """``(manifest, config, task, model)`` of the exported model at ``path``: the weights in float32 (whatever
    their storage dtype), in eval mode, on ``device``."""
    from .registry import get_registry
    from .trainer import resolve_device

    manifest = read_manifest(path)
    cfg, task, model = RunDir(path).load(registry or get_registry(), resolve_device(device))
    return manifest, cfg, task, model


def describe_export(manifest: dict, path) -> str:
    """One line per exported model, as ``iclbench export`` prints it."""
    error, stored = manifest["error"]["mean"], manifest["reevaluated"]["stored"]["mean"]
    stop = {"flat": "stopped flat", "cap": "stopped at the cap", "steps": "a fixed count"}.get(manifest["stop"],
                                                                                               manifest["stop"])
    return (f"{path}: {manifest['task']} × {manifest['model']} seed {manifest['seed']}, {manifest['steps']} steps "
            f"({stop}), error {error:.4f} [{manifest['learned'] or 'no Bayes label'}], "
            f"{manifest['dtype']} {manifest['bytes'] / 1024:.0f} KB (error on the stored weights {stored:.4f})"
            + (f"; {manifest['reevaluated']['fallback']}" if "fallback" in manifest["reevaluated"] else ""))


def check_exportable(run_dirs) -> None:
    """Every one of ``run_dirs`` a complete run directory, or one line naming the first that is not (before
    anything is written)."""
    for run_dir in run_dirs:
        path = Path(run_dir)
        if not path.is_dir():
            raise ICLBenchError(f"{str(run_dir)!r} is not a directory (give run directories to export)")
        if is_export(path):
            raise ICLBenchError(f"{path} is already an exported model; export the run directory it came from")
        try:
            store.read_run(path)
        except store.DamagedRun as exc:
            raise ICLBenchError(f"{path} is not a complete run directory: {one_line(exc)}") from None
        if not (path / store.CHECKPOINT).is_file():
            raise ICLBenchError(f"{path} has no {store.CHECKPOINT} (a compact record without weights?); nothing "
                                "to export")
