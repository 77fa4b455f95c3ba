"""Running probes on a trained model and storing what they find with the run.

A run directory gains ``probes.json`` (per probe: its summary, time, table file) and ``probes/<name>.csv``
(its tidy table); both written atomically. Probes draw fresh sequences from a generator seeded with
``eval.seed + 1`` (not the evaluation set, so a probe never fits on the data the leaderboard scores), the
same for every probe, so one probe's numbers do not depend on which others ran.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import torch

from . import store
from .errors import ICLBenchError, warn
from .evaluate import is_evidence
from .labels import run_labels
from .registry import Registry, get_registry
from .rundir import EXPORT_MANIFEST, NOT_RUNS, PROBES_DIR, PROBES_JSON, RunDir, distinct_runs, find_runs
from .trainer import resolve_device


def run_probes(model, task, names=None, *, seed: int, device, registry: Registry | None = None) -> dict:
    """Run the probes ``names`` (default: every registered probe that applies) on ``model``.

    Returns ``{name: {"summary", "time_s", "table"}}``, ``{name: {"skipped": reason}}`` or, for a probe of
    the default set that fails, ``{name: {"error": message}}`` with a warning (a broken plugin must not cost a
    trained run). A probe named explicitly that does not apply or fails is an error."""
    registry = registry or get_registry()
    if getattr(task, "registry", None) is None:  # the probes' baselines come from the registry given
        task.registry = registry
    chosen = list(registry.probes) if names is None else list(names)
    model.eval()
    out = {}
    for name in chosen:
        probe = registry.probe(name)()
        why = probe.why_not(task, model)
        if why is not None:
            reason = f"does not apply to model '{model.name}' on task '{task.name}': {why}"
            if names is not None:
                raise ICLBenchError(f"probe '{name}' {reason}")
            out[name] = {"skipped": reason}
            continue
        generator = torch.Generator("cpu").manual_seed(seed)
        started = time.perf_counter()
        try:
            with torch.no_grad():
                result = probe.run(model, task, generator, device)
        except Exception as exc:
            if names is not None:
                raise
            message = f"{type(exc).__name__}: {exc}"
            warn(f"probe '{name}' failed: {message}")
            out[name] = {"error": message}
            continue
        out[name] = {"summary": result.summary, "time_s": round(time.perf_counter() - started, 3),
                     "table": result.table}
    return out


def probe_run_dir(run_dir, names=None, device: str = "cpu", registry: Registry | None = None,
                  seed: int | None = None, out=None) -> dict:
    """``iclbench probe``: load a finished run or an exported reference model (:mod:`iclbench.export`), run
    the probes, store them in the run directory, or in ``out`` where given. An exported model is never
    written to: without ``out`` its results are only returned. ``seed`` draws another probe sample (default
    ``eval.seed + 1``, the one the run itself used); it is recorded with each probe's result."""
    from .export import is_export, load_export

    path = Path(run_dir)
    exported = is_export(path)
    if not exported and not (path / store.CHECKPOINT).exists():
        raise ICLBenchError(f"{str(path)!r} is not a finished run directory (no {store.CHECKPOINT}) nor an "
                            f"exported model (no {EXPORT_MANIFEST})")
    if out is not None:
        check_probe_out(Path(out))
    if seed is not None and not 0 <= seed < 2 ** 63:
        raise ICLBenchError(f"--seed must be in [0, 2**63), got {seed}")
    registry = registry or get_registry()
    if exported:
        _, cfg, task, model = load_export(path, registry, device)
    else:
        cfg, task, model = RunDir(path).load(registry, resolve_device(device))
    seed = cfg.eval.seed + 1 if seed is None else seed
    outcomes = run_probes(model, task, names, seed=seed, device=next(model.parameters()).device,
                          registry=registry)
    for outcome in outcomes.values():
        outcome["seed"] = seed
    target = Path(out) if out is not None else None if exported else path
    if target is not None:
        RunDir(target).save_probes(outcomes)
    return outcomes


