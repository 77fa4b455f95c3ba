"""Leaderboard: every complete run under a results directory, one row per model, one column per task.

Cells are the mean over seeds of the summary metric (normalized error averaged over positions >= the
task's ``score_from``), with the number of seeds. Runs of one name under different configurations are kept
apart: a model row is (model name, hash of model+train config), a task column is (task name, hash of
task+eval config); a hash is shown only where a name occurs with more than one configuration. Baselines
are rows of their own ("baseline: least_squares").
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from .contracts import is_oracle  # by name here: runs record the others in metrics["oracles"]
from .errors import ICLBenchError
from .rundir import RunDir, find_runs
from .store import DamagedRun, unstable_reason

FORMATS = ("github", "plain", "csv", "json", "latex")


METRIC_HELP = {
    "error": "normalized squared error averaged over positions t >= score_from (1.0 = prior mean; lower is "
             "better)",
    "excess": "error minus the best non-oracle baseline's error in the same run (lower is better; < 0 beats "
              "every baseline)",
    "icl_score": "(zero - error) / (zero - best baseline): 0 = the all-zeros predictor, 1 = the best non-oracle "
                 "baseline (higher is better)",
    "excess_bayes": "error minus the Bayes-optimal (posterior-mean) baseline's error in the same run, paired "
                    "(0 = the limit of in-context learning; lower is better)",
}
#: shown beside each model cell: whether the run learned its task (see iclbench.evaluate.learned_label)
LEARNED_HELP = ("[learned / partly / not learned / inconclusive]: the 95% CI of (error - Bayes) / (zero - Bayes) "
                "below 0.1 / within [0.1, 0.5] / above 0.5 / across a cut")


class PastContext(ValueError):
    """``--from K`` beyond the last position a (healthy) run scored."""


def _mean_from(predictor: dict, positions: list[int], start: int | None) -> float:
    if start is None:
        return float(predictor["mean"])
    values = [v for p, v in zip(positions, predictor["curve"]) if p >= start]
    if not values:
        raise PastContext(f"its last scored position is {max(positions, default=-1)}, before --from {start}")
    return sum(values) / len(values)


def collect(results: Path, warn=lambda msg: print(msg, file=sys.stderr), metric: str = "error",
            score_from: int | None = None, include_unstable: bool = False) -> pd.DataFrame:
    """Tidy table: one row per (run, predictor) with the chosen metric and its CI half-width (when the metric
    is the run's own summary; NaN otherwise).

    A damaged run directory is skipped with a one-line warning naming it; so is an unstable run (non-finite
    or absurd error, :func:`iclbench.store.unstable_reason`) unless ``include_unstable``. ``score_from`` past
    every run's context is an error."""
    rows = []
    past = []
    for run_dir in find_runs(results):
        try:
            m = RunDir(run_dir).metrics()
            unstable = m.get("unstable") or unstable_reason(m)
            if unstable and not include_unstable:
                warn(f"iclbench: warning: leaving out unstable run {run_dir}: {unstable} (--include-unstable "
                     "shows it)")
                continue
            groups = m.get("groups", {"task": m["config_hash"], "model": m["config_hash"]})
            curves = m.get("curves", {}).get("predictors", {})
            positions = m.get("curves", {}).get("positions", [])
            if score_from is None:
                errors = {n: float(s["mean"]) for n, s in m["summary"].items()}
            else:
                errors = {n: _mean_from(curves[n], positions, score_from) for n in m["summary"]}
            oracles = set(m.get("oracles", ()))  # marked by their function (fn.oracle = True), not their name
            competitors = [e for n, e in errors.items() if n != "model" and not is_oracle(n) and n not in oracles]
            best = min(competitors) if competitors else float("nan")
            bayes = errors.get("bayes", float("nan"))
            zero_ref = m.get("reference", {}).get("zero")
            zero = 1.0 if zero_ref is None else (float(zero_ref["mean"]) if score_from is None else _mean_from(
                zero_ref, positions, score_from))
            for name, s in m["summary"].items():
                err = errors[name]
                value = {"error": err, "excess": err - best, "excess_bayes": err - bayes,
                         "icl_score": (zero - err) / (zero - best) if zero != best else float("nan")}[metric]
                half = (s["ci"][1] - s["ci"][0]) / 2 if metric == "error" and score_from is None else float("nan")
                vs_bayes = curves.get(name, {}).get("excess_bayes")
                if metric == "excess_bayes" and score_from is None and vs_bayes:
                    half = (vs_bayes["ci"][1] - vs_bayes["ci"][0]) / 2  # paired bootstrap
                is_model = name == "model"
                if not math.isfinite(value) and not (metric == "icl_score" and zero == best):
                    warn(f"iclbench: warning: {run_dir}: {name} has a non-finite {metric} ({value})")
                rows.append({
                    "run": str(run_dir),
                    "kind": "model" if is_model else "baseline",
                    "name": m["model"] if is_model else name,
                    "config": groups["model"] if is_model else "",
                    "task": m["task"],
                    "task_config": groups["task"],
                    "seed": m["seed"],
                    "value": value,
                    "ci_half": half,
                    "learned": vs_bayes["learned"] if is_model and vs_bayes and score_from is None else "",
                })
        except PastContext as exc:
            past.append(f"iclbench: warning: leaving out {run_dir}: {exc}")
        except (DamagedRun, KeyError, TypeError, ValueError, IndexError, AttributeError, OSError) as exc:
            warn(f"iclbench: warning: skipping damaged run directory {run_dir}: {exc}")
    if past and not rows:
        raise ICLBenchError(f"--from {score_from} is past the last scored position of every run under {results}")
    for message in past:  # a healthy run, just shorter than K: not called damaged
        warn(message)
    return pd.DataFrame(rows, columns=["run", "kind", "name", "config", "task", "task_config", "seed",
                                       "value", "ci_half", "learned"])


def _seeds_learned(labels: pd.Series) -> str:
    """One label when every seed agrees, else the count of each ('learned 2/3, partly 1/3')."""
    labels = [v for v in labels if v]
    if not labels:
        return ""
    counts = pd.Series(labels).value_counts()
    if len(counts) == 1:
        return counts.index[0]
    return ", ".join(f"{k} {v}/{len(labels)}" for k, v in counts.items())


def _labels(df: pd.DataFrame, name_col: str, cfg_col: str, within: list[str] = ()) -> pd.Series:
    """'name', or 'name@hash' where one name has several configurations (within one ``within`` group: a
    model row is split only where one task column holds several of its configurations, so a task's own
    training defaults, e.g. a lower lr for regression, do not split the row)."""
    n_cfg = df.groupby([*within, name_col])[cfg_col].transform("nunique")
    ambiguous = n_cfg.groupby(df[name_col]).transform("max") > 1  # then every row of that name gets its hash
    return df[name_col].where(~ambiguous, df[name_col] + "@" + df[cfg_col])


def aggregate(runs: pd.DataFrame, tasks=(), models=()) -> pd.DataFrame:
    """One row per (row label, task label): mean and sd over seeds, seed count, and a CI half-width.

    Baselines do not depend on the model or seed, only on the task config and evaluation set; a baseline's
    value is averaged over the runs that evaluated it, counted once per seed. ``tasks``/``models`` filter
    by name (empty: keep all). The CI half-width is the seed spread's (1.96 sd/√n) when n ≥ 2, else the
    run's own bootstrap interval.
    """
    keys = ["kind", "row", "task_label"]
    columns = ["kind", "row", "task", "mean", "sd", "n_seeds", "ci_half", "learned"]
    df = runs.copy()
    if tasks:
        df = df[df.task.isin(tasks)]
    if models:
        df = df[(df.kind == "baseline") | df.name.isin(models)]
    if df.empty:
        return pd.DataFrame(columns=columns)
    df["task_label"] = _labels(df, "task", "task_config")
    model_rows = df[df.kind == "model"].copy()
    model_rows["row"] = _labels(model_rows, "name", "config", within=["task_label"])
    base = df[df.kind == "baseline"].copy()
    base["row"] = "baseline: " + base["name"]
    df = pd.concat([model_rows, base])
    # one value per (row, task, seed) first, so that a baseline evaluated by several models counts once
    per_seed = df.groupby([*keys, "seed"], as_index=False)[["value", "ci_half"]].mean()
    if "learned" not in df:
        df["learned"] = ""
    per_seed = per_seed.merge(df.groupby([*keys, "seed"], as_index=False)["learned"].agg(_seeds_learned),
                              on=[*keys, "seed"])
    out = per_seed.groupby(keys, as_index=False).agg(
        mean=("value", "mean"), sd=("value", "std"), n_seeds=("seed", "nunique"), boot=("ci_half", "mean"),
        learned=("learned", _seeds_learned))
    spread = 1.96 * out["sd"] / out["n_seeds"].clip(lower=1) ** 0.5
    out["ci_half"] = spread.where(out["n_seeds"] >= 2, out["boot"])
    out = out.drop(columns="boot").rename(columns={"task_label": "task"})
    out["kind"] = pd.Categorical(out["kind"], ["model", "baseline"], ordered=True)
    return out.sort_values(["kind", "row", "task"]).reset_index(drop=True)[columns]


def wide(agg: pd.DataFrame) -> pd.DataFrame:
    """Rows: models then baselines; columns: tasks; cells 'mean (n)' or 'mean ± sd (n)'."""
    def cell(r):
        sd = "" if pd.isna(r["sd"]) else f" ± {r['sd']:.4f}"
        label = f" [{r['learned']}]" if r.get("learned") else ""
        return f"{r['mean']:.4f}{sd} (n={r['n_seeds']}){label}"

    if agg.empty:
        return pd.DataFrame()
    cells = agg.assign(cell=agg.apply(cell, axis=1))
    table = cells.pivot(index="row", columns="task", values="cell")
    order = list(dict.fromkeys(agg["row"]))
    return table.reindex(order).fillna("—")


def _machine_readable(df: pd.DataFrame, fmt: str) -> str | None:
    """csv/json give the tidy table itself, for pandas; None for the human formats."""
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return df.to_json(orient="records", indent=2)
    return None


def render(results: Path, fmt: str = "github", warn=lambda msg: print(msg, file=sys.stderr),
           metric: str = "error", score_from: int | None = None, tasks=(), models=(),
           include_unstable: bool = False) -> str:
    from tabulate import tabulate

    agg = aggregate(collect(results, warn, metric, score_from, include_unstable), tasks, models)
    tidy = _machine_readable(agg, fmt)
    if tidy is not None:
        return tidy
    if agg.empty:
        return f"no complete runs under {results}"
    table = wide(agg)
    where = f" (positions t >= {score_from})" if score_from is not None else ""
    title = f"{metric}{where}: {METRIC_HELP[metric]}; mean ± sd over seeds (n = seeds)"
    if (agg["learned"] != "").any():
        title += f"; {LEARNED_HELP}"
    body = tabulate(table, headers=["model"] + list(table.columns), tablefmt=fmt, disable_numparse=True)
    return body if fmt == "latex" else f"{title}\n\n{body}"


def compare(a: Path, b: Path, metric: str = "error", score_from: int | None = None,
            warn=lambda msg: print(msg, file=sys.stderr)) -> pd.DataFrame:
    """Side by side: every (row, task) present in both, B − A, and whether |B − A| exceeds the combined CI
    half-width sqrt(ci_a² + ci_b²) (see :func:`aggregate` for the CI; 'n/a' where none is known)."""
    ra, rb = collect(a, warn, metric, score_from), collect(b, warn, metric, score_from)
    if ra.empty or rb.empty:
        return pd.DataFrame(columns=["row", "task", "A", "B", "B - A", "exceeds CI"])
    # each side labelled on its own: a name with one configuration per side is matched by name, so two
    # configurations (say two learning rates) can be compared; hashes appear only where a side has several
    merged = aggregate(ra).merge(aggregate(rb), on=["kind", "row", "task"], suffixes=("_a", "_b"))
    merged["delta"] = merged["mean_b"] - merged["mean_a"]
    ci = (merged["ci_half_a"] ** 2 + merged["ci_half_b"] ** 2) ** 0.5
    merged["exceeds"] = [("n/a" if pd.isna(c) else ("yes" if abs(d) > c else "no"))
                         for d, c in zip(merged["delta"], ci)]
    return merged.rename(columns={"mean_a": "A", "mean_b": "B", "delta": "B - A", "exceeds": "exceeds CI"})[
        ["row", "task", "A", "B", "B - A", "exceeds CI"]]


def render_compare(a: Path, b: Path, fmt: str = "github", metric: str = "error",
                   score_from: int | None = None) -> str:
    from tabulate import tabulate

    df = compare(a, b, metric, score_from)
    tidy = _machine_readable(df, fmt)
    if tidy is not None:
        return tidy
    if df.empty:
        return f"nothing in common between {a} and {b}"
    return (f"{metric}: A = {a}, B = {b}\n\n"
            + tabulate(df, headers="keys", tablefmt=fmt, showindex=False, floatfmt=".4f"))
