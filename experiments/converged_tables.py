"""The converged study's tables (issue 24), from the runs of experiments/converged.sh, or, on a machine without
them, from their compact records committed under results/reference/records/.

    python experiments/converged_tables.py      # writes results/reference/converged.md and its figure

What it shows, per part that has runs: why and when each cell's training stopped; how many seeds learned
(the study's bar: at least 9 of 10 in every gpt2l-gpt6l cell, "partly" for sparse-linreg); the seed paper's
claims per depth, family and task (counts of per-model interval verdicts, with the Wilson interval of the
share and the verdict at three criteria); the same probe on an untrained model of every cell, the control
every statement must beat; and the circuits per cell and their overlap across depths. Cells still being
trained are marked by their seed counts, so a partial study reads as partial.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_tables import DEPTHS, FAMILIES, OUT, ROOT, TASKS, aggregate, heatmap, md, order, seeds_table  # noqa: E402

from iclbench import store  # noqa: E402
from iclbench.labels import run_labels  # noqa: E402
from iclbench.probes.circuit import Circuit, circuit_overlap  # noqa: E402
from iclbench.probes.specialization import claim_verdicts, layer_roles  # noqa: E402
from iclbench.probing import collect_probe  # noqa: E402
from iclbench.registry import get_registry  # noqa: E402
from iclbench.rundir import find_runs  # noqa: E402

ALL_TASKS = TASKS + ["decision-tree"]
TWINS = ["gpt2l", "gpt2l-attn", "gpt3l", "gpt3l-attn"]
#: the order of models in a table: the depths, then the attention-only twins
RANK = {m: i for i, m in enumerate(DEPTHS + ["gpt2l-attn", "gpt3l-attn"])}


def source(name: str) -> Path:
    """results/<name>, or its committed compact records."""
    runs = ROOT / "results" / name
    return runs if runs.exists() else ROOT / "results" / "reference" / "records" / name


RUNS, PRIORS, POOL = (source(n) for n in ("converged-runs", "converged-priors-runs", "converged-pool-runs"))


def training(results: Path) -> pd.DataFrame:
    """One row per finished run: task, model, seed, why and when training stopped, the learned label."""
    rows = []
    registry = get_registry()
    for run_dir in find_runs(results):
        try:
            m = store.read_run(run_dir)
        except store.DamagedRun:  # still running, or failed
            continue
        task, model = run_labels(m["config"], registry)
        stop = m["train"].get("stop") or {}
        excess = m["curves"]["predictors"]["model"].get("excess_bayes") or {}
        label = " ".join(w for w in model.split() if not w.startswith(("train.", "eval.")))  # the model alone
        rows.append({"task": task.split()[0], "variant": task, "model": model.split()[0], "label": label,
                     "seed": m["seed"], "reason": stop.get("reason", "steps"), "steps": m["train"]["steps"],
                     "flat_at": stop.get("decay_from"), "train_s": m["train"]["train_time_s"],
                     "learned": excess.get("learned"), "relative": excess.get("relative")})
    return pd.DataFrame(rows, columns=["task", "variant", "model", "label", "seed", "reason", "steps", "flat_at",
                                       "train_s", "learned", "relative"])


def learned_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Task x depth: 'k/n' seeds learned (l), partly (p), not (n); the study's bar per cell."""
    def cell(g):
        n = len(g)
        k = int((g.learned == "learned").sum())
        p = int(g.learned.astype(str).str.startswith("partly").sum())
        bar = "partly" if g.task.iloc[0] == "sparse-linreg" else "learned"
        ok = (k + p if bar == "partly" else k) >= 0.9 * n
        return f"{k}/{n} learned" + (f", {p} partly" if p else "") + ("" if ok else " ✗")
    rows = []
    for task in [t for t in ALL_TASKS if t in set(runs.task)]:
        row = {"task": task}
        for model in [m for m in DEPTHS + ["gpt2l-attn", "gpt3l-attn"] if m in set(runs.model)]:
            g = runs[(runs.task == task) & (runs.model == model) & (runs.label == model)]
            row[model] = cell(g) if len(g) else "—"
        rows.append(row)
    return pd.DataFrame(rows)


def stops(runs: pd.DataFrame) -> pd.DataFrame:
    """Per cell: how many runs stopped flat and at the cap, the median step they stopped at, training time."""
    rows = []
    for (task, model), g in runs.groupby(["task", "label"], sort=False):
        flat = g[g.reason == "flat"]
        rows.append({"task": task, "model": model, "runs": len(g), "flat": len(flat),
                     "cap": int((g.reason == "cap").sum()),
                     "flat at (median step)": f"{flat.flat_at.median():.0f}" if len(flat) else "—",
                     "steps (median)": f"{g.steps.median():.0f}",
                     "train s (median, 1 thread)": f"{g.train_s.median():.0f}"})
    rows.sort(key=lambda r: (ALL_TASKS.index(r["task"]) if r["task"] in ALL_TASKS else 99, RANK.get(r["model"], 99)))
    return pd.DataFrame(rows)


