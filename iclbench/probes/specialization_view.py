"""The specialization probe's presentation: its part of each run's report section (per-layer table, the
claims' verdicts), the cross-run section with the tasks × models matrix and the answer at the top of the
report, the lines ``iclbench probe`` prints, what trackers record, and the ``iclbench specialization``
command. The science (what is measured, how a claim is decided) is in :mod:`iclbench.probes.specialization`;
this module only reads what it stored."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from iclbench import hookimpl
from iclbench.report import pyplot

from . import specialization
from .specialization import CLAIM_LABELS
from .stats import NA

#: the cross-run table's columns for both claims together and for refinement with depth
PATTERN, REFINES = CLAIM_LABELS[3], CLAIM_LABELS[4]


class Specialization(specialization.Specialization):
    """The specialization probe as registered: :class:`iclbench.probes.specialization.Specialization` with
    its presentation (:class:`iclbench.Probe`'s presentation methods)."""

    @classmethod
    def report_section(cls, doc, table, summary, run):
        doc.heading(f"{cls.name}: {cls.description}", level=3)
        doc.text("Per layer: the nearest algorithm, the tuned-lens error, the refinement across the layer (with "
                 "its interval) and the copy regression of the layer's direct write (iclbench/probes/"
                 "specialization.py):")
        doc.table(table)
        try:
            verdicts = verdict_table(summary)
        except (KeyError, TypeError, IndexError, AttributeError):
            return  # no summary stored (or an older one): the table above is all there is
        doc.text("The claims, each read from an interval against its criterion, and how the verdict moves when "
                 "the criterion moves:")
        doc.table(verdicts)

    @classmethod
    def cross_run_section(cls, doc, table, runs):
        doc.heading("Does early-copy / late-refine generalize?")
        doc.text("Per task × model: each layer's most common nearest algorithm over seeds; each claim's labels "
                 "over seeds (holds / fails / inconclusive, each from an interval over probe sequences; n/a: the "
                 "task cannot test it, never a failure); and key numbers as the mean over training seeds with a "
                 "95% bootstrap interval over seeds, labelled against the probe's criterion.")
        doc.figure(specialization_figure(table), "specialization", "Specialization matrix across tasks × models.")
        doc.table(table)
        return answer_lines(table, runs)

    @classmethod
    def tracker_summary(cls, summary):
        out = {}
        for key in ("claim_1", "claim_2", "refines_with_depth"):
            verdict = (summary.get(key) or {}).get("verdict") if isinstance(summary.get(key), dict) else None
            if verdict is not None:
                out[key] = str(verdict)
        roles = summary.get("roles")
        if isinstance(roles, list):
            out["roles"] = ", ".join(f"L{i}: {r}" for i, r in enumerate(roles))
        return out

    @classmethod
    def terminal_lines(cls, summary):
        c1, c2, refine = summary["claim_1"], summary["claim_2"], summary["refines_with_depth"]
        return [f"nearest algorithm per layer: {', '.join(f'{l}: {r}' for l, r in enumerate(summary['roles']))}",
                f"refines with depth: {refine['verdict']} (relative gain first → last block "
                f"{_ci(refine['relative_gain'])}); claim 1 (layer 0 copies): {c1['verdict']}"
                + (f" (copy dominance {_ci(c1['copy_dominance'])})" if "copy_dominance" in c1 else "")
                + f"; claim 2 (last layer refines via negative-similarity heads): {c2['verdict']} "
                  f"(any later layer: {c2['any_later_layer']})"]


def _ci(estimate: dict) -> str:
    lo, hi = estimate["ci"]
    return f"{estimate['mean']:.3g} [{lo:.3g}, {hi:.3g}]" if None not in (estimate["mean"], lo, hi) else "—"


def _label(cell) -> str:
    """'holds 3/4 (fails 1)' -> 'holds'."""
    return str(cell).split()[0] if isinstance(cell, str) and cell.strip() else NA


def answer_lines(table: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """The report's first lines: the specialization answer, most common label over seeds, read from learned
    cells only (``runs.learned``, the Bayes-excess label of each run)."""
    if table.empty or PATTERN not in table:
        return []

    def counts(labels):
        c = pd.Series([_label(v) for v in labels]).value_counts()
        return ", ".join(f"{k} in {v}" for k, v in c.items())

    cells = f"{len(table)} task × model cell" + ("s" if len(table) != 1 else "")
    lines = [f"**The answer** (specialization probe, most common label over seeds, {cells}): the seed paper's "
             f"early-copy / late-refine pattern {counts(table[PATTERN])}; refinement with depth "
             f"{counts(table[REFINES])}."]
    if runs.empty:
        return lines
    learned = {str(Path(r).resolve()): v for r, v in zip(runs.run, runs.learned)}
    keep = []
    for task, model in zip(table["task"], table["model"]):
        cell = runs[(runs.task == task) & (runs.model == model)].run
        keep.append(bool(len(cell)) and all(learned.get(str(Path(r).resolve())) == "learned" for r in cell))
    learned_cells = table[keep]
    lines.append(f"Only learned cells are evidence: {len(learned_cells)} of {cells} had every seed learn its task"
                 + (f"; among them the pattern {counts(learned_cells[PATTERN])}." if len(learned_cells)
                    else "; none says how a model solves its task."))
    return lines


PATTERN_COLOURS = {"holds": "#9bd39b", "inconclusive": "#f3dc8a", "fails": "#ee9b9b"}


def specialization_figure(table: pd.DataFrame):
    """Tasks × models matrix: each cell lists the nearest algorithm of every layer (most common over seeds)
    and the verdicts, and is coloured by the seed paper's pattern (both claims) where the task can test it,
    else by "refines with depth": holds (green), inconclusive (yellow), fails (red), by the most common label
    over seeds."""
    plt = pyplot()
    # rows by model (name + model options); training settings a task chose for itself do not split a row
    table = table.assign(model=[" ".join(t for t in m.split() if not t.startswith("train.")) for m in table.model])
    tasks, models = sorted(table.task.unique()), sorted(table.model.unique())
    layer_cols = [c for c in table.columns if c.startswith("layer ")]
    fig, ax = plt.subplots(figsize=(2.6 * len(tasks) + 1.5, 0.34 * (len(layer_cols) + 2) * len(models) + 1.2))
    for i, model in enumerate(models):
        for j, task in enumerate(tasks):
            row = table[(table.model == model) & (table.task == task)]
            if row.empty:
                text, colour = "—", "#eeeeee"
            else:
                r = row.iloc[0]
                roles = [f"L{c.split()[1]}: {r[c]}" for c in layer_cols if isinstance(r[c], str) and r[c] != "—"]
                pattern, refines = str(r.get(PATTERN, NA)), str(r.get(REFINES, NA))
                text = "\n".join(roles + [f"paper: {pattern}", f"refines: {refines}"])
                deciding = pattern if pattern != NA else refines
                colour = PATTERN_COLOURS.get(deciding.split()[0], "#dddddd")
            ax.add_patch(plt.Rectangle((j, i), 1, 1, facecolor=colour, edgecolor="white", lw=2))
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=9)
    ax.set_xlim(0, len(tasks))
    ax.set_ylim(len(models), 0)
    ax.set_xticks([j + 0.5 for j in range(len(tasks))], tasks, rotation=20)
    ax.set_yticks([i + 0.5 for i in range(len(models))], models)
    ax.set_xlabel("task")
    ax.set_ylabel("model")
    ax.set_title("Nearest algorithm per layer across tasks × models;\ncolour: the seed paper's pattern (else "
                 "refinement with depth)\nholds / inconclusive / fails in most seeds", fontsize=9)
    return fig


def verdict_table(summary: dict) -> pd.DataFrame:
    """The specialization probe's claims: verdict, the statistic behind it with its interval, the criterion,
    and the verdict at other criteria (how a label moves when its cut moves)."""
    def ci(e):
        return f"{e['mean']:.3g} [{e['ci'][0]:.3g}, {e['ci'][1]:.3g}]" if e and None not in (e["mean"], *e["ci"]) else "—"

    def moves(sweep):
        return ", ".join(f"{k}: {v}" for k, v in sweep.items())

    rows = []
    refine = summary["refines_with_depth"]
    rows.append({"claim": "refines with depth (lens error, first → last block, relative drop)",
                 "verdict": refine["verdict"], "statistic": ci(refine["relative_gain"]),
                 "criterion": f"> {refine['criterion']}", "at other criteria": moves(refine.get("sweep", {}))})
    c1 = summary["claim_1"]
    rows.append({"claim": "1: layer 0 copies (copy coefficient over the largest other, in its write)", "verdict": c1["verdict"],
                 "statistic": ci(c1.get("copy_dominance")), "criterion": f"> {c1['criterion']}",
                 "at other criteria": moves(c1.get("sweep", {}))})
    last = summary["layers"][-1] if summary["layers"] else {}
    rows.append({"claim": "2: last layer refines via negative-similarity heads", "verdict": summary["claim_2"]["verdict"],
                 "statistic": f"heads {' '.join(last.get('negative_heads', [])) or 'none'}; ablation cost "
                              f"{ci(last.get('ablation_cost'))}",
                 "criterion": f"refines > {summary['criteria']['refine_margin']}, cost > "
                              f"{summary['criteria']['ablation_margin']}",
                 "at other criteria": moves(last.get("ablation_sweep", {}))})
    return pd.DataFrame(rows)


# --- iclbench specialization ----------------------------------------------------------------------------

@hookimpl
def iclbench_add_commands(subparsers):
    s = subparsers.add_parser("specialization", help="role per layer and the seed paper's claims, tasks x models")
    s.add_argument("--results", default="results", help="results directory (default: results)")
    s.add_argument("--format", default="github", choices=("github", "plain", "csv", "json", "latex"))
    s.set_defaults(iclbench_command=specialization_command)


def specialization_command(args) -> int:
    """``iclbench specialization``: the probe's cross-run table over every run under ``--results``."""
    from iclbench.cli import results_dir
    from iclbench.probing import cross_run

    print(cross_run(results_dir(args.results), Specialization.name, args.format))
    return 0
