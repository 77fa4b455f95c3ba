"""A run directory: everything on disk about one run's life, in one place.

:class:`RunDir` reads a run (its config, metrics, weights, probe results) and, held open by the one process
computing it (:meth:`RunDir.open`), writes it: the lock, the status transitions (running → complete,
unstable, failed, diverged or interrupted), ``train.log``, the typed training state
(:class:`TrainingState`), the weights and the probes' files. :func:`find_runs` finds the run directories under
a results directory. The files themselves are written atomically by :mod:`iclbench.store`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import socket
import time
from pathlib import Path

import torch

from . import contracts, store
from .build import build
from .config import RunConfig, resolve, resolved_defaults
from .errors import ICLBenchError, TrainingDiverged, interruption, one_line, warn
from .registry import Registry, get_registry
from .trainer import TrainingState, resolve_device

PROBES_JSON, PROBES_DIR = "probes.json", "probes"
#: the files whose presence makes a directory a run directory
MARKERS = (store.CONFIG, store.METRICS, store.STATUS)
#: the file that marks a folder (and all below it) as holding no runs, though it may hold copies of them
NOT_RUNS = ".iclbench-not-runs"
#: the file that marks a folder as an exported reference model (:mod:`iclbench.export`): read, never written to
EXPORT_MANIFEST = "manifest.json"


def load_run(run_dir: str | Path, registry: Registry | None = None, device: str = "cpu"):
    """Rebuild ``(config, task, model)`` of a finished run from its directory (see :meth:`RunDir.load`)."""
    return RunDir(run_dir).load(registry or get_registry(), resolve_device(device))


def find_runs(results: Path) -> list[Path]:
    """The run directories under ``results``: every directory holding config.yaml, metrics.json or
    status.json, outside hidden directories, exported models (:data:`EXPORT_MANIFEST`) and folders marked as
    holding no runs (:func:`mark_not_runs`), ``results`` itself included."""
    results = Path(results)
    if not results.is_dir():
        return []
    dirs = {p.parent for pattern in MARKERS for p in results.rglob(pattern)}
    return sorted(d for d in dirs if not any(part.startswith(".") for part in d.relative_to(results).parts)
                  and not (d / EXPORT_MANIFEST).is_file()
                  and not any((folder / NOT_RUNS).exists() for folder in (d, *d.parents)
                              if folder.is_relative_to(results)))


#: the copies already warned about in this process (a report reads one results directory several times)
_COPIES_WARNED: set[str] = set()


def distinct_runs(run_dirs, warn=warn) -> list[Path]:
    """``run_dirs`` with each copy of a run left out: a complete run with the config hash and seed of one
    listed before it (say a results folder copied into a second folder under the same results directory)
    is one run, not another seed. Warns once, in one line, naming the copies; incomplete or damaged runs
    are kept (whoever reads them says what is wrong), so a damaged copy never hides a healthy run."""
    kept, seen, copies = [], {}, []
    for run_dir in run_dirs:
        try:
            m = store.read_run(Path(run_dir))
            key = (m["task"], m["model"], m["config_hash"], m["seed"])
            hash(key)
        except (store.DamagedRun, KeyError, TypeError, ValueError, OSError):
            kept.append(run_dir)
            continue
        if key in seen:
            copies.append(f"{run_dir} (a copy of {seen[key]})")
            continue
        seen[key] = run_dir
        kept.append(run_dir)
    if copies:
        shown = "; ".join(copies[:3]) + (f"; and {len(copies) - 3} more" if len(copies) > 3 else "")
        message = (f"{len(copies)} run director{'y is a copy' if len(copies) == 1 else 'ies are copies'} of "
                   f"another run (same configuration and seed), counted once: {shown}")
        if message not in _COPIES_WARNED:
            _COPIES_WARNED.add(message)
            warn(message)
    return kept


def mark_not_runs(folder: Path) -> None:
    """Mark ``folder`` as one whose run-like files are not runs: a tracker's store under a results directory,
    which keeps copies of the runs it logged (:func:`find_runs` passes over it)."""
    if not (Path(folder) / NOT_RUNS).exists():
        store.write_atomic(Path(folder) / NOT_RUNS, "copies of iclbench runs, not runs: find_runs skips this folder\n")


class RunDir:
    """One run's directory. Reading it needs nothing held; writing it is :meth:`open`'s."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- reading ------------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        """The metrics of a complete run; :class:`~iclbench.store.DamagedRun` saying what is wrong otherwise."""
        return store.read_run(self.path)

    def training_state(self) -> TrainingState | None:
        """The training state of an unfinished run, None where there is none; raises on a damaged one."""
        if not (self.path / store.TRAIN_STATE).exists():
            return None
        return TrainingState.from_dict(store.load_training_state(self.path / store.TRAIN_STATE))

    def load_weights(self, model: torch.nn.Module) -> torch.nn.Module:
        model.load_state_dict(store.load_state_dict(self.path / store.CHECKPOINT))
        return model.eval()

    def load(self, registry: Registry, device: torch.device):
        """Rebuild ``(config, task, model)`` of a finished run (weights via safetensors)."""
        cfg = resolve(registry, config=self.path / store.CONFIG)
        task, model = build(registry, cfg, device)
        try:
            self.load_weights(model)
        except Exception as exc:  # truncated or foreign weights: safetensors and torch raise their own types
            advice = ("export the run again (iclbench export)" if (self.path / EXPORT_MANIFEST).exists()
                      else "rerun the run with --force")
            raise ICLBenchError(f"damaged weights {self.path / store.CHECKPOINT} ({one_line(exc)}); {advice}") \
                from None
        return cfg, task, model

    def probes(self) -> dict:
        """``probes.json``'s table of probes (name → summary, time, table file); {} where none ran."""
        path = self.path / PROBES_JSON
        if not path.exists():
            return {}
        record = store.read_json(path)
        if not isinstance(record.get("probes"), dict):
            raise store.DamagedRun(f"{PROBES_JSON} has no 'probes' table")
        return record["probes"]

    def save_probes(self, outcomes: dict, replace: bool = False) -> dict:
        """Write each table to ``probes/<name>.csv`` and merge the summaries into ``probes.json``
        (``replace``: start it afresh, as a new run does)."""
        probes = {}
        if not replace:
            try:
                probes = self.probes()
            except store.DamagedRun as exc:  # truncated, null, a list: the results just computed are not lost
                warn(f"replacing damaged {self.path / PROBES_JSON} ({exc})")
        for name, outcome in outcomes.items():
            entry = {k: v for k, v in outcome.items() if k != "table"}
            if "table" in outcome:
                rel = f"{PROBES_DIR}/{name}.csv"
                buffer = io.StringIO()
                outcome["table"].to_csv(buffer, index=False)
                store.write_atomic(self.path / rel, buffer.getvalue(), root=self.path)
                entry["table"] = rel
            probes[name] = entry
        record = {"probes": probes, "provenance": store.provenance(torch.device("cpu")) | {"written": time.time()}}
        store.write_json(self.path / PROBES_JSON, record)
        return record

    def check_resumable(self) -> None:
        """For ``--resume``: one line where there is nothing to continue, saying why (never run here, or a
        damaged status.json and no checkpoint) and what to do. A checkpoint or metrics.json, even damaged, is
        something: reading it says more (a damaged checkpoint starts the run afresh with a warning)."""
        status = self.path / store.STATUS
        if any(os.path.lexists(self.path / name) for name in (store.TRAIN_STATE, store.METRICS)):
            return
        if not os.path.lexists(status):
            raise ICLBenchError(f"nothing to resume in {self.path}: this config was never run there")
        try:
            store.read_json(status)
        except store.DamagedRun as exc:
            reason = ("a dangling link" if status.is_symlink() and not status.exists()
                      else " ".join(str(exc).split()))
            raise ICLBenchError(f"cannot resume {self.path}: its status.json is damaged ({reason}) and there is "
                                f"no checkpoint ({store.TRAIN_STATE}) to continue from; rerun without --resume "
                                "to start the run afresh") from None

    # --- writing: the life of a run -----------------------------------------------------------------------
    @contextlib.contextmanager
    def open(self, cfg: RunConfig, registry: Registry, device: torch.device, task, model, *,
             resume: bool = False, force: bool = False):
        """Hold this directory for computing ``cfg``'s run: create and lock it (one writer per directory,
        ``force`` included), and find what an earlier attempt left (:attr:`OpenRun.earlier`). Yields an
        :class:`OpenRun`. Once :meth:`OpenRun.start` has said "running", a run that raises is recorded as
        failed (diverged, or interrupted on Ctrl-C) and ``iclbench_run_failed`` is called; a plugin's error
        reaches the user as one line naming it."""
        if (self.path / EXPORT_MANIFEST).exists():  # a committed reference model is never trained into
            raise ICLBenchError(f"{self.path} is an exported reference model, not a run directory: nothing is "
                                "trained or written there; pass --out DIR to train this configuration anew")
        if resume:
            self.check_resumable()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ICLBenchError(f"cannot create run directory {str(self.path)!r}: {exc.strerror}") from None
        held = contextlib.ExitStack()
        try:
            held.enter_context(store.run_lock(self.path))
        except store.RunBusy as exc:
            raise ICLBenchError(f"run {self.path} is being computed by {exc}; wait for it, or stop it and rerun "
                                "to continue from its last checkpoint") from None
        with held:
            run = OpenRun(self, cfg, registry, device, task, model)
            try:
                run.find_earlier(force=force)
                yield run
            except BaseException as exc:
                error = run.fail(exc)
                if error is not None:
                    raise error from exc
                raise
            finally:
                if run.log is not None:
                    run.log.close()


