"""The table of experiments/recipes.yaml: per run, the recipe and seed, why and when it stopped, the time it
took, the evaluation's error beside Bayes and the best classical baseline, the learned label, and when the
held-out relative excess over Bayes first cleared 0.1 (learned) by its interval.

    python experiments/recipe_table.py [RESULTS_DIR]   # default: the committed records
"""

from __future__ import annotations

import sys
from pathlib import Path

from tabulate import tabulate

from iclbench.labels import run_labels
from iclbench.rundir import find_runs
from iclbench.store import DamagedRun, read_run

BEST = {"linreg": "least_squares", "sparse-linreg": "lasso", "relu-nn": "relu_net_gd"}


def row(metrics: dict) -> list:
    stop, summary = metrics["train"]["stop"], metrics["summary"]
    learned = next((h for h in stop["heldout"] if h["relative_excess"][1] < 0.1), None)
    task_label, model_label = run_labels(metrics["config"])
    best = BEST.get(metrics["task"])
    model = summary["model"]
    return [task_label, model_label, metrics["seed"], stop["reason"], stop["decay_from"] or "—", stop["steps"],
            f"{stop['time_s']:.0f}", f"{model['mean']:.3f} [{model['ci'][0]:.3f}, {model['ci'][1]:.3f}]",
            f"{summary['bayes']['mean']:.3f}", f"{best} {summary[best]['mean']:.3f}" if best in summary else "—",
            metrics["curves"]["predictors"]["model"]["excess_bayes"]["learned"],
            "—" if learned is None else f"{learned['step']} ({learned['elapsed_s']:.0f} s)"]


def main(results: str = "results/reference/records/recipes-runs") -> None:
    rows = []
    for run in find_runs(Path(results)):
        try:
            rows.append(row(read_run(run)))
        except DamagedRun as exc:  # still training, or stopped by hand: said, not tabled
            print(f"({run.name}: {exc})", file=sys.stderr)
    print(tabulate(sorted(rows, key=lambda r: (r[0], r[1], r[2])),
                   headers=["task", "recipe", "seed", "stop", "flat at", "steps", "train s", "model error [95% CI]",
                            "bayes", "best baseline", "label", "learned at (held-out)"], tablefmt="github",
                   disable_numparse=True))


if __name__ == "__main__":
    main(*sys.argv[1:])
