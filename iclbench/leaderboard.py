"""Leaderboard: every complete run under a results directory, one row per model, one column per task.

Cells are the mean over seeds of the summary metric (normalized error averaged over positions >= the
task's ``score_from``), with the number of seeds. Runs of one name under different configurations are kept
apart: a model row is (model name, hash of model+train config), a task column is (task name, hash of
task+eval config); a hash is shown only where a name occurs with more than one configuration. Baselines
are rows of their own ("baseline: least_squares").
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from .store import METRICS, DamagedRun, read_run

FORMATS = ("github", "plain", "csv", "json", "latex")


def find_runs(results: Path) -> list[Path]:
    """Run directories under ``results``: any directory holding config.yaml, metrics.json or status.json."""
    results = Path(results)
    if not results.is_dir():
        return []
    dirs = {p.parent for pattern in ("config.yaml", METRICS, "status.json") for p in results.rglob(pattern)}
    return sorted(d for d in dirs if not any(part.startswith(".") for part in d.relative_to(results).parts))


def collect(results: Path, warn=lambda msg: print(msg, file=sys.stderr)) -> pd.DataFrame:
    """Tidy table: one row per (run, predictor) with the summary mean and its CI."""
    rows = []
    for run_dir in find_runs(results):
        try:
            m = read_run(run_dir)
            groups = m.get("groups", {"task": m["config_hash"], "model": m["config_hash"]})
            for name, s in m["summary"].items():
                is_model = name == "model"
                rows.append({
                    "run": str(run_dir),
                    "kind": "model" if is_model else "baseline",
                    "name": m["model"] if is_model else name,
                    "config": groups["model"] if is_model else "",
                    "task": m["task"],
                    "task_config": groups["task"],
                    "seed": m["seed"],
                    "error": float(s["mean"]),
                })
        except (DamagedRun, KeyError, TypeError, ValueError) as exc:
            warn(f"iclbench: warning: skipping damaged run directory {run_dir}: {exc}")
    return pd.DataFrame(rows, columns=["run", "kind", "name", "config", "task", "task_config", "seed",
                                       "error"])


def _labels(df: pd.DataFrame, name_col: str, cfg_col: str) -> pd.Series:
    """'name', or 'name@hash' where one name has several configurations."""
    n_cfg = df.groupby(name_col)[cfg_col].transform("nunique")
    return df[name_col].where(n_cfg <= 1, df[name_col] + "@" + df[cfg_col])


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (row label, task label): mean and sd over seeds, seed count.

    Baselines do not depend on the model or seed, only on the task config and evaluation set; a baseline's
    value is averaged over the runs that evaluated it, and counted by distinct seeds as well.
    """
    if runs.empty:
        return pd.DataFrame(columns=["kind", "row", "task", "mean", "sd", "n_seeds"])
    df = runs.copy()
    df["task_label"] = _labels(df, "task", "task_config")
    models = df[df.kind == "model"].copy()
    models["row"] = _labels(models, "name", "config")
    base = df[df.kind == "baseline"].copy()
    base["row"] = "baseline: " + base["name"]
    df = pd.concat([models, base])
    # one value per (row, task, seed) first, so that a baseline evaluated by several models counts once
    per_seed = df.groupby(["kind", "row", "task_label", "seed"], as_index=False)["error"].mean()
    out = per_seed.groupby(["kind", "row", "task_label"], as_index=False).agg(
        mean=("error", "mean"), sd=("error", "std"), n_seeds=("seed", "nunique"))
    out = out.rename(columns={"task_label": "task"})
    out["kind"] = pd.Categorical(out["kind"], ["model", "baseline"], ordered=True)
    return out.sort_values(["kind", "row", "task"]).reset_index(drop=True)


def wide(agg: pd.DataFrame) -> pd.DataFrame:
    """Rows: models then baselines; columns: tasks; cells 'mean (n)' or 'mean ± sd (n)'."""
    def cell(r):
        sd = "" if pd.isna(r["sd"]) else f" ± {r['sd']:.4f}"
        return f"{r['mean']:.4f}{sd} (n={r['n_seeds']})"

    if agg.empty:
        return pd.DataFrame()
    cells = agg.assign(cell=agg.apply(cell, axis=1))
    table = cells.pivot(index="row", columns="task", values="cell")
    order = list(dict.fromkeys(agg["row"]))
    return table.reindex(order).fillna("—")


def render(results: Path, fmt: str = "github", warn=lambda msg: print(msg, file=sys.stderr)) -> str:
    from tabulate import tabulate

    agg = aggregate(collect(results, warn))
    if fmt == "csv":
        return agg.to_csv(index=False)
    if fmt == "json":
        return agg.to_json(orient="records", indent=2)
    if agg.empty:
        return f"no complete runs under {results}"
    table = wide(agg)
    title = ("normalized squared error, mean over positions t >= score_from (1.0 = prior mean; lower is "
             "better); mean ± sd over seeds (n = seeds)")
    body = tabulate(table, headers=["model"] + list(table.columns), tablefmt=fmt, disable_numparse=True)
    return body if fmt == "latex" else f"{title}\n\n{body}"