class OpenRun:
    """A run directory held by the process computing its run (see :meth:`RunDir.open`)."""

    def __init__(self, run_dir: RunDir, cfg: RunConfig, registry: Registry, device: torch.device, task, model):
        self.dir, self.path, self.cfg, self.registry, self.device = run_dir, run_dir.path, cfg, registry, device
        self.task, self.model = task, model
        #: what an earlier attempt left: None (start afresh), a TrainingState (continue it) or "complete"
        self.earlier: TrainingState | str | None = None
        self.log = None  # train.log, open while the run is
        self.segments: list[dict] = []
        self.running = False  # status.json says "running": a failure from now on is recorded
        self.stats: dict | None = None  # the training figures, once trained
        #: the step a rerun continues from: that of the latest training state saved (0: none yet)
        self.saved_step = 0

    @property
    def found_complete(self) -> bool:
        """Whether an earlier attempt completed the run."""
        return isinstance(self.earlier, str)

    @property
    def trained(self) -> bool:
        return self.stats is not None

    def find_earlier(self, *, force: bool) -> None:
        """What an earlier attempt left here: ``"complete"``, a training state to continue from, or nothing
        (``force`` always starts afresh). Whether another process computes this run is the lock's business,
        not the pid in status.json, which another process may have taken over since."""
        if force:
            return
        if (self.path / store.METRICS).exists():
            self.earlier = "complete"
            return
        try:
            state = self.dir.training_state()
        except Exception as exc:
            reason = one_line(exc) if isinstance(exc, store.DamagedRun) else f"{type(exc).__name__}: {one_line(exc)}"
            warn(f"damaged checkpoint {self.path / store.TRAIN_STATE} ({reason}); starting this run afresh")
            return
        if state is not None and state.device != self.device.type:
            raise ICLBenchError(f"the checkpoint in {self.path} was written on {state.device}, this run is on "
                                f"{self.device.type}; pass --device {state.device} to continue it, or --force to "
                                "start afresh")
        self.earlier = state

    def read_complete(self) -> dict:
        """The metrics of the run found complete, its weights loaded into :attr:`model`."""
        try:
            metrics = self.dir.metrics()
            self.dir.load_weights(self.model)
        except Exception as exc:  # damaged metrics or weights (a truncated safetensors raises its own type)
            raise ICLBenchError(f"run {self.path} looks complete but cannot be read ({one_line(exc)}); rerun "
                                "with --force") from None
        return metrics

    def start(self, stacked_with: list[int] | None = None) -> None:
        """Say "running": continue the earlier attempt's log (or start afresh where it or the weights are
        damaged), write the config and the status, call ``iclbench_run_started``, log the start."""
        store.remove_stale_temporaries(self.path)  # left by a write killed halfway; no one else writes here now
        threads, state = torch.get_num_threads(), self.earlier
        if state is not None:
            try:  # drop what was logged after the checkpoint: the resumed run logs it again
                self.log = store.open_log(self.path / store.LOG, keep=int(state.log_offset))
                if state.trained is not None:  # killed after training (evaluating, probing): no retraining
                    self.dir.load_weights(self.model)
                    self.stats = state.trained
            except Exception as exc:
                if self.log is not None:
                    self.log.close()
                warn(f"cannot continue {self.path} from its checkpoint ({one_line(exc)}); starting it afresh")
                state, self.log, self.stats, self.earlier = None, None, None, None
        self.saved_step = 0 if state is None else state.step
        segment = {"from_step": 0 if state is None else state.step, "threads": threads, "device": self.device.type}
        if stacked_with:
            segment["stacked_with"] = len(stacked_with)
        self.segments = [] if state is None else [s for s in state.segments if isinstance(s, dict)]
        if state is not None and not self.trained:
            before = self.segments[-1].get("threads") if self.segments else None
            if self.device.type == "cpu" and before is not None and before != threads:
                warn(f"resuming {self.path.name} with {threads} torch threads, but its steps up to {state.step} ran "
                     f"with {before}: the metrics will not match an uninterrupted run bit for bit (continue with "
                     f"{before}, e.g. OMP_NUM_THREADS={before}, to keep them reproducible)")
        if not self.trained:
            self.segments.append(segment)
        store.remove_file(self.path / store.METRICS)  # the directory now describes this run
        if state is None:
            store.remove_file(self.path / store.TRAIN_STATE)
        # the defaults shown as they resolved on this run (score_from, n_ctx, device); the hash reads them as given
        store.write_yaml(self.path / store.CONFIG, self.written_config())
        store.write_json(self.path / store.STATUS, {"status": "running", "started": time.time(), "pid": os.getpid(),
                                                    "host": socket.gethostname(), "threads": threads}
                         | ({"stacked_with": len(stacked_with)} if stacked_with else {}))
        self.running = True
        self.registry.notify("iclbench_run_started", run_dir=self.path, config=self.cfg)
        if self.log is None:
            self.log = store.open_log(self.path / store.LOG)  # never written through a symlink
        if not self.trained:
            event = {"event": "start"} if state is None else {"event": "resume", "step": state.step}
            self.write_log({**event, "run": self.cfg.run_name, "device": str(self.device)}
                           | ({"stacked_seeds": stacked_with} if stacked_with else {}))

    def written_config(self) -> dict:
        """``config.yaml``: the configuration with its defaults resolved on this run (see
        :func:`iclbench.config.resolved_defaults`)."""
        return self.cfg.to_dict(resolved=resolved_defaults(self.cfg, self.task, self.model, self.device))

    @property
    def resume_from(self) -> TrainingState | None:
        """The mid-training state to continue from, if any."""
        return self.earlier if isinstance(self.earlier, TrainingState) and not self.trained else None

    def write_log(self, record: dict) -> None:
        self.log.write(json.dumps(record) + "\n")

    def log_train(self, step: int, metrics: dict) -> None:
        """A point of the training curve: in ``train.log`` and to every logger (``iclbench_train_log``)."""
        self.write_log({"step": step, **metrics})
        self.registry.notify("iclbench_train_log", run_dir=self.path, step=step, metrics=metrics)

    def checkpoint(self, state: TrainingState) -> None:
        """Save a mid-training state, with where the log stands."""
        self.log.flush()
        state.log_offset, state.segments = self.log.tell(), self.segments
        store.save_training_state(self.path / store.TRAIN_STATE, state.to_dict())
        self.saved_step = state.step

    def finish_training(self, stats: dict) -> None:
        """Log the end of training and save the weights and a final training state, so that a run killed
        while evaluating or probing does not train again."""
        self.stats = stats
        self.write_log({"event": "trained", **stats})
        self.log.flush()
        store.save_state_dict(self.path / store.CHECKPOINT, self.model.state_dict(),
                              {"config": json.dumps(self.written_config())})
        self.checkpoint(TrainingState(step=self.cfg.train.steps, device=self.device.type, trained=stats))

    def diverged(self, exc: TrainingDiverged) -> TrainingDiverged:
        """The divergence as it is recorded: its cause named (a non-finite option rather than the learning
        rate, where one is set), the log kept; marks the run diverged."""
        bad = non_finite_options(self.cfg)
        advice = (f"likely cause: non-finite option(s) {', '.join(bad)}, not the learning rate" if bad
                  else exc.advice)
        exc = TrainingDiverged(exc.step, exc.loss, advice, log=self.path / store.LOG)
        self.fail(exc)
        return exc

    def fail(self, exc: BaseException) -> BaseException | None:
        """Record that the run ends with ``exc`` (once): ``interrupted`` on Ctrl-C, SIGHUP or SIGTERM (with the
        step its rerun continues from), ``diverged``, else
        ``failed`` naming the plugin whose code raised; ``iclbench_run_failed`` is called except on Ctrl-C.
        Returns the error to raise instead of ``exc`` (a plugin's, as one line naming it), or None."""
        if not self.running:
            return None
        self.running = False
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGHUP/SIGTERM (errors.raise_on_signals)
            threads = self.segments[-1]["threads"] if self.segments else torch.get_num_threads()
            store.write_json(self.path / store.STATUS, {"status": "interrupted", "message": interruption(exc),
                                                        "threads": threads, "resumes_from_step": self.saved_step,
                                                        "time": time.time()})
            return None
        plugin = getattr(exc, "plugin", None) or contracts.blame(exc, self.registry)
        if isinstance(exc, TrainingDiverged):
            status, error = "diverged", str(exc)
            store.write_json(self.path / store.STATUS, {"status": "diverged", "message": exc.cause})
        else:
            status = "failed"
            error = str(exc) if isinstance(exc, ICLBenchError) else f"{type(exc).__name__}: {exc}"
            store.write_json(self.path / store.STATUS, {"status": "failed", "plugin": plugin, "error": error,
                                                        "time": time.time()})
        self.registry.notify("iclbench_run_failed", run_dir=self.path, config=self.cfg, status=status, error=error,
                             plugin=plugin)
        if isinstance(exc, ICLBenchError) or plugin is None:
            return None
        return contracts.PluginError(f"plugin '{plugin}' failed: {error} (run {self.path} marked failed; "
                                     "ICLBENCH_DEBUG=1 for the traceback)")

    def complete(self, metrics: dict) -> None:
        """Record the run complete (or unstable: kept off the leaderboard), metrics.json last of all; then
        ``iclbench_run_finished``, whose failing logger no longer marks the run failed."""
        self.registry.notify("iclbench_eval_finished", run_dir=self.path, config=self.cfg, metrics=metrics)
        unstable = store.unstable_reason(metrics)
        if unstable:  # recorded, but kept off the leaderboard (leaderboard --include-unstable shows it); the
            metrics["unstable"] = unstable  # command says so at its end (unstable_warning)
        store.write_json(self.path / store.METRICS, metrics)
        wall = metrics["wall_time_s"]
        store.write_json(self.path / store.STATUS, {"status": "unstable", "message": unstable, "wall_time_s": wall}
                         if unstable else {"status": "complete", "wall_time_s": wall})
        store.remove_file(self.path / store.TRAIN_STATE)  # complete: nothing left to resume
        self.running = False
        self.registry.notify("iclbench_run_finished", run_dir=self.path, config=self.cfg, metrics=metrics)


def non_finite_options(cfg: RunConfig) -> list[str]:
    """``section.key=value`` of each task or model option that is NaN or infinite."""
    return [f"{section}.{k}={v}" for section, opts in (("task", cfg.task_options), ("model", cfg.model_options))
            for k, v in dataclasses.asdict(opts).items() if isinstance(v, float) and not math.isfinite(v)]


def unstable_warning(run_dir, metrics: dict) -> str | None:
    """The one line a command ends with for an unstable run (:func:`iclbench.store.unstable_reason`), or None."""
    unstable = store.unstable_reason(metrics)
    if not unstable:
        return None
    return (f"run {Path(run_dir).name} is unstable: {' '.join(str(unstable).split())}; recorded but left off the "
            "leaderboard (--include-unstable shows it); lower --set train.lr or keep train.grad_clip > 0")
