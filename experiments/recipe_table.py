"""The table of experiments/recipes.yaml: per run, the recipe and seed, why and when it stopped, the time it
took, the evaluation's error beside Bayes and the best classical baseline, the learned label, and when the
held-out relative excess over Bayes first cleared 0.1 (learned) by its interval.

    python experiments/recipe_table.py [RESULTS_DIR] [--curves FIGURE.png]   # default: the committed records

``--curves``: also draw each run's held-out curve, one panel per task and recipe (:func:`curve_panel`).
"""

from __future__ import annotations

import argparse
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


def middle(scoring: dict) -> float:
    """The middle of one held-out scoring's relative-excess interval."""
    return sum(scoring["relative_excess"]) / 2


def held_out(metrics: dict, step: int | None = None) -> float | None:
    """A run's held-out relative excess over Bayes at ``step`` (:func:`middle`; the last scoring at or before
    it; None: at the end), from its stop record's curve."""
    curve = [e for e in metrics["train"]["stop"]["heldout"] if step is None or e["step"] <= step]
    return middle(curve[-1]) if curve else None


def curve_panel(ax, runs: list[dict], title: str) -> None:
    """One panel: each run's held-out relative excess over Bayes against the step (log scale), a dot where its
    cooldown began, and the label's cuts 0.1 (learned) and 0.5 (not learned)."""
    for m in sorted(runs, key=lambda m: m["seed"]):
        curve, start = m["train"]["stop"]["heldout"], m["train"]["stop"].get("decay_from")
        label = m["curves"]["predictors"]["model"]["excess_bayes"]["learned"]
        line, = ax.plot([e["step"] for e in curve], [middle(e) for e in curve], lw=1,
                        label=f"seed {m['seed']} ({label})")
        if start:
            ax.plot([start], [held_out(m, start)], "o", color=line.get_color(), ms=4)
    for cut in (0.1, 0.5):
        ax.axhline(cut, color="grey", ls="--", lw=0.8)
    ax.set(yscale="log", xlabel="step", ylabel="held-out relative excess over Bayes", title=title)
    ax.legend(fontsize=6, ncol=2)


def plot(panels: dict[str, list[dict]], path: Path) -> None:
    """One :func:`curve_panel` per entry of ``panels`` (title: runs), side by side, saved to ``path``."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False,
                             layout="constrained")  # the panels' labels never overlap
    for ax, (title, runs) in zip(axes[0], panels.items()):
        curve_panel(ax, runs, title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default="results/reference/records/recipes-runs")
    parser.add_argument("--curves", type=Path, metavar="FIGURE.png", help="also draw each run's held-out curve")
    args = parser.parse_args(argv)
    rows, panels = [], {}
    for run in find_runs(Path(args.results)):
        try:
            metrics = read_run(run)
        except DamagedRun as exc:  # still training, or stopped by hand: said, not tabled
            print(f"({run.name}: {exc})", file=sys.stderr)
            continue
        rows.append(row(metrics))
        panels.setdefault(" ".join(rows[-1][:2]) + " (dots: cooldown begins)", []).append(metrics)
    print(tabulate(sorted(rows, key=lambda r: (r[0], r[1], r[2])),
                   headers=["task", "recipe", "seed", "stop", "flat at", "steps", "train s", "model error [95% CI]",
                            "bayes", "best baseline", "label", "learned at (held-out)"], tablefmt="github",
                   disable_numparse=True))
    if args.curves:
        plot(panels, args.curves)
        print(f"wrote {args.curves}", file=sys.stderr)


if __name__ == "__main__":
    main()
