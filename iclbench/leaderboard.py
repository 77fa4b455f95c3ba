"""Leaderboard: every complete run under a results directory, one row per model, one column per task.

Cells are the mean over seeds of the summary metric (normalized error averaged over positions >= the
task's ``score_from``), with the number of seeds. Runs of one name under different configurations are kept
apart: a model row is (model name, hash of model+train config), a task column is (task name, hash of
task+eval config), labelled by the settings that differ from the defaults ("affine noise=0.1", "gpt2l
train.steps=600"; :mod:`iclbench.labels`), with the short hash added only where two configurations would read
the same; the CSV/JSON tables keep the hashes. Baselines are rows of their own ("baseline: least_squares").
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from .contracts import is_oracle  # by name here: runs record the others in metrics["oracles"]
from .errors import ICLBenchError
from .labels import run_labels
from .rundir import RunDir, distinct_runs, find_runs
from .store import DamagedRun, unstable_reason

FORMATS = ("github", "markdown", "plain", "csv", "json", "latex")
#: what a format name means to tabulate: "markdown" is GitHub's pipe table; LaTeX gets booktabs rules
TABLEFMT = {"markdown": "github", "latex": "latex_booktabs"}
#: characters LaTeX without extra packages does not typeset, and what it does instead
LATEX_SYMBOLS = {"±": r"$\pm$", "→": r"$\to$", "—": "---", "–": "--", "≥": r"$\geq$", "≤": r"$\leq$",
                 "−": "-", "×": r"$\times$", "√": r"$\surd$"}


def tabulate_table(df: pd.DataFrame, fmt: str, **kw) -> str:
    """``tabulate`` in a user-facing format name: "markdown" as GitHub's, LaTeX with booktabs rules
    (\\toprule, \\midrule, \\bottomrule) and every symbol (±, →, —, ...) written the way LaTeX typesets it,
    so that the table compiles as is."""
    from tabulate import tabulate

    if fmt != "latex":
        return tabulate(df, tablefmt=TABLEFMT.get(fmt, fmt), **kw)
    # tabulate escapes $ and \\ in cells, so each symbol travels as a plain token and is swapped in after
    tokens = {sym: f"ICLBSYM{i}X" for i, sym in enumerate(LATEX_SYMBOLS)}

    def plain(value):
        if not isinstance(value, str):
            return value
        for sym, token in tokens.items():
            value = value.replace(sym, token)
        return value

    df = df.map(plain) if hasattr(df, "map") else df.applymap(plain)
    df.index = [plain(str(i)) for i in df.index]
    headers = kw.pop("headers", "keys")
    if headers != "keys":
        headers = [plain(str(h)) for h in headers]
    else:
        df.columns = [plain(str(c)) for c in df.columns]
    text = tabulate(df, tablefmt="latex_booktabs", headers=headers, **kw)
    for sym, token in tokens.items():
        text = text.replace(token, LATEX_SYMBOLS[sym])
    return text


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
    registry = None
    for run_dir in distinct_runs(find_runs(results), lambda msg: warn(f"iclbench: warning: {msg}")):
        try:
            m = RunDir(run_dir).metrics()
            unstable = unstable_reason(m)
            if unstable and not include_unstable:
                warn(f"iclbench: warning: leaving out unstable run {run_dir}: {unstable} (--include-unstable "
                     "shows it)")
                continue
            groups = m.get("groups", {"task": m["config_hash"], "model": m["config_hash"]})
            if registry is None:
                from .registry import get_registry

                registry = get_registry()
            try:  # the settings that differ from the defaults, for people; the hashes are for machines
                task_label, model_label = run_labels(m["config"], registry)
            except (KeyError, TypeError, AttributeError):  # an older or hand-made run: its names
                task_label, model_label = m["task"], m["model"]
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
                    "config_label": model_label if is_model else name,
                    "task": m["task"],
                    "task_config": groups["task"],
                    "task_config_label": task_label,
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
    return pd.DataFrame(rows, columns=["run", "kind", "name", "config", "config_label", "task", "task_config",
                                       "task_config_label", "seed", "value", "ci_half", "learned"])


def _seeds_learned(labels: pd.Series) -> str:
    """One label when every seed agrees, else the count of each ('learned 2/3, partly 1/3')."""
    labels = [v for v in labels if v]
    if not labels:
        return ""
    counts = pd.Series(labels).value_counts()
    if len(counts) == 1:
        return counts.index[0]
    return ", ".join(f"{k} {v}/{len(labels)}" for k, v in counts.items())


def _labels(df: pd.DataFrame, name_col: str, cfg_col: str, readable_col: str, within: list[str] = (),
            bare: bool = False) -> pd.Series:
    """Each configuration by its readable label ('gpt2l train.steps=600': the settings that differ from the
    defaults), with '@hash' added where two configurations read the same.

    A name is split into several labels only where one ``within`` group holds several of its configurations
    (a model row is split only where one task column holds several of its configurations, so that one model
    trained on several tasks stays one row); a name kept whole shows its readable label where all its
    configurations read the same, else the bare name. ``bare``: an unsplit name shows the bare name (so that
    two sides of a comparison, each with one configuration, line up)."""
    if df.empty:
        return df[name_col]
    n_cfg = df.groupby([*within, name_col])[cfg_col].transform("nunique")
    ambiguous = n_cfg.groupby(df[name_col]).transform("max") > 1  # then every row of that name is split
    clash = df.groupby([*within, readable_col])[cfg_col].transform("nunique").groupby(
        df[readable_col]).transform("max") > 1  # two configurations that read the same in one group: hashes
    readable = df[readable_col].where(~clash, df[readable_col] + "@" + df[cfg_col])
    one = readable.groupby(df[name_col]).transform("nunique") == 1
    return readable.where(ambiguous | (one & (not bare)), df[name_col])


def aggregate(runs: pd.DataFrame, tasks=(), models=(), bare: bool = False) -> pd.DataFrame:
    """One row per (row label, task label): mean and sd over seeds, seed count, and a CI half-width.

    Baselines do not depend on the model or seed, only on the task config and evaluation set; a baseline's
    value is averaged over the runs that evaluated it, counted once per seed. ``tasks``/``models`` filter
    by name (empty: keep all). The CI half-width is that of the 95% Student-t interval over seeds
    (t·sd/√n) when n ≥ 2 — the interval ``iclbench specialization`` gives the same model error — else the
    run's own bootstrap interval over its evaluation sequences (:data:`INTERVALS`).
    """
    keys = ["kind", "row", "task_label"]
    columns = ["kind", "row", "task", "mean", "sd", "n_seeds", "ci_half", "learned", "config", "task_config"]
    df = runs.copy()
    if tasks:
        df = df[df.task.isin(tasks)]
    if models:
        df = df[(df.kind == "baseline") | df.name.isin(models)]
    if df.empty:
        return pd.DataFrame(columns=columns)
    for col, fallback in (("config_label", "name"), ("task_config_label", "task")):
        if col not in df:  # a table collected before these labels existed
            df[col] = df[fallback]
    df["task_label"] = _labels(df, "task", "task_config", "task_config_label", bare=bare)
    model_rows = df[df.kind == "model"].copy()
    model_rows["row"] = _labels(model_rows, "name", "config", "config_label", within=["task_label"], bare=bare)
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
    spread = out["sd"] * [seed_t(n) for n in out["n_seeds"]] / out["n_seeds"].clip(lower=1) ** 0.5
    out["ci_half"] = spread.where(out["n_seeds"] >= 2, out["boot"])
    # the hashes behind each label, for machines (CSV/JSON): "," between several (one row over several tasks)
    hashes = df.groupby(keys, as_index=False)[["config", "task_config"]].agg(
        lambda s: ",".join(sorted({str(v) for v in s if v})))
    out = out.merge(hashes, on=keys, how="left")
    out = out.drop(columns="boot").rename(columns={"task_label": "task"})
    out["kind"] = pd.Categorical(out["kind"], ["model", "baseline"], ordered=True)
    return out.sort_values(["kind", "row", "task"]).reset_index(drop=True)[columns]


#: what the leaderboard's "±" is, said in every caption: one interval kind for a quantity over seeds, the
#: one ``iclbench specialization`` gives its model error; a run's own intervals (``iclbench run``'s table, the
#: report's run sections) are bootstrap intervals over its evaluation sequences, another quantity's spread
INTERVALS = ("mean ± half-width of the 95% Student-t interval over seeds (n = seeds; the interval "
             "`iclbench specialization` gives the same model error; none with one seed)")


def seed_t(n: int, confidence: float = 0.95) -> float:
    """Student's t quantile for the interval of a mean over ``n`` seeds (NaN below two)."""
    if n < 2:
        return float("nan")
    from .probes.stats import t_quantile

    return t_quantile(0.5 + confidence / 2, int(n) - 1)