def check_probe_out(out: Path) -> None:
    """``--out`` of ``iclbench probe``: not an exported model nor a folder in one, nor a folder marked as
    holding copies of runs (``results/reference/models``, ``records``): committed folders are not probed into."""
    from .export import is_export

    resolved = out.resolve()
    for folder in (resolved, *resolved.parents):
        if is_export(folder):
            raise ICLBenchError(f"--out {str(out)!r} lies in the exported model {folder}, which is never written "
                                "to; choose another folder")
    if (resolved / NOT_RUNS).exists():
        raise ICLBenchError(f"--out {str(out)!r} is a folder of exported models or copies of runs ({NOT_RUNS}), "
                            "which is not written to; choose another folder")


def describe(outcomes: dict, registry: Registry | None = None, tables: str | None = PROBES_DIR) -> str:
    """A few lines for the terminal: time per probe (and its table file under the folder ``tables``; None:
    not stored), then what each probe says of its summary (:meth:`iclbench.Probe.terminal_lines`)."""
    registry = registry or get_registry()
    lines = []
    for name, o in outcomes.items():
        if "time_s" in o:
            lines.append(f"{name:16s} {o['time_s']:6.2f}s" + (f"  -> {tables}/{name}.csv" if tables else ""))
        else:
            lines.append(f"{name:16s} {'skipped' if 'skipped' in o else 'failed'}: {o.get('skipped', o.get('error'))}")
    for name, o in outcomes.items():
        if o.get("summary") and name in registry.probes:
            lines += registry.probe(name).terminal_lines(o["summary"])
    return "\n".join(lines)


# --- across runs ---------------------------------------------------------------------------------------

def collect_probe(results, probe: str, warn=lambda m: print(m, file=sys.stderr),
                  registry: Registry | None = None) -> pd.DataFrame:
    """One row per run under ``results`` that stored ``probe``: run, task, model (labelled by the options
    that differ from the defaults), seed, summary, and whether the run learned its task (``learned``: the
    Bayes-excess label of :func:`iclbench.evaluate.learned_label`; ``excess_bayes``: its mean; None where the
    task has no Bayes baseline; ``evidence``: whether the run counts as evidence for the claims,
    :func:`iclbench.evaluate.is_evidence`) and ``error``: the run's headline error, the leaderboard's number."""
    registry = registry or get_registry()
    rows = []
    for run_dir in distinct_runs(find_runs(Path(results)), lambda msg: warn(f"iclbench: warning: {msg}")):
        if not (run_dir / PROBES_JSON).exists():
            continue
        try:
            entry = RunDir(run_dir).probes().get(probe)
            if not entry or "summary" not in entry:
                continue
            if not isinstance(entry["summary"], dict):
                raise TypeError(f"{PROBES_JSON}: the summary of '{probe}' is not a mapping")
            metrics = RunDir(run_dir).metrics()
            task, model = run_labels(metrics["config"], registry)
            excess = ((metrics.get("curves") or {}).get("predictors", {}).get("model") or {}).get("excess_bayes") or {}
            error = ((metrics.get("summary") or {}).get("model") or {}).get("mean")
            rows.append({"run": str(run_dir), "seed": metrics["seed"], "summary": entry["summary"],
                         "learned": excess.get("learned"), "excess_bayes": excess.get("mean"),
                         "evidence": is_evidence(excess), "error": error, "task": task, "model": model})
        except (store.DamagedRun, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            warn(f"iclbench: warning: skipping run directory {run_dir}: {exc}")
    return pd.DataFrame(rows, columns=["run", "task", "model", "seed", "summary", "learned", "excess_bayes",
                                       "evidence", "error"])


def cross_run(results, probe: str, fmt: str = "github", registry: Registry | None = None,
              columns=None) -> str:
    """A probe's cross-run table over every run under ``results`` (a probe's own command prints it), as
    text in ``fmt`` (a tabulate format, "markdown", csv or json; LaTeX as the leaderboard writes it);
    ``columns``: only these of the table's columns (those it has), in this order."""
    from .leaderboard import tabulate_table

    registry = registry or get_registry()
    cls = registry.probe(probe)
    runs = collect_probe(results, probe, registry=registry)
    if runs.empty:
        return f"no runs with '{probe}' probe results under {results} (run `iclbench probe RUN_DIR`)"
    table = cls.cross_run_table(runs)
    if table is None:
        raise ICLBenchError(f"probe '{probe}' has no cross-run table")
    if columns:
        table = table[[c for c in columns if c in table.columns]]
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return table.to_json(orient="records", indent=2)
    return tabulate_table(table, fmt, headers="keys", showindex=False, disable_numparse=True)
