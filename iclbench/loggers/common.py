"""What the built-in loggers share: which runs enabled them, what a run's records say (flattened to scalars,
curves and labels), and a per-run state that turns every error of the tracker into one warning.

A logger never costs the run: the library missing, a store it cannot reach, or any error while logging is
reported once (one line on stderr) and the logger stays quiet for the rest of that run.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

def targets(config, name: str) -> list[str | None] | None:
    """The run's ``log`` entries for logger ``name``: ``[None]`` for a bare ``name``, ``[TARGET]`` for
    ``name=TARGET``; None when the run did not enable it."""
    found = []
    for item in getattr(config, "log", None) or ():
        key, eq, target = str(item).partition("=")
        if key.strip() == name:
            found.append(target.strip() if eq else None)
    return found or None


def flat_config(config) -> dict[str, object]:
    """The resolved config as ``section.field -> value`` (the run's params)."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", config.to_dict())
    out["config_hash"] = config.config_hash
    out["run_name"] = config.run_name
    out["label"] = label(config)
    return out


def label(config) -> str:
    """'affine noise=0.1 × gpt2l train.steps=600': the run's configuration as the leaderboard, the report and
    ``iclbench specialization`` name it (:func:`iclbench.labels.run_labels`)."""
    from ..labels import run_labels

    task, model = run_labels(config.to_dict())
    return f"{task} × {model}"


def _num(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def headline(metrics: dict) -> dict[str, float]:
    """Final scalars: each predictor's headline error with its CI, the excess over Bayes (absolute and
    relative, where the evaluator recorded it), the OOD errors, and the training figures."""
    out: dict[str, float | None] = {}
    for name, s in (metrics.get("summary") or {}).items():
        out[f"error/{name}"] = _num(s.get("mean"))
        ci = s.get("ci") or (None, None)
        out[f"error_ci_low/{name}"], out[f"error_ci_high/{name}"] = _num(ci[0]), _num(ci[1])
    for name, p in ((metrics.get("curves") or {}).get("predictors") or {}).items():
        ex = p.get("excess_bayes")
        if isinstance(ex, dict):
            out[f"excess_bayes/{name}"] = _num(ex.get("mean"))
            out[f"excess_bayes_relative/{name}"] = _num(ex.get("relative"))
    for shift, entry in (metrics.get("ood") or {}).items():
        for name, s in (entry.get("summary") or {}).items():
            out[f"ood_error/{shift}/{name}"] = _num(s.get("mean"))
    train = metrics.get("train") or {}
    for key in ("tokens_per_s", "train_time_s", "final_loss"):
        out[f"run/{key}"] = _num(train.get(key))
    out["run/wall_time_s"] = _num(metrics.get("wall_time_s"))
    return {metric_name(k): v for k, v in out.items() if v is not None}


def curves(metrics: dict) -> dict[str, list[tuple[int, float]]]:
    """Per-position normalized error of every predictor: ``curve/NAME -> [(t, error), ...]``."""
    c = metrics.get("curves") or {}
    positions = c.get("positions") or []
    out = {}
    for name, p in (c.get("predictors") or {}).items():
        pts = [(int(t), _num(v)) for t, v in zip(positions, p.get("curve") or [])]
        out[metric_name(f"curve/{name}")] = [(t, v) for t, v in pts if v is not None]
    return out


def probe_summaries(run_dir: Path) -> dict[str, float | str]:
    """What each registered probe that ran says for a tracker (:meth:`iclbench.Probe.tracker_summary`), as
    ``<probe>.<key> -> number or text``; nothing where the run has no probes.json or it is damaged."""
    from .. import store
    from ..registry import get_registry

    try:
        stored = store.read_json(Path(run_dir) / "probes.json")["probes"]
        if not isinstance(stored, dict):
            return {}
    except Exception:  # no probes or a damaged file: nothing to record
        return {}
    out = {}
    for name, entry in get_registry().probes.items():
        summary = (stored.get(name) or {}).get("summary") if isinstance(stored.get(name), dict) else None
        if not isinstance(summary, dict):
            continue
        try:
            said = entry.obj.tracker_summary(summary)
        except Exception as exc:  # an older or damaged summary, or a broken plugin: the others still count
            print(f"iclbench: warning: probe '{name}' cannot summarize {run_dir} for a tracker: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        for key, value in (said or {}).items():
            if isinstance(value, str) or _num(value) is not None:
                out[f"{name}.{key}"] = value if isinstance(value, str) else _num(value)
    return out


def labels(run_dir: Path, metrics: dict | None) -> dict[str, str]:
    """Labels a tracker shows as tags: whether the model learned its task (Bayes excess) and what the
    probes say in words (:func:`probe_summaries`)."""
    out = {}
    p = ((metrics or {}).get("curves") or {}).get("predictors", {}).get("model", {})
    if isinstance(p.get("excess_bayes"), dict) and p["excess_bayes"].get("learned"):
        out["learned"] = str(p["excess_bayes"]["learned"])
    return out | {k: v for k, v in probe_summaries(run_dir).items() if isinstance(v, str)}


def probe_scalars(run_dir: Path) -> dict[str, float]:
    """The probes' numbers for a tracker (:func:`probe_summaries`), as ``probe/<probe>.<key>`` metrics."""
    return {metric_name(f"probe/{k}"): v for k, v in probe_summaries(run_dir).items() if not isinstance(v, str)}


def metric_name(name: str) -> str:
    """A name every tracker accepts (MLflow: alphanumerics, ``_ - . / :`` and spaces)."""
    return re.sub(r"[^A-Za-z0-9_\-./: ]", "_", name)


class Logger:
    """Per-run plumbing shared by the built-in loggers. A subclass sets ``name``/``extra`` and implements
    ``open(run_dir, config, target) -> state`` and the logging methods; this class keeps one state per run
    directory, drops it after the first error (one warning), and never lets an error out."""

    name = "?"
    extra = "?"  # the pip extra that installs the library

    def __init__(self):
        self.runs: dict[str, object] = {}

    def warn(self, run_dir, what: str, exc: BaseException | None = None):
        reason = f": {type(exc).__name__}: {' '.join(str(exc).split())[:200]}" if exc is not None else ""
        print(f"iclbench: warning: {self.name} logger {what}{reason}; run {Path(run_dir).name} continues without "
              f"{self.name} logging", file=sys.stderr)

    def guarded(self, run_dir, action: str, fn, *args):
        key = str(run_dir)
        state = self.runs.get(key)
        if state is None:
            return
        try:
            fn(state, *args)
        except Exception as exc:
            self.runs.pop(key, None)
            self.warn(run_dir, f"failed to {action}", exc)
            try:
                self.abandon(state)
            except Exception:
                pass

    # --- the hooks, as the module-level hookimpls call them ----------------------------------------------

    def run_started(self, run_dir, config):
        wanted = targets(config, self.name)
        if wanted is None:
            return
        key = str(run_dir)
        old = self.runs.pop(key, None)
        if old is not None:  # an earlier attempt in this process that never finished
            try:
                self.abandon(old)
            except Exception:
                pass
        try:
            self.library()
        except ImportError as exc:
            self.warn(run_dir, f"is not installed (pip install 'iclbench[{self.extra}]')", exc)
            return
        try:
            self.runs[key] = self.open(Path(run_dir), config, wanted[-1])
        except Exception as exc:
            self.warn(run_dir, "cannot reach its store", exc)
            return
        self.guarded(run_dir, "log the config", self.log_config, config)

    def train_log(self, run_dir, step, metrics):
        if str(run_dir) not in self.runs:  # not enabled for this run: nothing to do, every log_every steps
            return
        values = {f"train/{k}": _num(v) for k, v in metrics.items()}
        self.guarded(run_dir, "log training", self.log_scalars, {k: v for k, v in values.items() if v is not None},
                     int(step))

    def eval_finished(self, run_dir, metrics):
        state = self.runs.get(str(run_dir))
        if state is not None:
            where = self.where(state)
            if where:
                metrics.setdefault("extra", {})[self.name] = where

    def run_finished(self, run_dir, metrics):
        self.guarded(run_dir, "log the results", self.log_results, Path(run_dir), metrics)
        state = self.runs.pop(str(run_dir), None)
        if state is not None:
            try:
                self.finish(state, "FINISHED")
            except Exception as exc:
                self.warn(run_dir, "failed to close the run", exc)

    def run_failed(self, run_dir, status, error, plugin):
        failure = {"status": status, "error": error, "plugin": plugin or ""}
        self.guarded(run_dir, "log the failure", self.log_failure, failure)
        state = self.runs.pop(str(run_dir), None)
        if state is not None:
            try:
                self.finish(state, "FAILED")
            except Exception as exc:
                self.warn(run_dir, "failed to close the run", exc)

    # --- what a subclass implements -----------------------------------------------------------------------

    def library(self):
        raise NotImplementedError

    def open(self, run_dir: Path, config, target: str | None):
        raise NotImplementedError

    def where(self, state) -> dict:
        return {}

    def log_config(self, state, config):
        raise NotImplementedError

    def log_scalars(self, state, values: dict[str, float], step: int):
        raise NotImplementedError

    def log_results(self, state, run_dir: Path, metrics: dict):
        raise NotImplementedError

    def log_failure(self, state, failure: dict):
        raise NotImplementedError

    def finish(self, state, status: str):
        raise NotImplementedError

    def abandon(self, state):
        self.finish(state, "KILLED")


def forwarding_hooks(logger: Logger):
    """The five lifecycle hookimpls a logger module exposes, each handing its call to ``logger``; a module
    binds them to the hook names: ``iclbench_run_started, ... = forwarding_hooks(LOGGER)``."""
    from ..hookspecs import hookimpl

    @hookimpl
    def run_started(run_dir, config):
        logger.run_started(run_dir, config)

    @hookimpl
    def train_log(run_dir, step, metrics):
        logger.train_log(run_dir, step, metrics)

    @hookimpl
    def eval_finished(run_dir, metrics):
        logger.eval_finished(run_dir, metrics)

    @hookimpl
    def run_finished(run_dir, metrics):
        logger.run_finished(run_dir, metrics)

    @hookimpl
    def run_failed(run_dir, status, error, plugin):
        logger.run_failed(run_dir, status, error, plugin)

    return run_started, train_log, eval_finished, run_finished, run_failed


def describe(labels_: dict[str, str], metrics: dict | None = None) -> str:
    """A few Markdown lines for a tracker's text panel: the labels and the model's headline."""
    lines = []
    if metrics:
        s = (metrics.get("summary") or {}).get("model")
        if s:
            lines.append(f"**{metrics.get('model')} on {metrics.get('task')}**: normalized error "
                         f"{s['mean']:.4f} [{s['ci'][0]:.4f}, {s['ci'][1]:.4f}]")
    lines += [f"- {k}: {v}" for k, v in labels_.items()]
    return "\n".join(lines)


def dumps(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)
