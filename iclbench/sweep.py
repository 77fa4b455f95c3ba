"""Sweeps: an experiment file expands to many runs, run in parallel on this machine or on a Ray cluster.

An experiment file (YAML)::

    name: depth                      # names the sweep record; default: the file's stem
    base:                            # shared by every run; the layout of a run's config.yaml
      train: {steps: 3000}
      out: results
    runs:                            # optional list of variants, each crossed with the grid
      - {task: affine, model: gpt3l}
      - {task: affine, model: gpt3l, task.noise: 0.1}
    grid:                            # every combination of these values
      model.n_layers: [1, 2, 3, 6]
      seed: [0, 1, 2]

Every run's config is resolved through :func:`iclbench.config.resolve` before anything runs, and an error
names the file, line and key that caused it. Runs are idempotent: one whose directory already holds complete
results (``metrics.json``) is skipped, so a sweep that was killed continues where it stopped. Workers compute;
the driver records: with Ray, a worker runs into a temporary directory and returns the files, and the driver
writes them under ``out`` (no shared filesystem needed). With ``--stack`` the seeds of one config are one
job (:func:`plan_jobs`), trained stacked as ``run --seeds --stack yes`` trains them, each still a run of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import itertools
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import tempfile
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import store
from .config import TOP_LEVEL, RunConfig, resolve
from .errors import ICLBenchError, did_you_mean, interruption, raise_on_signals, restore_signals
from .registry import Registry, get_registry
from .seeds import available_cores
from .terminal import bar_size, isatty

EXPERIMENT_KEYS = ("name", "base", "grid", "runs")
SECTIONS = ("task", "model", "train", "eval")
EXECUTORS = ("local", "ray")
RECORDS = ".sweeps"  # under out; hidden, so the leaderboard does not take it for a run


# --- experiment files --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One ``key: value`` of an experiment file and where it was written, so errors can point at it."""
    key: str  # task, model, seed, device, out, or section.field
    value: Any
    line: int
    origin: str  # base, grid, runs[i]

    def __str__(self):
        return f"{self.key}={self.value}"


@dataclass
class PlannedRun:
    config: RunConfig
    settings: tuple[Setting, ...]  # what the file said for this run, in the order applied

    @property
    def name(self) -> str:
        return self.config.run_name

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out) / self.config.run_name

    @property
    def label(self) -> str:
        """What varies: the settings from the grid and the runs list (base is common to all)."""
        return ", ".join(str(s) for s in self.settings if s.origin != "base")

    def is_complete(self) -> bool:
        try:
            store.read_run(self.run_dir)
            return True
        except store.DamagedRun:
            return False


@dataclass
class Experiment:
    path: Path
    name: str
    runs: list[PlannedRun]
    duplicates: int = 0  # grid points that resolved to a run already planned
    #: one line per run whose config is invalid (only when loaded with ``collect_errors``; else the first raises)
    invalid: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.runs[0].config.out)

    def only(self, patterns: list[str]) -> Experiment:
        """The experiment narrowed to the runs whose names match one of the shell-style ``patterns``
        (``--only 'relu-nn-gpt6l-*-s[0-4]'``): one cell of a study part, run by the names the part gives it."""
        runs = [p for p in self.runs if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)]
        if not runs:
            names = ", ".join(p.name for p in self.runs[:2]) + (", ..." if len(self.runs) > 2 else "")
            raise ICLBenchError(f"{self.path}: no run matches --only {' '.join(repr(p) for p in patterns)}; "
                                f"its runs are named like {names or '(none)'} (--dry-run lists them)")
        return dataclasses.replace(self, runs=runs)


