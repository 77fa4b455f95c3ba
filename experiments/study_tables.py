"""The reference study's tables and figures (issue 15), from the runs that experiments/study.sh trained and probed.

    python experiments/study_tables.py        # writes results/reference/

Reads results/reference-runs (every task x depth x seed at 1500 steps), results/study-priors-runs (gpt3l on
affine under other priors) and results/study-steps-runs (gpt3l trained 3x longer). Every verdict here is a
count of per-seed verdicts (each itself from a confidence interval) or an interval over seeds; nothing is a
point estimate against a cut. Runs that may not have learned their task (the interval of their excess over
Bayes reaches past the not-learned cut) are not evidence.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from tabulate import tabulate  # noqa: E402

from iclbench import store  # noqa: E402
from iclbench.rundir import find_runs  # noqa: E402
from iclbench.probes.specialization import CLAIM_LABELS, claim_verdicts  # noqa: E402
from iclbench.probes.stats import share_ci, sweep  # noqa: E402
from iclbench.probing import collect_probe, cross_run  # noqa: E402
from iclbench.registry import get_registry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS, PRIORS, STEPS = (ROOT / "results" / d for d in ("reference-runs", "study-priors-runs", "study-steps-runs"))
OUT = ROOT / "results" / "reference"
#: decision-tree (Garg et al.'s fourth class) came after the first study: it has rows in the converged study only
TASKS = ["affine", "affine-vec", "linrec", "quadratic", "logistic", "poly", "linreg", "sparse-linreg", "relu-nn",
         "decision-tree"]
FAMILIES = {"recurrences": TASKS[:6], "regression": TASKS[6:]}
# gpt12l cells are trained on a GPU (benchmarks/device_check.sh, parts study and more) and join when present
DEPTHS = ["gpt1l", "gpt2l", "gpt3l", "gpt6l"] + (["gpt12l"] if any(RUNS.glob("*-gpt12l-*-s*")) else [])
#: the per-seed verdicts summarised: claim 2 at the paper's layer 2 and at any later layer, side by side
CLAIMS = list(CLAIM_LABELS)
#: the share of learned models in which a claim holds is judged against these (the headline uses 0.5)
SHARES = (0.25, 0.5, 0.75)


def share_verdicts(k: int, n: int) -> str:
    """'k/n [lo, hi] v25 / v50 / v75': the Wilson interval of the share of models in which a claim holds, and
    the verdict on "it holds in more than 25% / 50% / 75% of trained models" from that interval."""
    ci = share_ci(k, n)
    return f"{k}/{n} [{ci[0]:.2f}, {ci[1]:.2f}] " + " / ".join(sweep(ci, SHARES).values())


def seeds_table(results: Path) -> pd.DataFrame:
    """One row per run with its per-seed claim verdicts (n/a where the model cannot be tested) and its
    learned label."""
    runs = collect_probe(results, "specialization", registry=get_registry())
    rows = []
    for r in runs.itertuples():
        s = r.summary
        if not (isinstance(s, dict) and "claim_1" in s):
            continue
        row = {"task": r.task.split()[0], "variant": r.task, "model": r.model.split()[0], "seed": r.seed,
               "learned": r.learned, "evidence": r.evidence, "run": r.run, "label": r.model}
        verdicts = claim_verdicts(s)
        row.update({c: verdicts[c] for c in CLAIMS})
        rows.append(row)
    return pd.DataFrame(rows)


def aggregate(seeds: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per group: how many learned models were tested for each claim, in how many it holds, the Wilson
    interval of that share, and the verdict on "it holds in most models" (share > 0.5) with how it moves at
    the other criteria."""
    rows = []
    for key, g in seeds.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        learned = g[g["evidence"]]
        row = dict(zip(by, key)) | {"models": len(g), "learned": len(learned)}
        for claim in CLAIMS:
            tested = learned[learned[claim] != "n/a"]
            k, n = int((tested[claim] == "holds").sum()), len(tested)
            row[claim] = "not learned" if len(learned) == 0 else "n/a" if n == 0 else share_verdicts(k, n)
        rows.append(row)
    return pd.DataFrame(rows)


