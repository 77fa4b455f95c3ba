"""One run: resolve config → build task and model → train → evaluate against baselines → write the record."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import contracts, store
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
    for what, size in sizes.items():
        if size > limit:
            raise ICLBenchError(f"{what} would take {size / 2 ** 30:,.1f} GiB, more than the "
                                f"{limit / 2 ** 30:,.1f} GiB of {device}; choose smaller sizes")


def build(registry: Registry, cfg: RunConfig, device: torch.device):
    """Instantiate the task and a freshly initialised model (initialisation seeded by ``cfg.seed``)."""
    task = registry.task(cfg.task)(cfg.task_options)
    model_cls = registry.model(cfg.model)
    check_sizes(cfg, task, model_cls, device)
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
    try:
        model.load_state_dict(store.load_state_dict(run_dir / store.CHECKPOINT))
    except Exception as exc:  # truncated or foreign weights: safetensors and torch raise their own types
        raise ICLBenchError(f"damaged weights {run_dir / store.CHECKPOINT} ({one_line(exc)}); rerun the run "
                            "with --force") from None
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
        baselines, _ = contracts.screen_baselines({n: e.obj for n, e in registry.task_baselines(shifted).items()},
                                                  evaluation_batch(shifted, cfg, device), warn=lambda m: None)
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
        status = store.read_json(run_dir / store.STATUS)
    except store.DamagedRun:  # missing, or damaged (null, a list, not a regular file): no earlier attempt known
        status = {}
    if resume and not status and not (run_dir / store.TRAIN_STATE).exists():
        raise ICLBenchError(f"nothing to resume in {run_dir}: this config was never run there")
    if force:
        return None
    if (run_dir / store.METRICS).exists():
        return "complete"
    # whether another process computes this run is the lock's business (held by the caller), not the pid in
    # status.json, which another process may have taken over since
    if not (run_dir / store.TRAIN_STATE).exists():
        return None
    try:
        state = store.load_training_state(run_dir / store.TRAIN_STATE)
        if not isinstance(state, dict) or "step" not in state or "device" not in state:
            raise ValueError("not a training state")
    except Exception as exc:
        warn(f"damaged checkpoint {run_dir / store.TRAIN_STATE} ({type(exc).__name__}: {one_line(exc)}); "
             "starting this run afresh")
        return None
    if state["device"] != device.type:
        raise ICLBenchError(f"the checkpoint in {run_dir} was written on {state['device']}, this run is on "
                            f"{device.type}; pass --device {state['device']} to continue it, or --force to "
                            "start afresh")
    return state


def warn(message: str) -> None:
    print(f"iclbench: warning: {message}", file=sys.stderr)


def one_line(exc, limit: int = 300) -> str:
    """An exception's text on one line (PyTorch's are often several), shortened to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


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
    except Exception as exc:  # damaged metrics or weights (a truncated safetensors raises its own type)
        raise ICLBenchError(f"run {run_dir} looks complete but cannot be read ({one_line(exc)}); rerun with "
                            "--force") from None
    return RunResult(run_dir, metrics, cfg, task_obj, model_obj.eval(), outcome="complete")


#: (run_dir, config, registry) of the run in progress, once its directory says "running"
_RUNNING = contextvars.ContextVar("iclbench_running", default=None)


def check_plugins(registry: Registry, cfg: RunConfig, task_obj, model_obj, device) -> None:
    """The task's and the model's contracts (:mod:`iclbench.contracts`), before any training."""
    contracts.check_task(task_obj, registry.owner("task", cfg.task), device)
    contracts.check_model(model_obj, task_obj, registry.owner("model", cfg.model), device)


def marks_failures(fn):
    """A run that raises after its directory said "running" is recorded as ``failed`` (with the plugin whose
    code raised, when one did) and ``iclbench_run_failed`` is called; a plugin's error reaches the user as one
    line naming it, never as an iclbench internal error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        token = _RUNNING.set(None)
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            running = _RUNNING.get()
            if running is None or isinstance(exc, KeyboardInterrupt):
                raise
            run_dir, cfg, registry = running
            plugin = getattr(exc, "plugin", None) or contracts.blame(exc, registry)
            error = str(exc) if isinstance(exc, ICLBenchError) else f"{type(exc).__name__}: {exc}"
            status = "diverged" if isinstance(exc, TrainingDiverged) else "failed"
            if status == "failed":
                store.write_json(run_dir / store.STATUS, {"status": "failed", "plugin": plugin, "error": error,
                                                          "time": time.time()})
            registry.notify("iclbench_run_failed", run_dir=run_dir, config=cfg, status=status, error=error,
                            plugin=plugin)
            if isinstance(exc, ICLBenchError) or plugin is None:
                raise
            raise contracts.PluginError(f"plugin '{plugin}' failed: {error} (run {run_dir} marked failed; "
                                        "ICLBENCH_DEBUG=1 for the traceback)") from exc
        finally:
            _RUNNING.reset(token)

    return wrapper


#: the locks held by the :func:`run` in progress, released when it returns or raises
_HELD = contextvars.ContextVar("iclbench_held_locks", default=None)


def holds_run_lock(fn):
    """Release whatever lock ``fn`` took (through ``_HELD``) when it returns or raises, after
    :func:`marks_failures` has recorded a failure under it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            token = _HELD.set(stack)
            try:
                return fn(*args, **kwargs)
            finally:
                _HELD.reset(token)

    return wrapper