class _Reader:
    """Walks PyYAML's composed node tree, which keeps line numbers that ``safe_load`` throws away."""

    def __init__(self, path: Path):
        self.path = path
        try:
            text = store.read_regular(path).decode()
        except store.DamagedRun as exc:
            raise ICLBenchError(f"cannot read experiment file {str(path)!r}: {exc}") from None
        except UnicodeDecodeError:
            raise ICLBenchError(f"experiment file {str(path)!r} is not UTF-8 text (a binary file?)") from None
        self.loader = yaml.SafeLoader(text)
        try:
            self.root = self.loader.get_single_node()
        except yaml.YAMLError as exc:
            raise self._yaml_error(exc) from None
        except RecursionError:
            raise ICLBenchError(f"malformed YAML in {path}: nested too deeply") from None

    def _yaml_error(self, exc: yaml.YAMLError) -> ICLBenchError:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return ICLBenchError(f"malformed YAML in {self.path}{where}: {problem}")

    def error(self, node: yaml.Node, message: str) -> ICLBenchError:
        return ICLBenchError(f"{self.path} line {node.start_mark.line + 1}: {message}")

    def value(self, node: yaml.Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise self._yaml_error(exc) from None
        except RecursionError:
            raise self.error(node, "value nested too deeply") from None

    def pairs(self, node: yaml.Node, where: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """``(key, key node, value node)`` of a mapping; a key written twice is an error (YAML keeps the last)."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{where} must be a mapping of keys, got {self.value(node)!r}")
        seen: dict[str, int] = {}
        out = []
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if not isinstance(key, str):
                raise self.error(key_node, f"keys in {where} must be strings, got {key!r}")
            if key in seen:
                raise self.error(key_node, f"key '{key}' in {where} is written twice (first on line {seen[key]})")
            seen[key] = key_node.start_mark.line + 1
            out.append((key, key_node, value_node))
        return out

    def settings(self, node: yaml.Node, origin: str) -> list[Setting]:
        """A run-config mapping flattened to dotted keys: ``{task: {name: affine, noise: 0.1}}`` →
        ``task=affine, task.noise=0.1``. Dotted keys may also be written as they are."""
        out = []
        for key, key_node, value_node in self.pairs(node, origin):
            if key in SECTIONS and isinstance(value_node, yaml.MappingNode):
                for sub, sub_key_node, sub_value_node in self.pairs(value_node, f"{origin} {key}"):
                    full = key if sub == "name" and key in ("task", "model") else f"{key}.{sub}"
                    out.append(self.setting(full, sub_key_node, sub_value_node, origin))
            else:
                out.append(self.setting(key, key_node, value_node, origin))
        return out

    def setting(self, key: str, key_node: yaml.Node, value_node: yaml.Node, origin: str) -> Setting:
        section, dot, rest = key.partition(".")
        if section not in TOP_LEVEL:
            raise self.error(key_node, f"unknown key '{key}' in {origin}" + did_you_mean(section, TOP_LEVEL))
        if dot and (section not in SECTIONS or not rest or "." in rest):
            raise self.error(key_node, f"malformed key '{key}' in {origin}; use section.field with a section "
                                       f"among {', '.join(SECTIONS)}, e.g. model.n_layers")
        if not dot and section in ("train", "eval"):
            raise self.error(key_node, f"'{key}' in {origin} must be a mapping or a dotted key like "
                                       f"{key}.FIELD")
        if key == "out" and origin != "base":
            raise self.error(key_node, "'out' may be set only in base (or with --out): one sweep, one "
                                       "results directory")
        value = self.value(value_node)
        if key in ("task", "model") and not isinstance(value, str):
            raise self.error(value_node, f"{origin} {key}: expected a {key} name, got {value!r}; set its "
                                         f"options with dotted keys like {key}.FIELD")
        return Setting(key, value, value_node.start_mark.line + 1, origin)


def _blame(settings: list[Setting], message: str) -> Setting | None:
    """The setting an error message from :func:`resolve` is about (the one last written for its key)."""
    effective = list({s.key: s for s in settings}.values())
    for s in reversed(effective):
        section, _, name = s.key.partition(".")
        if (f"'{s.key}'" in message or message.startswith((f"{s.key}:", f"{s.key} "))
                or (name and message.startswith(f"{section}:") and re.search(rf"\b{re.escape(name)}\b", message))
                or (not name and f"{s.key} '{s.value}'" in message)):
            return s
    return None


def _resolve(registry: Registry, settings: list[Setting], out: str | None) -> RunConfig:
    named = {s.key: s.value for s in settings}  # later settings win
    if out is not None:  # --out overrides base.out
        named.pop("out", None)
    task, model = named.pop("task", None), named.pop("model", None)
    return resolve(registry, task=task, model=model, out=out, overrides=list(named.items()))


#: the most runs an experiment may expand to unless told otherwise (``--max-runs``); counted before expanding
MAX_RUNS = 100000


def load_experiment(path: str | Path, registry: Registry | None = None, out: str | None = None,
                    max_runs: int = MAX_RUNS, collect_errors: bool = False) -> Experiment:
    """Parse and validate an experiment file; every run's config is resolved here, before anything runs. An
    experiment of more than ``max_runs`` runs (the variants times the grid, counted before expanding it) is
    refused in one line. A run whose config is invalid raises, or with ``collect_errors`` is left out and
    its error line kept in :attr:`Experiment.invalid` (``--dry-run`` lists them all)."""
    registry = registry or get_registry()
    path = Path(path)
    reader = _Reader(path)
    if reader.root is None:
        raise ICLBenchError(f"{path}: empty experiment file; it needs a grid or a runs list")
    top = {}
    for key, key_node, value_node in reader.pairs(reader.root, "the experiment file"):
        if key not in EXPERIMENT_KEYS:
            raise reader.error(key_node, f"unknown key '{key}' in the experiment file"
                               + did_you_mean(key, EXPERIMENT_KEYS))
        top[key] = value_node
    if "grid" not in top and "runs" not in top:
        raise ICLBenchError(f"{path}: has neither 'grid' nor 'runs'; an experiment needs at least one")

    name = reader.value(top["name"]) if "name" in top else path.stem
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise reader.error(top["name"], f"name must be letters, digits, '.', '_' or '-', got {name!r}")
    base = reader.settings(top["base"], "base") if "base" in top else []

    grid: list[list[Setting]] = []
    grid_keys: dict[str, Setting] = {}
    if "grid" in top:
        for key, key_node, value_node in reader.pairs(top["grid"], "grid"):
            if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
                raise reader.error(value_node, f"grid {key}: expected a non-empty list of values, e.g. "
                                               f"{key}: [{reader.value(value_node)!r}]")
            values = [reader.setting(key, key_node, item, "grid") for item in value_node.value]
            grid.append(values)
            grid_keys[key] = values[0]

    variants: list[list[Setting]] = [[]]
    if "runs" in top:
        node = top["runs"]
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise reader.error(node, "runs: expected a non-empty list of mappings, e.g. "
                                     "- {task: affine, model: gpt3l}")
        variants = []
        for i, item in enumerate(node.value):
            entry = reader.settings(item, f"runs[{i}]")
            for s in entry:
                if s.key in grid_keys:
                    raise ICLBenchError(f"{path} line {s.line}: runs[{i}] sets '{s.key}', which the grid "
                                        f"also sets (line {grid_keys[s.key].line}); set it in one place")
            variants.append(entry)

    count = len(variants) * math.prod(len(values) for values in grid)
    if count > max_runs:
        sizes = " × ".join(str(n) for n in ([len(variants)] if len(variants) > 1 else [])
                           + [len(values) for values in grid])
        raise ICLBenchError(f"{path}: the experiment expands to {sizes} = {count:,} runs, more than the limit of "
                            f"{max_runs:,}; shrink the grid, or raise the limit with --max-runs")
    runs: list[PlannedRun] = []
    invalid: list[str] = []
    seen: set[str] = set()
    duplicates = 0
    for entry in variants:
        for point in itertools.product(*grid):
            settings = base + entry + list(point)
            try:
                cfg = _resolve(registry, settings, out)
            except ICLBenchError as exc:
                culprit = _blame(settings, str(exc))
                if culprit is None:
                    which = ", ".join(str(s) for s in settings if s.origin != "base") or "base"
                    error = ICLBenchError(f"{path}: run ({which}): {exc}")
                else:
                    error = ICLBenchError(f"{path} line {culprit.line} ({culprit.origin} {culprit.key}: "
                                          f"{culprit.value!r}): {exc}")
                if not collect_errors:
                    raise error from None
                if str(error) not in invalid:  # a bad base or variant fails every grid point alike
                    invalid.append(str(error))
                continue
            if cfg.run_name in seen:
                duplicates += 1
                continue
            seen.add(cfg.run_name)
            runs.append(PlannedRun(cfg, tuple(settings)))
    return Experiment(path, name, runs, duplicates, invalid)


def check_runs(experiment: Experiment, registry: Registry | None = None, devices: bool = True) -> dict[str, str]:
    """What would fail each planned run before it trains, found without training: its device absent from
    this machine (``devices``; not for a Ray cluster, whose workers have their own), its task that cannot be
    built, sizes that cannot fit in memory. ``{run name: one line naming the run and why}`` (``--dry-run``)."""
    from .build import check_sizes
    from .trainer import resolve_device

    registry = registry or get_registry()
    problems, seen = {}, {}
    for plan in experiment.runs:
        cfg = plan.config
        key = _apart_from(cfg, "seed", "out", "log")  # seeds of one config fail alike: checked once
        if key not in seen:
            try:
                device = resolve_device(cfg.device) if devices else None
                task = registry.task(cfg.task)(cfg.task_options)
                if device is not None:
                    check_sizes(cfg, task, registry.model(cfg.model), device)
                seen[key] = None
            except ICLBenchError as exc:
                seen[key] = " ".join(str(exc).split())
            except Exception as exc:  # a plugin's task that cannot be built with these options
                seen[key] = f"the task cannot be built: {type(exc).__name__}: {' '.join(str(exc).split())}"
        if seen[key] is not None:
            problems[plan.name] = f"{plan.name} ({plan.label or 'base'}): {seen[key]}"
    return problems


def _apart_from(cfg: RunConfig, *keys: str) -> str:
    """``cfg`` without ``keys``, as a comparable string: runs equal on it differ in those keys only."""
    return json.dumps({k: v for k, v in cfg.to_dict().items() if k not in keys}, sort_keys=True, default=str)


def _device_type(cfg: RunConfig, executor: str, gpus_per_run: float) -> str:
    """The kind of device ``cfg``'s run trains on: this machine's (local), or a Ray worker's, which sees a GPU
    only when each run asks for one (``--gpus-per-run``). "cpu" for a device that is not there: the run fails
    on its own."""
    from .trainer import resolve_device

    if executor == "ray":
        return "cpu" if not gpus_per_run else "cuda" if cfg.device == "auto" else cfg.device.partition(":")[0]
    try:
        return resolve_device(cfg.device).type
    except ICLBenchError:
        return "cpu"


def plan_jobs(plans: list[PlannedRun], stack: bool | None = None, executor: str = "local",
              gpus_per_run: float = 0, registry: Registry | None = None) -> tuple[list[list[PlannedRun]], list[str]]:
    """``plans`` as jobs, what one worker computes at once. With ``stack`` (None: ``--stack auto``, as
    :func:`iclbench.seeds.stacks_by_default` decides for the seeds' device), runs that differ only in their
    seed are one job, trained stacked into one model; every other run is a job of its own. Also returns a
    line per reason some seeds of one config are not stacked after all (they run as separate jobs)."""
    from .runner import stackable
    from .seeds import stacks_by_default

    if stack is False:
        return [[plan] for plan in plans], []
    groups: dict[str, list[PlannedRun]] = {}
    for plan in plans:
        groups.setdefault(_apart_from(plan.config, "seed"), []).append(plan)
    jobs, apart = [], []
    for group in groups.values():
        cfg = group[0].config
        together = len(group) > 1 and (stack or stacks_by_default(cfg, _device_type(cfg, executor, gpus_per_run)))
        if together:
            registry = registry or get_registry()
            try:
                task = registry.task(cfg.task)(cfg.task_options)
            except Exception:  # fails in each seed's run alike, stacked or not
                task = None
            if task is not None and not all(stackable(task, plan.config.seed) for plan in group):
                apart.append(group[0])
                together = False
        jobs += [group] if together else [[plan] for plan in group]
    notes = [f"the seeds of {len(apart)} config(s) ({', '.join(_group_name(g) for g in apart[:3])}"
             f"{', ...' if len(apart) > 3 else ''}) run separately, not stacked: each seed trains on "
             "a distribution of its own (a pool of rules, task.pool > 0)"] if apart else []
    return jobs, notes


def _group_name(plan: PlannedRun) -> str:
    return f"{plan.config.task}-{plan.config.model}-{plan.config.config_hash}"


def job_line(job: list[PlannedRun]) -> str:
    """A stacked job in one line (``--dry-run``)."""
    label = ", ".join(str(s) for s in job[0].settings if s.origin != "base" and s.key != "seed")
    return (f"stacked job: {_group_name(job[0])}{f' ({label})' if label else ''}: seeds "
            f"{', '.join(str(plan.config.seed) for plan in job)} trained together")


# --- computing a job (in a worker) --------------------------------------------------------------------------

@dataclass
class Outcome:
    """What a worker sends back. ``files``: the run directory's files when the worker had its own disk."""
    error: str | None = None  # one line; None when the run completed
    detail: str | None = None  # the traceback of an internal error
    files: dict[str, bytes] | None = None  # path relative to the run directory -> content
    wall_s: float = 0.0
    interrupted: str | None = None  # what interrupted it (Ctrl-C, SIGHUP, SIGTERM); its rerun continues it


def compute_job(configs: list[dict], threads: int, ship_files: bool = False) -> list[Outcome]:
    """Compute one job with ``threads`` torch threads: one resolved config, or seeds of one config trained
    stacked, through :func:`iclbench.runner.run_configs` as ``run --seeds --stack yes`` does. Returns an
    :class:`Outcome` per config: each run is recorded, fails or is interrupted on its own.

    ``ship_files=False``: write the run directories under the configs' ``out`` (the driver's disk).
    ``ship_files=True``: write into temporary directories and return their files for the driver to store.
    """
    import torch

    from .runner import run_configs

    torch.set_num_threads(max(1, int(threads)))
    started = time.perf_counter()
    error = interrupted = detail = None
    with contextlib.ExitStack() as temporary:
        tmps = [temporary.enter_context(tempfile.TemporaryDirectory(prefix="iclbench-")) for _ in configs] \
            if ship_files else None
        paths = [Path(t) for t in tmps] if tmps else []
        try:
            with _computing():
                registry = get_registry()
                cfgs = [resolve(registry, config=config) for config in configs]
                paths = paths or [Path(cfg.out) / cfg.run_name for cfg in cfgs]
                run_configs(cfgs, registry, run_dirs=paths, stack=len(cfgs) > 1)
        except KeyboardInterrupt as exc:  # each run is marked interrupted; its rerun continues from its checkpoint
            interrupted = error = interruption(exc)
        except ICLBenchError as exc:
            error = str(exc)
        except Exception as exc:  # recorded, so that one broken run does not stop the sweep
            error = f"internal error: {type(exc).__name__}: {exc}"
            detail = traceback.format_exc()
        wall_s = time.perf_counter() - started
        outcomes = [_outcome(path, error, interrupted, detail, wall_s) for path in paths] if paths else \
            [Outcome(error, detail, interrupted=interrupted, wall_s=wall_s) for _ in configs]
        for outcome, tmp in zip(outcomes, tmps or []):
            outcome.files = {path.relative_to(tmp).as_posix(): path.read_bytes()
                             for path in sorted(Path(tmp).rglob("*"))
                             if path.is_file() and not path.name.startswith(".")}
    return outcomes


def _outcome(run_dir: Path, error: str | None, interrupted: str | None, detail: str | None,
             wall_s: float) -> Outcome:
    """One run's outcome after its job ended with ``error`` (None: every run completed): a run that completed
    before a stacked seed's error did; a diverged seed says so itself (its ``status.json``)."""
    try:
        store.read_run(run_dir)
        return Outcome(wall_s=wall_s)
    except store.DamagedRun:
        pass
    if error is None:
        return Outcome("the job finished but the run directory has no metrics.json", wall_s=wall_s)
    try:
        status = store.read_json(run_dir / store.STATUS)
    except store.DamagedRun:
        status = {}
    if status.get("status") == "diverged" and isinstance(status.get("message"), str):
        error = status["message"]
    return Outcome(error, detail, interrupted=interrupted, wall_s=wall_s)


def write_run_files(run_dir: Path, files: dict[str, bytes]) -> None:
    """Store files returned by a worker (holding the run's lock); ``metrics.json`` last, so the run counts as
    complete only when everything else is in place. A path that would leave the run directory is refused."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with store.run_lock(run_dir):
        store.remove_file(run_dir / store.METRICS)
        for rel in sorted(files, key=lambda r: r == store.METRICS):
            parts = Path(rel).parts
            if Path(rel).is_absolute() or ".." in parts or not parts:
                raise ICLBenchError(f"a worker returned the file {rel!r}, which is outside its run directory")
            store.write_atomic(run_dir / rel, files[rel], root=run_dir)


# --- executors: submit runs, wait for some to finish ------------------------------------------------------

#: whether this (worker) process is computing a run: Ctrl-C, SIGHUP and SIGTERM interrupt the run then, and
#: are ignored between runs, where they would kill the worker and break the pool the driver still waits on
_COMPUTING: list = []


@contextlib.contextmanager
def _computing():
    previous = raise_on_signals(active=lambda: bool(_COMPUTING))  # re-armed for each run
    _COMPUTING.append(True)
    try:
        yield
    finally:
        _COMPUTING.clear()
        restore_signals(previous)


def worker_signals() -> None:
    """In a worker process: a signal interrupts the run it computes (marked ``interrupted``, resumable), not
    the worker between runs."""
    raise_on_signals(active=lambda: bool(_COMPUTING))


def _watch_driver(driver: int) -> None:
    """In a pool worker: exit when the driver process is gone (kill -9 included), so no orphan keeps
    computing, and holding the lock of, a run the next sweep will want. Polls the parent pid each second
    (``PR_SET_PDEATHSIG`` would fire when the spawning *thread* ends, not the driver). Signals interrupt the
    run in progress (:func:`worker_signals`)."""
    worker_signals()

    def watch():
        while True:
            if os.getppid() != driver:
                os._exit(1)
            time.sleep(1.0)

    if os.getppid() != driver:
        os._exit(1)
    threading.Thread(target=watch, name="iclbench-driver-watch", daemon=True).start()


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (which a spawned pool needs) with SIGHUP ignored, as it ignores
    SIGINT and SIGTERM itself: a closed terminal would otherwise kill it, and its relaunch prints tracebacks
    while the runs record their interruption."""
    import signal
    from multiprocessing import resource_tracker

    if not hasattr(signal, "SIGHUP"):
        return
    with contextlib.suppress(ValueError):  # not the main thread: leave it to multiprocessing
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            resource_tracker.ensure_running()
        finally:
            signal.signal(signal.SIGHUP, previous)


def run_threads(plan: PlannedRun, default: int) -> int:
    """The torch threads for ``plan``: those its earlier, interrupted attempt trained with (status.json), so
    a rerun with another ``--jobs`` does not mix thread counts within one run; else ``default``."""
    try:
        threads = store.read_json(plan.run_dir / store.STATUS).get("threads")
    except store.DamagedRun:
        return default
    return threads if isinstance(threads, int) and not isinstance(threads, bool) and 1 <= threads <= 1024 \
        else default


class LocalExecutor:
    """A process pool on this machine; each worker computes one job (a run, or seeds stacked) at a time with
    ``threads`` torch threads."""

    name = "local"
    ships_files = False

    def __init__(self, jobs: int, threads: int):
        self.jobs, self.threads = jobs, threads
        self.pool = self._new_pool()

    def _new_pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        start_resource_tracker()

        # spawn, not fork: forking a process that already runs torch threads can deadlock
        return ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_watch_driver, initargs=(os.getpid(),))

    def submit(self, job: list[PlannedRun]):
        from concurrent.futures.process import BrokenProcessPool

        configs, threads = [plan.config.to_dict() for plan in job], run_threads(job[0], self.threads)
        try:
            return self.pool.submit(compute_job, configs, threads)
        except BrokenProcessPool:  # a worker died earlier (killed, out of memory): start a fresh pool
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
            return self.pool.submit(compute_job, configs, threads)

    def wait(self, handles, timeout: float):
        from concurrent.futures import FIRST_COMPLETED, wait

        return list(wait(handles, timeout=timeout, return_when=FIRST_COMPLETED).done)

    def result(self, handle) -> list[Outcome] | Outcome:
        """An outcome per run of the job, or one for all of them (the worker died)."""
        try:
            return handle.result()
        except Exception as exc:  # the worker process died
            return Outcome(error=f"worker process failed: {type(exc).__name__}: {exc}")

    def interrupt(self, handles, signame: str = "SIGINT"):
        """Tell each worker's run in progress that the sweep is interrupted, by the signal the driver got (so a
        worker names the same cause whether the terminal's signal or this one reaches it first; a worker between
        runs ignores it, and so does one that was told already)."""
        import signal

        sig = getattr(signal, signame, signal.SIGINT)
        for process in list((getattr(self.pool, "_processes", None) or {}).values()):
            with contextlib.suppress(OSError, AttributeError, TypeError):
                if process.is_alive():
                    os.kill(process.pid, sig)

    def terminate(self):
        """Kill the workers (a run that did not answer an interruption in time)."""
        for process in list((getattr(self.pool, "_processes", None) or {}).values()):
            with contextlib.suppress(OSError, AttributeError, ValueError):
                process.kill()

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


#: seconds to wait for a Ray cluster's address to answer before giving up with one line
RAY_CONNECT_TIMEOUT = 15.0


def check_reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT) -> None:
    """Fail with one line when ``HOST:PORT`` (or ``ray://HOST:PORT``) does not accept a TCP connection
    within ``timeout`` s: ``ray.init`` itself would retry for minutes. ``auto`` and ``local`` are left to Ray."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ICLBenchError(f"--address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    if not 1 <= int(port) <= 65535:
        raise ICLBenchError(f"--address {address!r}: invalid port {int(port)}, a port is 1 to 65535")
    if not host.strip("[]"):
        raise ICLBenchError(f"--address {address!r}: no host; expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ICLBenchError(f"cannot connect to the Ray cluster at {address!r}: {reason} (after at most "
                            f"{timeout:g}s)") from None


#: seconds joining a Ray cluster (``--address``) may take as a whole, the reachability check and ``ray.init``
#: together (``--connect-timeout``): something that accepts TCP but does not speak Ray kept ``ray.init``
#: retrying for minutes
RAY_START_TIMEOUT = 60.0


def call_within(seconds: float, call, expired: str):
    """``call()``'s result (or its exception) if it returns within ``seconds``; else ``ICLBenchError(expired)``.
    The call runs in a daemon thread, which is left behind when it does not return: the process is about to
    end with the error."""
    box: dict = {}

    def target():
        try:
            box["result"] = call()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="iclbench-ray-start", daemon=True)
    thread.start()
    thread.join(max(0.0, seconds))
    if thread.is_alive():
        raise ICLBenchError(expired)
    if "error" in box:
        raise box["error"]
    return box.get("result")


@contextlib.contextmanager
def _stderr_held():
    """File descriptor 2 sent to a temporary file while Ray starts: its C++ client prints its retries there
    ("Failed to connect to GCS ... within 5 seconds") whatever the log level. What was held is shown when the
    start succeeds and dropped when it fails (the failure is one line of ours). ``left_behind()``, for a start
    given up on whose thread still runs: where ``sys.stderr`` wrote to fd 2 (the command line), fd 2 stays held
    (that thread's output goes nowhere) and ``sys.stderr`` writes to a copy of the original descriptor; a
    stream of the caller's own is left alone and fd 2 given back."""
    sys.stderr.flush()
    saved = os.dup(2)
    held = tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    state = {"kept": False, "ok": False}

    class Holder:
        def left_behind(self):
            state["kept"] = True

        def succeeded(self):
            state["ok"] = True

    try:
        yield Holder()
    finally:
        if state["kept"]:
            try:
                on_fd2 = sys.stderr.fileno() == 2
            except (AttributeError, OSError, ValueError):  # a stream of Python's own (captured): not fd 2
                on_fd2 = False
            if on_fd2:
                sys.stderr = os.fdopen(saved, "w", buffering=1)
            else:  # the caller's own stream: fd 2 given back as it was (Ray's thread may still print there)
                os.dup2(saved, 2)
                os.close(saved)
                held.close()
        else:
            os.dup2(saved, 2)
            os.close(saved)
            if state["ok"]:
                held.seek(0)
                text = held.read().decode(errors="replace")
                if text:
                    sys.stderr.write(text)
            held.close()


class RayExecutor:
    """Each job (a run, or seeds stacked) a Ray task asking for ``cpus``/``gpus``; the worker returns the runs'
    files."""

    name = "ray"
    ships_files = True

    def __init__(self, address: str | None, cpus: float, gpus: float, timeout: float = RAY_START_TIMEOUT):
        # nor are the retries of Ray's C++ client ("Failed to connect to GCS ... within 5 seconds"), read when
        # Ray is imported; its errors still show
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
        try:
            import ray
        except ImportError:
            raise ICLBenchError("the ray executor needs Ray: pip install 'iclbench[ray]'") from None
        self.ray = ray
        self.started_here = False
        if not ray.is_initialized():
            kwargs = {"address": address} if address else {"include_dashboard": False}

            def init():
                return ray.init(logging_level="warning", **kwargs)

            # the start runs in a thread of its own (to be given up on): Ray's warning that it therefore sets no
            # SIGTERM handler is not for the user
            logging.getLogger("ray._private.worker").addFilter(
                lambda record: "SIGTERM handler is not set" not in record.getMessage())

            try:
                if address:  # the whole start within ``timeout``: reaching the address, then Ray's handshake
                    deadline = time.monotonic() + timeout
                    check_reachable(address, min(RAY_CONNECT_TIMEOUT, timeout))
                    with _stderr_held() as held:
                        try:
                            call_within(deadline - time.monotonic(), init,
                                        f"cannot connect to the Ray cluster at {address!r}: no answer from Ray "
                                        f"within {timeout:g}s (the address accepts connections but does not "
                                        "speak Ray?); --connect-timeout SECONDS waits longer")
                        except ICLBenchError:
                            held.left_behind()
                            raise
                        held.succeeded()
                else:
                    init()
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ICLBenchError(f"cannot connect to the Ray cluster at {address!r}: "
                                    f"{' '.join(str(exc).split())[:300]}") from None
            self.started_here = True
        self.cpus, self.gpus = cpus, gpus
        self.task = ray.remote(num_cpus=cpus, num_gpus=gpus)(compute_job)

    def capacity(self) -> int:
        """How many jobs the cluster can hold at once with the resources each asks for."""
        resources = self.ray.cluster_resources()
        n = int(resources.get("CPU", 1) // self.cpus) if self.cpus else 1 << 30
        if self.gpus:
            n = min(n, int(resources.get("GPU", 0) // self.gpus))
            if n == 0:
                raise ICLBenchError(f"--gpus-per-run {self.gpus} but the Ray cluster has no GPUs")
        return max(1, n)

    def submit(self, job: list[PlannedRun]):
        return self.task.remote([plan.config.to_dict() for plan in job], max(1, round(self.cpus)), True)

    def wait(self, handles, timeout: float):
        ready, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        return ready

    def result(self, handle) -> list[Outcome] | Outcome:
        """An outcome per run of the job, or one for all of them (cancelled, or the worker died)."""
        try:
            return self.ray.get(handle)
        except getattr(self.ray.exceptions, "TaskCancelledError", ()):  # by interrupt(): the sweep was stopped
            return Outcome(error="cancelled", interrupted="cancelled (the sweep was interrupted)")
        except self.ray.exceptions.RayError as exc:  # the worker died or the task could not run
            return Outcome(error=f"Ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")

    def interrupt(self, handles, signame: str = "SIGINT"):
        """Cancel the runs in flight (Ray raises KeyboardInterrupt in each task's worker)."""
        for handle in handles:
            with contextlib.suppress(Exception):
                self.ray.cancel(handle)

    def terminate(self):
        pass  # the tasks were cancelled (interrupt); Ray stops its workers with the cluster

    def close(self):
        if self.started_here:
            self.ray.shutdown()


# --- the sweep ---------------------------------------------------------------------------------------------

@dataclass
class SweepReport:
    experiment: Experiment
    executor: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    not_run: list[str] = field(default_factory=list)  # left when the sweep was interrupted
    #: in flight when the sweep was interrupted: name -> the step its rerun continues from
    interrupted: dict[str, int | None] = field(default_factory=dict)
    #: what interrupted the sweep (Ctrl-C, SIGHUP, SIGTERM), None when it was not
    signal: str | None = None
    unstable: dict[str, str] = field(default_factory=dict)  # ran, but unstable (off the leaderboard): why
    wall_s: float = 0.0

    @property
    def record_path(self) -> Path:
        return self.experiment.out / RECORDS / f"{self.experiment.name}.json"

    def summary(self) -> str:
        exp = self.experiment
        lines = [f"sweep {exp.name} ({exp.path}) on {self.executor}: {len(exp.runs)} runs: {len(self.ran)} ran, "
                 f"{len(self.skipped)} skipped (already complete), {len(self.failed)} failed"
                 + (f", {len(self.interrupted)} interrupted" if self.interrupted else "")
                 + (f", {len(self.not_run)} not run" if self.not_run else "")
                 + (f", {len(self.unstable)} unstable (left off the leaderboard)" if self.unstable else "")
                 + (f" (stopped by {self.signal})" if self.signal else "")
                 + f" in {self.wall_s:.1f}s"]
        for name, error in self.failed.items():
            lines.append(f"  failed {name}: {error}")
        for name, why in self.unstable.items():
            lines.append(f"  unstable {name}: {why}")
        for name, step in self.interrupted.items():
            lines.append(f"  interrupted {name}: " + (f"the rerun continues from its checkpoint at step {step}"
                                                      if step else "no checkpoint yet: the rerun starts it afresh"))
        if self.signal:
            lines.append(f"rerun the same command to continue: iclbench sweep {exp.path}")
        lines.append(f"record: {self.record_path}; table: iclbench leaderboard --results {exp.out}")
        return "\n".join(lines)


#: seconds an interrupted sweep waits for its in-flight runs to record that they were interrupted
INTERRUPT_GRACE = 30.0


class Progress:
    """What a sweep shows while it runs. On a terminal: one bar, runs done of those to run, how many are
    running and failed, the elapsed time and an ETA (tqdm). Elsewhere (a log file, a pipe): one line per
    finished run and nothing else, so a log holds no progress-bar redraws. ``enabled=False`` (``--quiet``):
    nothing but failures."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.done, self.failed, self.running = total, 0, 0, 0
        self.enabled = enabled
        self.tty = enabled and isatty(self.stream)
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="sweep", unit="run", file=self.stream, mininterval=0.5,
                            **bar_size(self.stream),  # a terminal that reports no size (0 × 0) would hide it
                            bar_format="{desc}: {n}/{total} runs done{postfix} [{elapsed} elapsed, ETA {remaining}]")
            self._postfix()

    def _postfix(self, refresh: bool = True):
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.running} running, {self.failed} failed", refresh=refresh)

    def update(self, running: int):
        """The runs in flight now (refreshes the elapsed time and ETA)."""
        self.running = running
        self._postfix()

    def finished(self, plan: "PlannedRun", error: str | None, wall_s: float, running: int):
        self.done += 1
        self.failed += error is not None
        self.running = running
        line = (f"failed {plan.name} ({plan.label}): {error}" if error is not None else
                f"[{self.done}/{self.total}] ran {plan.name} ({plan.label}) in {wall_s:.1f}s")
        if self.bar is not None:
            if error is not None:
                self.bar.write(line, file=self.stream)
            self.bar.update(1)
            self._postfix()
        elif self.enabled or error is not None:
            print(line, file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_sweep(experiment: Experiment, executor: str = "local", *, jobs: int | None = None,
              cpus_per_run: float | None = None, gpus_per_run: float = 0, address: str | None = None,
              progress: bool = True, connect_timeout: float = RAY_START_TIMEOUT,
              stack: bool | None = None) -> SweepReport:
    """Run every incomplete run of ``experiment``; complete ones are skipped, failures recorded.

    ``stack``: the incomplete seeds of one config are one job, trained stacked into one model, each still a
    run of its own (:func:`plan_jobs`; None: where their device is a GPU or MPS, as ``run --seeds``).
    ``progress``: a progress display (:class:`Progress`: a bar on a terminal, a line per run otherwise).
    Ctrl-C, SIGHUP (the terminal closed) and SIGTERM stop the sweep: each run in flight is told, marks itself
    ``interrupted`` in its ``status.json`` (with the step its rerun continues from) and the sweep record says
    so; rerunning the sweep continues each from its latest checkpoint."""
    if executor not in EXECUTORS:
        raise ICLBenchError(f"unknown executor {executor!r} (allowed: {', '.join(EXECUTORS)})")
    if jobs is not None and jobs < 1:
        raise ICLBenchError(f"--jobs must be >= 1, got {jobs}")
    if (cpus_per_run is not None and cpus_per_run <= 0) or gpus_per_run < 0:
        raise ICLBenchError("--cpus-per-run must be > 0 and --gpus-per-run >= 0")
    if not 0 < connect_timeout <= 86400:
        raise ICLBenchError(f"--connect-timeout must be > 0 and at most 86400 seconds, got {connect_timeout}")
    if executor == "local" and (address or gpus_per_run):
        raise ICLBenchError("--address and --gpus-per-run are for --executor ray; locally each run takes the "
                            "device its config names (device: auto picks cuda when present)")
    started = time.perf_counter()
    report = SweepReport(experiment, executor)
    todo = deque()
    records = {}  # the sweep record, rewritten after every finished run
    for plan in experiment.runs:
        if plan.is_complete():
            report.skipped.append(plan.name)
            records[plan.name] = {"state": "skipped", "label": plan.label}
        else:
            todo.append(plan)
            records[plan.name] = {"state": "pending", "label": plan.label}

    def save_record():
        """Write this sweep's runs into the record, keeping the entries of other runs in it: two sweeps of one
        name (two files, or one file twice at once) each keep their runs' states. The top-level keys are the
        last writer's."""
        path = report.record_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with store.run_lock(path.parent, wait=True):
            try:
                runs = store.read_json(path).get("runs")
            except store.DamagedRun:  # none yet, or unreadable: this sweep's runs only
                runs = None
            store.write_json(path, {"experiment": str(experiment.path), "executor": executor,
                                    "updated": time.time(),
                                    "runs": (runs if isinstance(runs, dict) else {}) | records}
                             | ({"interrupted_by": report.signal} if report.signal else {}))

    save_record()
    if not todo:
        report.wall_s = time.perf_counter() - started
        return report

    n_runs = len(todo)
    todo, notes = plan_jobs(list(todo), stack, executor, gpus_per_run)
    todo = deque(todo)
    stacked = [job for job in todo if len(job) > 1]
    for note in notes:
        print(f"iclbench: {note}", file=sys.stderr)
    pool, slots, where = _start_executor(executor, len(todo), jobs, cpus_per_run, gpus_per_run, address,
                                         connect_timeout)
    print(f"{len(experiment.runs)} runs: {len(report.skipped)} already complete, {n_runs} to run"
          + (f", {sum(map(len, stacked))} of them as {len(stacked)} stacked job(s)" if stacked else "")
          + f" ({where})", file=sys.stderr, flush=True)
    shown = Progress(n_runs, progress)
    in_flight: dict[Any, list[PlannedRun]] = {}

    def running() -> int:
        return sum(map(len, in_flight.values()))

    def finish(handle):
        job = in_flight.pop(handle)
        outcomes = pool.result(handle)
        if isinstance(outcomes, Outcome):  # cancelled, or the worker died: every run of the job alike
            outcomes = [dataclasses.replace(outcomes) for _ in job]
        for plan, outcome in zip(job, outcomes):
            if outcome.interrupted and not plan.is_complete():  # (a signal just after it completed: it ran)
                _interrupted(plan, outcome, report, records[plan.name])
            else:
                outcome.error = None if outcome.interrupted else outcome.error
                _record(plan, outcome, pool.ships_files, report, records[plan.name])
                shown.finished(plan, report.failed.get(plan.name), outcome.wall_s, running())
        save_record()

    previous = raise_on_signals()  # SIGHUP and SIGTERM stop the sweep as Ctrl-C does, not silently
    try:
        try:
            while todo or in_flight:
                while todo and len(in_flight) < slots:
                    job = todo.popleft()
                    in_flight[pool.submit(job)] = job
                    for plan in job:
                        records[plan.name]["state"] = "running"
                shown.update(running())
                for handle in pool.wait(list(in_flight), timeout=1.0):
                    finish(handle)
        except KeyboardInterrupt as exc:
            report.signal = interruption(exc)
            report.not_run = [plan.name for job in todo for plan in job]
            for name in report.not_run:
                records[name]["state"] = "not run (interrupted)"
            # each run in flight records itself interrupted (a terminal's signal may have reached it already)
            pool.interrupt(list(in_flight), getattr(exc, "signame", "SIGINT"))
            deadline = time.monotonic() + INTERRUPT_GRACE
            while in_flight and time.monotonic() < deadline:
                for handle in pool.wait(list(in_flight), timeout=max(0.1, deadline - time.monotonic())):
                    finish(handle)
            if in_flight:  # no answer within the grace period: stopped, so that closing the pool cannot hang
                pool.terminate()
            for plan in (plan for job in in_flight.values() for plan in job):
                report.interrupted[plan.name] = None
                records[plan.name].update(state="interrupted", resumes_from_step=None)
            in_flight.clear()
    finally:
        shown.close()
        pool.close()
        save_record()
        restore_signals(previous)
        report.wall_s = time.perf_counter() - started
    return report


def _interrupted(plan: PlannedRun, outcome: Outcome, report: SweepReport, record: dict) -> None:
    """A run stopped by a signal: it marked itself ``interrupted`` (status.json says from which step its rerun
    continues), which the record repeats."""
    try:
        step = store.read_json(plan.run_dir / store.STATUS).get("resumes_from_step")
    except store.DamagedRun:
        step = None
    report.interrupted[plan.name] = step if isinstance(step, int) else None
    report.signal = report.signal or outcome.interrupted
    record.update(state="interrupted", resumes_from_step=report.interrupted[plan.name],
                  wall_s=round(outcome.wall_s, 3))


def default_threads(cores: int, jobs: int | None) -> int:
    """Torch threads per local run without ``--cpus-per-run``: what the environment says (OMP_NUM_THREADS,
    as torch itself reads it), else the cores shared among ``jobs``, else 1."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return max(1, cores // jobs) if jobs else 1


def _start_executor(kind: str, n_jobs: int, jobs: int | None, cpus_per_run: float | None, gpus_per_run: float,
                    address: str | None, connect_timeout: float = RAY_START_TIMEOUT):
    """The executor, how many jobs (runs, or seeds stacked) to keep in flight, and a line saying so."""
    if kind == "local":
        cores = available_cores()
        threads = max(1, int(cpus_per_run or default_threads(cores, jobs)))
        pool = LocalExecutor(min(n_jobs, jobs or max(1, cores // threads)), threads)
        return pool, pool.jobs, (f"local: {pool.jobs} process{'es' if pool.jobs > 1 else ''} × {threads} torch "
                                 f"thread{'s' if threads > 1 else ''}")
    pool = RayExecutor(address, cpus_per_run or 1, gpus_per_run, timeout=connect_timeout)
    slots = jobs or pool.capacity()
    return pool, slots, f"ray: up to {slots} runs at once, {pool.cpus} CPU / {pool.gpus} GPU each"


def _record(plan: PlannedRun, outcome: Outcome, shipped: bool, report: SweepReport, record: dict) -> None:
    """The driver's side of a finished run: store shipped files, mark failures in the run directory."""
    run_dir = plan.run_dir
    if shipped and outcome.files:
        try:
            write_run_files(run_dir, outcome.files)
        except (store.RunBusy, ICLBenchError) as exc:
            outcome = Outcome(error=f"cannot store the returned files: {exc}", wall_s=outcome.wall_s)
    record["wall_s"] = round(outcome.wall_s, 3)
    if outcome.error is None and plan.is_complete():
        report.ran.append(plan.name)
        record.update(state="ran", error=None)
        try:
            metrics = store.read_run(run_dir)
            unstable = store.unstable_reason(metrics)
        except store.DamagedRun:
            unstable = None
        if unstable:
            report.unstable[plan.name] = unstable
            record.update(state="unstable", error=unstable)
        return
    error = " ".join((outcome.error or "the worker finished but the run directory has no metrics.json").split())
    report.failed[plan.name] = error
    record.update(state="failed", error=error, detail=outcome.detail)
    try:  # only while no other process computes the run: never mark a live run failed over its status
        run_dir.mkdir(parents=True, exist_ok=True)
        with store.run_lock(run_dir):
            status = {"status": "failed", "message": error}
            threads = run_threads(plan, 0)
            if threads:  # the thread count its checkpoint was trained with, for the next attempt
                status["threads"] = threads
            store.write_json(run_dir / store.STATUS, status)
    except (store.RunBusy, OSError, ICLBenchError):
        pass


def plan_table(experiment: Experiment, invalid=(), jobs=()) -> str:
    """What a sweep would do, one line per run (``--dry-run``); the runs named in ``invalid`` marked so;
    then one line per stacked job of ``jobs`` (:func:`plan_jobs`)."""
    from tabulate import tabulate

    rows = [[p.name, "invalid" if p.name in invalid else "complete (skip)" if p.is_complete() else "to run",
             p.label] for p in experiment.runs]
    table = tabulate(rows, headers=["run", "state", "settings"], tablefmt="plain")
    dup = f" ({experiment.duplicates} duplicate grid points merged)" if experiment.duplicates else ""
    bad = len(invalid) + len(experiment.invalid)
    bad = f", {bad} invalid (on stderr)" if bad else ""
    stacked = [job_line(job) for job in jobs if len(job) > 1]
    return "\n".join([table, *stacked, f"{len(experiment.runs)} runs{dup}{bad}, results in {experiment.out}"])