def order(df: pd.DataFrame) -> pd.DataFrame:
    keys = {"task": TASKS, "model": DEPTHS, "family": list(FAMILIES)}
    for col in [c for c in ("family", "task", "model") if c in df]:
        df = df[df[col].isin(keys[col])]
        df = df.assign(**{col: pd.Categorical(df[col], keys[col], ordered=True)})
    return df.sort_values([c for c in ("family", "task", "model", "seed") if c in df]).astype({
        c: str for c in ("family", "task", "model") if c in df})


def heatmap(seeds: pd.DataFrame, path: Path):
    """Task x depth, one panel per claim: the share of learned models in which it holds (k/n in the cell;
    grey where no model learned the task)."""
    tasks = [t for t in TASKS if t in set(seeds.task)]
    fig, axes = plt.subplots(1, len(CLAIMS), figsize=(4.2 * len(CLAIMS), 4.6), sharey=True)
    for ax, claim in zip(axes, CLAIMS):
        grid = [[float("nan")] * len(DEPTHS) for _ in tasks]
        for i, t in enumerate(tasks):
            for j, m in enumerate(DEPTHS):
                g = seeds[(seeds.task == t) & (seeds.model == m)]
                learned = g[g.evidence]
                tested = learned[learned[claim] != "n/a"]
                if len(g) == 0:
                    text = ""
                elif len(learned) == 0:
                    text = "not\nlearned"
                elif len(tested) == 0:
                    text = "n/a"
                else:
                    k = int((tested[claim] == "holds").sum())
                    grid[i][j] = k / len(tested)
                    text = f"{k}/{len(tested)}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8)
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(DEPTHS)), DEPTHS)
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_title(claim, fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.8, label="share of learned models in which it holds")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def task_model(run_dir: Path) -> tuple[str, str] | None:
    """(task, model) from a run directory's name, ``<task>-<model>-<8-hex hash>-s<seed>``."""
    m = re.fullmatch(r"(.+)-(gpt\d+l(?:-attn)?)-[0-9a-f]{8}-s\d+", run_dir.name)
    return m.groups() if m else None


def losses(run_dir: Path) -> list[tuple[int, float]]:
    out = []
    for line in (run_dir / store.LOG).read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if "loss" in e and "step" in e:
            out.append((e["step"], e["loss"]))
    return out