def _non_finite_options(cfg: RunConfig) -> list[str]:
    return [f"{section}.{k}={v}" for section, opts in (("task", cfg.task_options), ("model", cfg.model_options))
            for k, v in dataclasses.asdict(opts).items() if isinstance(v, float) and not math.isfinite(v)]


def _continue_from(run_dir: Path, dev, model_obj, state):
    """With the lock held: drop stale temporary files; open the log to continue (or decide to start afresh
    when it or the weights are damaged); the thread count of each training segment, warning when a resume
    changes it. Returns ``(state, log file or None, segments)``."""
    store.remove_stale_temporaries(run_dir)  # left by a write killed halfway; no one else writes here now
    threads, log_file = torch.get_num_threads(), None
    if state is not None:
        try:  # drop what was logged after the checkpoint: the resumed run logs it again
            log_file = store.open_log(run_dir / store.LOG, keep=int(state["log_offset"]))
            if "trained" in state:  # killed after training (evaluating, probing): the weights, no retraining
                model_obj.load_state_dict(store.load_state_dict(run_dir / store.CHECKPOINT))
                model_obj.eval()
        except Exception as exc:
            if log_file is not None:
                log_file.close()
            warn(f"cannot continue {run_dir} from its checkpoint ({one_line(exc)}); starting it afresh")
            state, log_file = None, None
    if state is None:
        return None, None, [{"from_step": 0, "threads": threads, "device": dev.type}]
    segments = [s for s in state.get("segments", []) if isinstance(s, dict)]
    if "trained" not in state:
        before = segments[-1].get("threads") if segments else None
        if dev.type == "cpu" and before is not None and before != threads:
            warn(f"resuming {run_dir.name} with {threads} torch threads, but its steps up to {state['step']} ran "
                 f"with {before}: the metrics will not match an uninterrupted run bit for bit (continue with "
                 f"{before}, e.g. OMP_NUM_THREADS={before}, to keep them reproducible)")
        segments.append({"from_step": state["step"], "threads": threads, "device": dev.type})
    return state, log_file, segments