def roles(results: Path) -> pd.DataFrame:
    """Per cell and layer: the roles the specialization probe gives that layer over the learned seeds, with
    counts ("bayes 7/8"): which layer does what, and how consistently across seeds."""
    runs = collect_probe(results, "specialization", registry=get_registry())
    runs = runs[runs.summary.map(lambda s: isinstance(s, dict) and "roles" in s) & (runs.learned != "not learned")]
    rows = []
    for (task, model), g in runs.groupby([runs.task.str.split().str[0], runs.model.str.split().str[0]], sort=False):
        row = {"task": task, "model": model, "learned seeds": len(g)}
        for layer in range(max(len(s["roles"]) for s in g.summary)):
            counts = pd.Series([s["roles"][layer] for s in g.summary if layer < len(s["roles"])]).value_counts()
            row[f"layer {layer}"] = ", ".join(f"{r} {c}/{len(g)}" for r, c in counts.items())
        rows.append(row)
    rows.sort(key=lambda r: (ALL_TASKS.index(r["task"]) if r["task"] in ALL_TASKS else 99, RANK.get(r["model"], 99)))
    return pd.DataFrame(rows).fillna("—")


def untrained(cells: list[tuple[str, str]]) -> pd.DataFrame:
    """The specialization probe on each cell's model at its random initialisation (seed 0): every role and
    claim below must beat this."""
    registry = get_registry()
    rows = []
    for task_name, model_name in cells:
        task_cls, cls = registry.task(task_name), registry.model(model_name)
        task = task_cls(task_cls.Options())
        torch.manual_seed(0)
        model = cls(cls.Options(), task.d_in, task.d_out, task.context_len).eval()
        s = layer_roles(model, task, torch.Generator().manual_seed(0), "cpu")
        rows.append({"task": task_name, "model": f"{model_name}, untrained", "roles": " / ".join(s["roles"]),
                     **claim_verdicts(s)})
    return pd.DataFrame(rows)


def main():
    if not RUNS.exists():
        sys.exit(f"converged_tables.py: no runs at {RUNS} (run experiments/converged.sh first)")
    torch.set_grad_enabled(False)
    registry = get_registry()
    runs = training(RUNS)
    main_runs = runs[runs.label == runs.model]  # the named depths, not the scale study's variants
    every = seeds_table(RUNS)
    every = every[every.variant == every.task]  # the default prior and pool
    seeds = order(every)  # the named depths
    family = {t: f for f, ts in FAMILIES.items() for t in ts}
    seeds = seeds.assign(family=seeds.task.map(family))
    parts = [
        "# The converged study (issue 24): answer tables",
        "",
        "Generated by `python experiments/converged_tables.py` from the runs of `bash experiments/converged.sh` "
        "(every run trained until its held-out error is flat, or to its cap; the reason is recorded per run). "
        f"{len(runs)} finished runs so far. Claim cells as in [study.md](study.md): in k of n learned models the "
        "claim holds by its own per-model interval test; [95% Wilson interval of the share]; the verdict on "
        "\"holds in more than 25% / 50% / 75% of trained models\".",
        "",
        "## Learned seeds per cell (the bar: 9 of 10 in every gpt2l-gpt6l cell; sparse-linreg at least partly; "
        "✗ where a cell is short)",
        "", md(learned_cells(main_runs)), "",
        "## Why training stopped", "", md(stops(main_runs)), "",
    ]
    if len(seeds):
        parts += ["## Claims per depth (all tasks)", "", md(order(aggregate(seeds, ["model"]))), "",
                  "## Claims per task family and depth", "", md(order(aggregate(seeds, ["family", "model"]))), "",
                  "## Claims per task and depth", "", md(order(aggregate(seeds, ["task", "model"]))), "",
                  "![claims by task and depth](converged-claims.png)", ""]
        heatmap(seeds, OUT / "converged-claims.png")
        twins = every[(every.task == "affine") & every.model.isin(TWINS)]
        if twins.model.str.endswith("-attn").any():
            parts += ["## Without MLPs: affine, each depth beside its attention-only twin", "",
                      md(aggregate(twins.sort_values(["model", "seed"]), ["model"])), ""]
        parts += ["## Which layer does what: roles per layer over learned seeds (none = no better than the "
                  "same read-out on untrained controls)", "", md(roles(RUNS)), ""]
        cells = sorted({(t, m) for t, m in zip(seeds.task, seeds.model)},
                       key=lambda c: (ALL_TASKS.index(c[0]) if c[0] in ALL_TASKS else 99, c[1]))
        parts += ["## Untrained controls (seed 0 of each cell's model at initialisation)", "",
                  md(untrained(cells)), ""]
    circuits = collect_probe(RUNS, "circuit", registry=registry)
    if len(circuits):
        circuits = circuits.assign(model=circuits.model.str.split().str[0])
        parts += ["## Circuits per cell (learned seeds' circuits; Jaccard overlap over pairs of seeds)", "",
                  md(Circuit.cross_run_table(circuits)), "",
                  "## Circuit overlap across cells", "", md(circuit_overlap(circuits).round(2)), ""]
    (OUT / "converged.md").write_text("\n".join(parts))
    print(f"wrote {OUT / 'converged.md'}")


if __name__ == "__main__":
    main()