def curves_figure(path: Path):
    """Training loss against step per task: every depth at 1500 steps (mean over seeds, min-max band) and
    gpt3l trained to 4500 steps (dashed), so one can see whether 1500 steps has flattened."""
    runs = find_runs(RUNS)  # scanned once, not once per panel and depth
    long = find_runs(STEPS) if STEPS.exists() else []
    fig, axes = plt.subplots(3, 3, figsize=(13, 10))
    for ax, task in zip(axes.flat, TASKS):
        for model, colour in zip(DEPTHS, ("C0", "C1", "C2", "C3", "C4")):
            curves = [dict(losses(d)) for d in runs if task_model(d) == (task, model)]
            curves = [c for c in curves if c]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ys = [[c[s] for c in curves] for s in steps]
            ax.plot(steps, [sum(y) / len(y) for y in ys], color=colour, label=f"{model} (n={len(curves)})")
            ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=colour, alpha=0.15)
        for d in long:
            if task_model(d) == (task, "gpt3l"):
                steps, ys = zip(*losses(d))
                ax.plot(steps, ys, color="C2", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss (normalized MSE, all positions)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def convergence() -> pd.DataFrame:
    """gpt3l at 1500 vs 4500 steps, same seed: excess over Bayes, the learned label and the per-model claim
    verdicts at each, so one sees whether longer training moves the answer, not only the error."""
    def record(run_dir: Path):
        if (task_model(run_dir) or ("", ""))[1] != "gpt3l":  # by name, before reading its metrics
            return None
        try:
            m = store.read_run(run_dir)
        except store.DamagedRun:  # still running, or failed
            return None
        e = m["curves"]["predictors"]["model"].get("excess_bayes") or {}
        try:
            s = store.read_json(run_dir / "probes.json")["probes"]["specialization"]["summary"]
            verdicts = claim_verdicts(s)
            claims = " / ".join(verdicts[c] for c in CLAIMS)
        except (store.DamagedRun, KeyError, TypeError):
            claims = "not probed"
        return (m["task"], m["seed"]), e.get("mean"), f"{e.get('relative', float('nan')):.3f} {e.get('learned')}", \
            claims

    long = {r[0]: r for r in map(record, find_runs(STEPS) if STEPS.exists() else []) if r}
    rows = []
    for r in map(record, find_runs(RUNS)):
        if r is None or r[0] not in long:
            continue
        (task, seed), ex, rel, claims = r
        _, ex3, rel3, claims3 = long[(task, seed)]
        rows.append({"task": task, "seed": seed, "excess over Bayes @1500": f"{ex:.4f}", "@4500": f"{ex3:.4f}",
                     "relative excess, label @1500": rel, "@4500 ": rel3,
                     "claims @1500 (" + " / ".join(CLAIMS) + ")": claims, "@4500  ": claims3})
    return order(pd.DataFrame(rows)) if rows else pd.DataFrame()


def md(df: pd.DataFrame) -> str:
    return tabulate(df, headers="keys", tablefmt="github", showindex=False, disable_numparse=True)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    seeds = order(seeds_table(RUNS))
    seeds.to_csv(OUT / "specialization-seeds.csv", index=False)
    (OUT / "specialization.md").write_text(cross_run(RUNS, "specialization") + "\n")
    (OUT / "specialization.csv").write_text(cross_run(RUNS, "specialization", fmt="csv"))
    family = {t: f for f, ts in FAMILIES.items() for t in ts}
    seeds["family"] = seeds.task.map(family)
    per_depth = order(aggregate(seeds, ["model"]))
    per_family = order(aggregate(seeds, ["family", "model"]))
    per_task = order(aggregate(seeds, ["task"]))
    heatmap(seeds, OUT / "study-claims.png")
    curves_figure(OUT / "study-curves.png")
    parts = [
        "# The reference study: answer tables",
        "",
        "Generated by `python experiments/study_tables.py` from the runs of `bash experiments/study.sh`.",
        "Each claim cell: in k of n learned models (training seeds) the claim holds by its own per-model interval "
        "test; [95% Wilson interval of the share]; then the verdict on \"it holds in more than 25% / 50% / 75% "
        "of trained models\" (holds when the interval is above the share, fails when below, else inconclusive). "
        "Models that may not have learned their task are left out (the interval of their relative excess over "
        "Bayes reaches above 0.5, `iclbench.evaluate.is_evidence`); n/a where the claim cannot be tested (one "
        "block has no later layer).",
        "",
        "## Per depth (all tasks)", "", md(per_depth), "",
        "## Per task family and depth", "", md(per_family), "",
        "## Per task (all depths)", "", md(per_task), "",
        "![claims by task and depth](study-claims.png)", "",
    ]
    twins = seeds_table(RUNS)
    twins = twins[(twins.task == "affine") & twins.model.isin(["gpt2l", "gpt2l-attn", "gpt3l", "gpt3l-attn"])]
    if twins.model.str.endswith("-attn").any():
        parts += ["## Without MLPs: affine, each depth beside its attention-only twin", "",
                  md(aggregate(twins.sort_values(["model", "seed"]), ["model"])), ""]
    if PRIORS.exists():
        default = seeds[(seeds.task == "affine") & (seeds.model == "gpt3l")].assign(
            prior="affine (default: a in ±[0, 1], b in ±0.25, no noise)")
        table = aggregate(pd.concat([default, seeds_table(PRIORS).assign(prior=lambda d: d.variant)]), ["prior"])
        parts += ["## Robustness: gpt3l on affine under other priors", "", md(table), "",
                  "Per-cell detail: [specialization-priors.md](specialization-priors.md).", ""]
        (OUT / "specialization-priors.md").write_text(cross_run(PRIORS, "specialization") + "\n")
    conv = convergence()
    if not conv.empty:
        parts += ["## Is 1500 steps enough? gpt3l at 1500 vs 4500 steps (same seeds)", "", md(conv), "",
                  "![learning curves](study-curves.png)", ""]
    (OUT / "study-1500.md").write_text("\n".join(parts))
    print(f"wrote {OUT}/study-1500.md and figures")


if __name__ == "__main__":
    main()
