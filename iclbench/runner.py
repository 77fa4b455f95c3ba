"""One run: resolve config → build task and model → train → evaluate against baselines → write the record."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import store
from .config import RunConfig, resolve
from .errors import ICLBenchError, TrainingDiverged
from .evaluate import error_curves, score
from .registry import Registry, get_registry
from .trainer import resolve_device, train


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    config: RunConfig
    task: object
    model: torch.nn.Module
    outcome: str = "trained"  # "trained", "resumed" (from a checkpoint) or "complete" (found done, not rerun)


def build(registry: Registry, cfg: RunConfig, device: torch.device):
    """Instantiate the task and a freshly initialised model (initialisation seeded by ``cfg.seed``)."""
    task = registry.task(cfg.task)(cfg.task_options)
    model_cls = registry.model(cfg.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = model_cls(cfg.model_options, task.d_in, task.d_out, task.context_len)
    return task, model.to(device)


def load_run(run_dir: str | Path, registry: Registry | None = None, device: str = "cpu"):
    """Rebuild ``(config, task, model)`` of a finished run from its directory (weights via safetensors)."""
    registry = registry or get_registry()
    run_dir = Path(run_dir)
    cfg = resolve(registry, config=run_dir / store.CONFIG)
    dev = resolve_device(device)
    task, model = build(registry, cfg, dev)
    model.load_state_dict(store.load_state_dict(run_dir / store.CHECKPOINT))
    model.eval()
    return cfg, task, model


def evaluation_batch(task, cfg: RunConfig, device: torch.device):
    """The fixed evaluation set: drawn on the CPU from ``eval.seed`` so it is the same on every device and
    for every training seed, then moved to ``device``."""
    gen = torch.Generator("cpu").manual_seed(cfg.eval.seed)
    return task.sample(cfg.eval.n_sequences, gen, "cpu").to(device)


#: bootstrap replicates for each OOD variant: its intervals need less precision than the headline's
OOD_BOOTSTRAP = 200


def evaluate_ood(model, task, registry: Registry, cfg: RunConfig, device: torch.device, score_from: int) -> dict:
    """The trained model and the baselines on each of ``task.ood_variants()``.

    Each variant gets a fixed evaluation set drawn like the main one (same ``eval.seed``, on the CPU) and is
    normalized by its own prior-mean error, so 1.0 still means "no better than the shifted distribution's
    prior mean"; ``mse`` keeps the raw squared error. A variant the model cannot take (a context longer
    than its positions reach, other input widths) is recorded as ``{"skipped": reason}``, never a crash.
    """
    out = {}
    for name, shifted in task.ood_variants().items():
        base, new = dataclasses.asdict(task.options), dataclasses.asdict(shifted.options)
        entry = {"options": {k: v for k, v in new.items() if base.get(k) != v}}
        if (shifted.d_in, shifted.d_out) != (task.d_in, task.d_out):
            out[name] = {**entry, "skipped": f"input/output widths {shifted.d_in}/{shifted.d_out} differ from "
                                             f"the trained {task.d_in}/{task.d_out}"}
            continue
        baselines = {n: e.obj for n, e in registry.task_baselines(shifted).items()}
        try:
            curves = score(model, baselines, shifted, evaluation_batch(shifted, cfg, device), score_from,
                           min(cfg.eval.bootstrap, OOD_BOOTSTRAP), cfg.eval.confidence, cfg.eval.seed)
        except ICLBenchError as exc:
            out[name] = {**entry, "skipped": str(exc)}
            continue
        out[name] = {**entry, "summary": {n: {"mean": p["mean"], "ci": p["ci"], "mse": p["mse"]}
                                          for n, p in curves["predictors"].items()}, "curves": curves}
    return out


def earlier_attempt(run_dir: Path, device: torch.device, *, resume: bool, force: bool):
    """What an earlier attempt at this run left in ``run_dir``: ``"complete"``, a training state to
    continue from (its latest checkpoint), or ``None`` (start afresh). ``force`` always starts afresh;
    ``resume`` insists that there is an earlier attempt."""
    try:
        status = json.loads((run_dir / store.STATUS).read_text())
    except (OSError, ValueError):
        status = {}
    if resume and not status:
        raise ICLBenchError(f"nothing to resume in {run_dir}: this config was never run there")
    if force:
        return None
    if (run_dir / store.METRICS).exists():
        return "complete"
    pid = status.get("pid")
    if status.get("status") == "running" and status.get("host") == socket.gethostname() and pid != os.getpid() \
            and process_alive(pid):
        raise ICLBenchError(f"run {run_dir} is being computed by process {pid} on this machine; wait for it, "
                            "or stop it and rerun to continue from its last checkpoint")
    if not (run_dir / store.TRAIN_STATE).exists():
        return None
    try:
        state = store.load_training_state(run_dir / store.TRAIN_STATE)
    except Exception as exc:
        raise ICLBenchError(f"unreadable checkpoint {run_dir / store.TRAIN_STATE} ({exc}); rerun with --force "
                            "to start afresh") from None
    if state["device"] != device.type:
        raise ICLBenchError(f"the checkpoint in {run_dir} was written on {state['device']}, this run is on "
                            f"{device.type}; pass --device {state['device']} to continue it, or --force to "
                            "start afresh")
    return state


def process_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except PermissionError:
        return True
    except (OSError, TypeError, ValueError):  # gone (kill -9, a crash), or no pid recorded
        return False
    return True


def completed_run(run_dir: Path, cfg: RunConfig, task_obj, model_obj) -> RunResult:
    """The record of a run found complete: its metrics and its trained weights, without training again."""
    try:
        metrics = store.read_run(run_dir)
        model_obj.load_state_dict(store.load_state_dict(run_dir / store.CHECKPOINT))
    except (store.DamagedRun, OSError, RuntimeError) as exc:
        raise ICLBenchError(f"run {run_dir} looks complete but cannot be read ({exc}); rerun with --force") \
            from None
    return RunResult(run_dir, metrics, cfg, task_obj, model_obj.eval(), outcome="complete")


def run(task: str | None = None, model: str | None = None, *, config=None, steps: int | None = None,
        seed: int | None = None, device: str | None = None, out: str | None = None, overrides=(),
        quiet: bool = True, registry: Registry | None = None, run_dir: str | Path | None = None,
        resume: bool = False, force: bool = False) -> RunResult:
    """Train ``model`` on ``task``, evaluate it beside the task's baselines, write the run directory.

    ``config``: a YAML path or a dict in the resolved layout; ``overrides``: ``["task.noise=0.1", ...]`` or
    ``{"task.noise": 0.1}``. Returns the run directory, the metrics dict, and the trained model.
    ``run_dir``: write the record there instead of ``out/<run name>`` (a sweep worker without the driver's
    disk computes into a temporary directory and ships the files back).

    Rerunning a config continues it: a complete run is returned as recorded (``force=True`` retrains it),
    an interrupted one (Ctrl-C, kill -9) continues from its latest checkpoint (``train.checkpoint_every``)
    and ends with the same metrics as a run that never stopped. ``resume=True`` additionally insists that
    there is an earlier attempt to continue.
    """
    registry = registry or get_registry()
    cfg = resolve(registry, config=config, task=task, model=model, steps=steps, seed=seed, device=device,
                  out=out, overrides=overrides)
    dev = resolve_device(cfg.device)
    task_obj, model_obj = build(registry, cfg, dev)
    baselines = {n: e.obj for n, e in registry.task_baselines(task_obj).items()}
    if "model" in baselines:
        raise ICLBenchError(f"task '{cfg.task}' declares a baseline named 'model', which is reserved")

    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.out) / cfg.run_name
    state = earlier_attempt(run_dir, dev, resume=resume, force=force)
    if state == "complete":
        return completed_run(run_dir, cfg, task_obj, model_obj)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ICLBenchError(f"cannot create run directory {str(run_dir)!r}: {exc.strerror}") from None
    (run_dir / store.METRICS).unlink(missing_ok=True)  # the directory now describes this run
    if state is None:
        (run_dir / store.TRAIN_STATE).unlink(missing_ok=True)
    store.write_yaml(run_dir / store.CONFIG, cfg.to_dict())
    store.write_json(run_dir / store.STATUS, {"status": "running", "started": time.time(), "pid": os.getpid(),
                                              "host": socket.gethostname()})
    hook = registry.hook
    hook.iclbench_run_started(run_dir=run_dir, config=cfg)

    started = time.perf_counter()
    if state is not None:  # drop what was logged after the checkpoint: the resumed run logs it again
        os.truncate(run_dir / store.LOG, state["log_offset"])
    with open(run_dir / store.LOG, "w" if state is None else "a", buffering=1) as log_file:
        event = {"event": "start"} if state is None else {"event": "resume", "step": state["step"]}
        log_file.write(json.dumps({**event, "run": cfg.run_name, "device": str(dev)}) + "\n")

        def log(step, metrics):
            log_file.write(json.dumps({"step": step, **metrics}) + "\n")
            hook.iclbench_train_log(run_dir=run_dir, step=step, metrics=metrics)

        def checkpoint(training_state):
            log_file.flush()
            store.save_training_state(run_dir / store.TRAIN_STATE, {**training_state, "log_offset": log_file.tell()})

        try:
            stats = train(model_obj, task_obj, cfg.train, cfg.seed, dev, log=log, progress=not quiet,
                          resume=state, checkpoint=checkpoint)
        except TrainingDiverged as exc:
            store.write_json(run_dir / store.STATUS, {"status": "diverged", "message": str(exc)})
            raise TrainingDiverged(f"{exc} (log kept in {run_dir / store.LOG})") from None
        except KeyboardInterrupt:
            store.write_json(run_dir / store.STATUS, {"status": "interrupted", "message": "Ctrl-C"})
            raise
        log_file.write(json.dumps({"event": "trained", **stats}) + "\n")

    store.save_state_dict(run_dir / store.CHECKPOINT, model_obj.state_dict(),
                          {"config": json.dumps(cfg.to_dict())})
    batch = evaluation_batch(task_obj, cfg, dev)
    score_from = cfg.eval.score_from if cfg.eval.score_from >= 0 else task_obj.score_from
    curves = score(model_obj, baselines, task_obj, batch, score_from, cfg.eval.bootstrap, cfg.eval.confidence,
                   cfg.eval.seed)
    # the all-zeros predictor anchors the leaderboard's ICL score (0 = zero predictor, 1 = best baseline)
    zero = error_curves({"zero": torch.zeros_like(batch.targets)}, batch, task_obj.normalizer(dev), score_from,
                        replicates=1)["predictors"]["zero"]
    if cfg.eval.probes:  # before metrics.json, which marks the run complete
        from .probing import run_probes, save_probes

        save_probes(run_dir, run_probes(model_obj, task_obj, seed=cfg.eval.seed + 1, device=dev,
                                        registry=registry), replace=True)
    ood = evaluate_ood(model_obj, task_obj, registry, cfg, dev, score_from) if cfg.eval.ood else {}
    wall = time.perf_counter() - started
    metrics = {
        "task": cfg.task,
        "model": cfg.model,
        "seed": cfg.seed,
        "config_hash": cfg.config_hash,
        "groups": {"task": cfg.section_hash("task", "eval"), "model": cfg.section_hash("model", "train")},
        "summary": {name: {"mean": p["mean"], "ci": p["ci"]} for name, p in curves["predictors"].items()},
        "reference": {"zero": {"mean": zero["mean"], "curve": zero["curve"]}},
        "curves": curves,
        "ood": ood,
        "baselines": sorted(baselines),
        "train": stats,
        "wall_time_s": wall,
        "provenance": {**store.provenance(dev), "seed": cfg.seed},
        "config": cfg.to_dict(),
        "extra": {},
    }
    hook.iclbench_eval_finished(run_dir=run_dir, config=cfg, metrics=metrics)
    store.write_json(run_dir / store.METRICS, metrics)
    store.write_json(run_dir / store.STATUS, {"status": "complete", "wall_time_s": wall})
    (run_dir / store.TRAIN_STATE).unlink(missing_ok=True)  # complete: nothing left to resume
    hook.iclbench_run_finished(run_dir=run_dir, config=cfg, metrics=metrics)
    return RunResult(run_dir, metrics, cfg, task_obj, model_obj, outcome="trained" if state is None else "resumed")


def format_ood(metrics: dict, fmt: str = "github") -> str:
    """One row per distribution shift: the summary error of the model and each baseline (or why skipped)."""
    from tabulate import tabulate

    names = ["model"]
    for summary in [metrics["summary"]] + [e["summary"] for e in metrics.get("ood", {}).values() if "summary" in e]:
        names += [n for n in summary if n not in names]  # a shift may add a baseline (ridge once noisy)
    rows = []
    for shift, entry in metrics.get("ood", {}).items():
        if "skipped" in entry:
            rows.append([shift, f"skipped: {entry['skipped']}"] + [""] * (len(names) - 1))
        else:
            rows.append([shift] + [f"{entry['summary'][n]['mean']:.4f}" if n in entry["summary"] else ""
                                   for n in names])
    return tabulate(rows, headers=["shift"] + [f"{n} ({metrics['model']})" if n == "model" else n
                                               for n in names], tablefmt=fmt, disable_numparse=True)


def format_curves(metrics: dict, fmt: str = "github") -> str:
    """Per-position table: one row per position, one column per predictor, 'mean [lo, hi]'."""
    from tabulate import tabulate

    curves = metrics["curves"]
    names = ["model"] + [n for n in curves["predictors"] if n != "model"]
    rows = []
    for i, pos in enumerate(curves["positions"]):
        row = [pos]
        for n in names:
            p = curves["predictors"][n]
            row.append(f"{p['curve'][i]:.4f} [{p['curve_lo'][i]:.4f}, {p['curve_hi'][i]:.4f}]")
        rows.append(row)
    k = curves["score_from"]
    row = [f"mean t>={k}"]
    for n in names:
        s = metrics["summary"][n]
        row.append(f"{s['mean']:.4f} [{s['ci'][0]:.4f}, {s['ci'][1]:.4f}]")
    rows.append(row)
    return tabulate(rows, headers=["t"] + [f"{n} ({metrics['model']})" if n == "model" else n for n in names],
                    tablefmt=fmt, disable_numparse=True)