def wide(agg: pd.DataFrame) -> pd.DataFrame:
    """Rows: models then baselines; columns: tasks; cells 'mean (n)' or 'mean ± h (n)', h the half-width of
    the 95% Student-t interval over seeds (:data:`INTERVALS`)."""
    def cell(r):
        sd = "" if pd.isna(r["sd"]) or r["n_seeds"] < 2 else f" ± {r['ci_half']:.4f}"
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
    agg = aggregate(collect(results, warn, metric, score_from, include_unstable), tasks, models)
    tidy = _machine_readable(agg, fmt)
    if tidy is not None:
        return tidy
    if agg.empty:
        return f"no complete runs under {results}"
    table = wide(agg)
    where = f" (positions t >= {score_from})" if score_from is not None else ""
    title = f"{metric}{where}: {METRIC_HELP[metric]}; {INTERVALS}"
    if (agg["learned"] != "").any():
        title += f"; {LEARNED_HELP}"
    body = tabulate_table(table, fmt, headers=["model"] + list(table.columns), disable_numparse=True)
    return body if fmt == "latex" else f"{title}\n\n{body}"


def compare(a: Path, b: Path, metric: str = "error", score_from: int | None = None,
            warn=lambda msg: print(msg, file=sys.stderr)) -> pd.DataFrame:
    """Side by side: every (row, task) present in both, B − A, and whether |B − A| exceeds the combined CI
    half-width sqrt(ci_a² + ci_b²) (see :func:`aggregate` for the CI: Student-t over seeds, a single run's
    bootstrap over its evaluation sequences; 'n/a' where none is known)."""
    ra, rb = collect(a, warn, metric, score_from), collect(b, warn, metric, score_from)
    if ra.empty or rb.empty:
        return pd.DataFrame(columns=["row", "task", "A", "B", "B - A", "exceeds CI"])
    # each side labelled on its own: a name with one configuration per side is matched by name, so two
    # configurations (say two learning rates) can be compared; settings appear only where a side has several
    merged = aggregate(ra, bare=True).merge(aggregate(rb, bare=True), on=["kind", "row", "task"],
                                            suffixes=("_a", "_b"))
    merged["delta"] = merged["mean_b"] - merged["mean_a"]
    ci = (merged["ci_half_a"] ** 2 + merged["ci_half_b"] ** 2) ** 0.5
    merged["exceeds"] = [("n/a" if pd.isna(c) else ("yes" if abs(d) > c else "no"))
                         for d, c in zip(merged["delta"], ci)]
    return merged.rename(columns={"mean_a": "A", "mean_b": "B", "delta": "B - A", "exceeds": "exceeds CI"})[
        ["row", "task", "A", "B", "B - A", "exceeds CI"]]