@holds_run_lock
@marks_failures
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
    nan = [o for o in _non_finite_options(cfg) if o.endswith("=nan")]
    if nan:  # fails as a bad option, not later as "divergence" with advice to lower the learning rate
        raise ICLBenchError(f"option(s) {', '.join(nan)} must be numbers, got NaN")
    dev = resolve_device(cfg.device)
    task_obj, model_obj = build(registry, cfg, dev)
    check_plugins(registry, cfg, task_obj, model_obj, dev)
    baselines = {n: e.obj for n, e in registry.task_baselines(task_obj).items()}
    if "model" in baselines:
        raise ICLBenchError(f"task '{cfg.task}' declares a baseline named 'model', which is reserved")

    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.out) / cfg.run_name
    if resume and not (run_dir / store.STATUS).exists() and not (run_dir / store.TRAIN_STATE).exists():
        raise ICLBenchError(f"nothing to resume in {run_dir}: this config was never run there")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ICLBenchError(f"cannot create run directory {str(run_dir)!r}: {exc.strerror}") from None
    try:  # one writer per run directory, --force included; held until run() returns or raises
        _HELD.get().enter_context(store.run_lock(run_dir))
    except store.RunBusy as exc:
        raise ICLBenchError(f"run {run_dir} is being computed by {exc}; wait for it, or stop it and rerun to "
                            "continue from its last checkpoint") from None
    state = earlier_attempt(run_dir, dev, resume=resume, force=force)
    if state == "complete":
        return completed_run(run_dir, cfg, task_obj, model_obj)
    state, log_file, segments = _continue_from(run_dir, dev, model_obj, state)
    (run_dir / store.METRICS).unlink(missing_ok=True)  # the directory now describes this run
    if state is None:
        (run_dir / store.TRAIN_STATE).unlink(missing_ok=True)
    store.write_yaml(run_dir / store.CONFIG, cfg.to_dict())
    store.write_json(run_dir / store.STATUS, {"status": "running", "started": time.time(), "pid": os.getpid(),
                                              "pid_started": store.process_start_time(os.getpid()),
                                              "host": socket.gethostname(), "threads": segments[-1]["threads"]})
    _RUNNING.set((run_dir, cfg, registry))
    registry.notify("iclbench_run_started", run_dir=run_dir, config=cfg)

    started = time.perf_counter()
    trained = state is not None and "trained" in state  # killed after training: evaluate, do not retrain
    with log_file or store.open_log(run_dir / store.LOG) as log_file:  # never written through a symlink
        event = {"event": "start"} if state is None else {"event": "resume", "step": state["step"]}
        if not trained:
            log_file.write(json.dumps({**event, "run": cfg.run_name, "device": str(dev)}) + "\n")

        def log(step, metrics):
            log_file.write(json.dumps({"step": step, **metrics}) + "\n")
            registry.notify("iclbench_train_log", run_dir=run_dir, step=step, metrics=metrics)

        def checkpoint(training_state):
            log_file.flush()
            store.save_training_state(run_dir / store.TRAIN_STATE, {**training_state, "log_offset": log_file.tell(),
                                                                    "segments": segments})

        try:
            stats = state["trained"] if trained else train(model_obj, task_obj, cfg.train, cfg.seed, dev, log=log,
                                                           progress=not quiet, resume=state, checkpoint=checkpoint)
        except TrainingDiverged as exc:
            message, bad = str(exc), _non_finite_options(cfg)
            if bad:  # not the learning rate's fault
                message = (f"{message.split('; try')[0]}; likely cause: non-finite option(s) {', '.join(bad)}, "
                           "not the learning rate")
            store.write_json(run_dir / store.STATUS, {"status": "diverged", "message": message})
            raise TrainingDiverged(f"{message} (log kept in {run_dir / store.LOG})") from None
        except KeyboardInterrupt:
            store.write_json(run_dir / store.STATUS, {"status": "interrupted", "message": "Ctrl-C",
                                                      "threads": segments[-1]["threads"]})
            raise
        if not trained:
            log_file.write(json.dumps({"event": "trained", **stats}) + "\n")
        log_end = log_file.tell()

    store.save_state_dict(run_dir / store.CHECKPOINT, model_obj.state_dict(),
                          {"config": json.dumps(cfg.to_dict())})
    # a checkpoint at the end of training: a run killed while evaluating or probing does not train again
    store.save_training_state(run_dir / store.TRAIN_STATE, {"step": cfg.train.steps, "trained": stats,
                                                            "device": dev.type, "log_offset": log_end,
                                                            "segments": segments})
    batch = evaluation_batch(task_obj, cfg, dev)
    owners = {n: f"baseline '{cfg.task}:{n}' (plugin '{e.plugin}')" for n, e in registry.task_baselines(task_obj).items()}
    baselines, refused = contracts.screen_baselines(baselines, batch, owners)
    owners.update({"model": registry.owner("model", cfg.model), "model.plugin": registry.models[cfg.model].plugin})
    score_from = cfg.eval.score_from if cfg.eval.score_from >= 0 else task_obj.score_from
    curves = score(model_obj, baselines, task_obj, batch, score_from, cfg.eval.bootstrap, cfg.eval.confidence,
                   cfg.eval.seed, owners)
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
        "refused_baselines": refused,  # broke the baseline contract; not scored (contracts.screen_baselines)
        "oracles": sorted(n for n, fn in baselines.items() if contracts.is_oracle(n, fn)),
        "train": stats,
        "wall_time_s": wall,
        "provenance": {**store.provenance(dev), "seed": cfg.seed, "plugins": registry.plugin_versions(),
                       "train_segments": segments},
        "config": cfg.to_dict(),
        "extra": {},
    }
    registry.notify("iclbench_eval_finished", run_dir=run_dir, config=cfg, metrics=metrics)
    unstable = store.unstable_reason(metrics)
    if unstable:  # recorded, but kept off the leaderboard (leaderboard --include-unstable shows it)
        metrics["unstable"] = unstable
        warn(f"run {run_dir.name} is unstable: {unstable}; it is left off the leaderboard")
    store.write_json(run_dir / store.METRICS, metrics)
    store.write_json(run_dir / store.STATUS, {"status": "unstable", "message": unstable, "wall_time_s": wall}
                     if unstable else {"status": "complete", "wall_time_s": wall})
    (run_dir / store.TRAIN_STATE).unlink(missing_ok=True)  # complete: nothing left to resume
    _RUNNING.set(None)  # complete: a failing logger below must not mark it failed
    registry.notify("iclbench_run_finished", run_dir=run_dir, config=cfg, metrics=metrics)
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