def _run_configs(results: Path) -> list[dict]:
    configs = []
    for run_dir in find_runs(results):
        try:
            configs.append(RunDir(run_dir).metrics()["config"])
        except (DamagedRun, KeyError, TypeError, ValueError, OSError):
            pass  # collect() has warned about it
    return [c for c in configs if isinstance(c, dict) and c]


def compare_caption(a: Path, b: Path, metric: str = "error", score_from: int | None = None) -> str:
    """What a comparison shows: the metric, which side is A and which B, and the settings that differ."""
    from .labels import differing_settings

    where = f" (positions t >= {score_from})" if score_from is not None else ""
    lines = [f"comparing {metric}{where}: A = {a}, B = {b}; 'exceeds CI': |B - A| above the combined 95% "
             "intervals (Student-t over seeds; a side with one seed: its run's bootstrap over evaluation "
             "sequences)"]
    differ = differing_settings(_run_configs(Path(a)), _run_configs(Path(b)))
    lines.append("settings that differ (A → B): " + "; ".join(differ) if differ
                 else "no setting differs between A and B (seeds or code aside)")
    return "\n".join(lines)


def render_compare(a: Path, b: Path, fmt: str = "github", metric: str = "error",
                   score_from: int | None = None, caption=lambda msg: print(msg, file=sys.stderr)) -> str:
    """The comparison table alone (stdout: ``> table.tex`` holds nothing else); its caption, with the
    settings that differ between A and B, goes to ``caption`` (stderr by default)."""
    caption(compare_caption(a, b, metric, score_from))
    df = compare(a, b, metric, score_from)
    tidy = _machine_readable(df, fmt)
    if tidy is not None:
        return tidy
    if df.empty:
        caption(f"nothing in common between {a} and {b}")
        return ""
    return tabulate_table(df, fmt, headers="keys", showindex=False, floatfmt=".4f")
