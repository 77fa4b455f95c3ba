"""The specialization probe's presentation: its part of each run's report section (per-layer table, the
claims' verdicts), the cross-run section with the tasks × models matrix and the answer at the top of the
report, the lines ``iclbench probe`` prints, what trackers record, and the ``iclbench specialization``
command. The science (what is measured, how a claim is decided) is in :mod:`iclbench.probes.specialization`;
this module only reads what it stored."""

from __future__ import annotations

import sys

from pathlib import Path

import pandas as pd

from iclbench import hookimpl
from iclbench.report import pyplot

from . import specialization
from .specialization import CLAIM_LABELS, PAPER_LAYER
from .stats import NA

#: the cross-run table's columns for both claims together and for refinement with depth
PATTERN, REFINES = CLAIM_LABELS[3], CLAIM_LABELS[4]
#: the narrow table for a paper (``iclbench specialization --table paper``, LaTeX's default); the rest in CSV
PAPER_COLUMNS = ("task", "model", "seeds", "learned", PATTERN, REFINES, "model error")


class Specialization(specialization.Specialization):
    """The specialization probe as registered: :class:`iclbench.probes.specialization.Specialization` with
    its presentation (:class:`iclbench.Probe`'s presentation methods)."""

    @classmethod
    def report_section(cls, doc, table, summary, run):
        doc.heading(f"{cls.name}: {cls.description}", level=3)
        doc.text("Per layer: the role (the nearest algorithm, where the read-out beats untrained controls), the "
                 "tuned-lens, direct and control errors, the refinement of reducible error across the layer (with "
                 "its interval) and the copy test of the layer's direct write (iclbench/probes/specialization.py):")
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
                 "95% Student-t interval over seeds, labelled against the probe's criterion.")
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
        gain = summary["refines_with_depth"]["relative_gain"]
        return [f"role per layer (selective lens; none = no better than untrained controls): "
                f"{', '.join(f'{l}: {r}' for l, r in enumerate(summary['roles']))}",
                f"refines with depth: {summary['refines_with_depth']['verdict']} (reducible error, first → last block "
                f"{_ci(gain)}); claim 1 (layer 0 copies y_t): {summary['claim_1']['verdict']}; claim 2 (layer 2 refines "
                f"through negative-similarity attention): {summary['claim_2']['verdict']} (any later layer: "
                f"{summary['claim_2']['any_later_layer']})"]


def _ci(e) -> str:
    return f"{e['mean']:.3g} [{e['ci'][0]:.3g}, {e['ci'][1]:.3g}]" if e and None not in (e["mean"], *e["ci"]) else "—"


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
    """The claims of one model: verdict, the statistic behind it with its interval, the criterion, and the
    verdict at other criteria (how a label moves when its cut moves)."""
    def moves(sweep):
        return ", ".join(f"{k}: {v}" for k, v in sweep.items())

    crit = summary["criteria"]
    refine = summary["refines_with_depth"]
    rows = [{"claim": "refines with depth (selective lens, reducible error, first → last block, relative drop)",
             "verdict": refine["verdict"],
             "statistic": f"{_ci(refine['relative_gain'])} (untrained controls: {_ci(refine['control_relative_gain'])})",
             "criterion": f"> {refine['criterion']}", "at other criteria": moves(refine.get("sweep", {}))}]
    c1 = summary["claim_1"]
    coef = c1.get("coefficients", {})
    rows.append({"claim": "1: layer 0's write is a copy of y_t (form and size)", "verdict": c1["verdict"],
                 "statistic": (f"copy {_ci(coef['copy'])}, previous {_ci(coef['previous'])}, answer "
                               f"{_ci(coef['answer'])}; variance share {_ci(c1['variance_share'])}") if coef else "—",
                 "criterion": f"coefficients within {crit['copy_tolerance']} of (1, 0, 0); share > {crit['size_margin']}",
                 "at other criteria": moves(c1.get("sweep", {}))})
    layers = summary["layers"]
    for name, entry in (("the paper's layer 2", layers[PAPER_LAYER] if len(layers) > PAPER_LAYER else None),
                        ("the last layer", layers[-1] if len(layers) > 1 else None)):
        if entry is None:
            continue
        rows.append({"claim": f"2: {name} (L{entry['layer']}) refines through negative-similarity attention",
                     "verdict": entry.get("claim_2", NA),
                     "statistic": f"heads {' '.join(entry.get('negative_heads', [])) or 'none'}; attention moved "
                                  f"{_ci(entry.get('attention_moved'))}; excess rise without the similarity "
                                  f"{_ci(entry.get('similarity_removal_cost'))} (whole head: "
                                  f"{_ci(entry.get('head_ablation_cost'))})",
                     "criterion": f"refines > {crit['refine_margin']}, moved > {crit['pattern_margin']}, rise > "
                                  f"{crit['ablation_margin']} × excess (floor {crit['excess_floor']})",
                     "at other criteria": moves(entry.get("ablation_sweep", {}))})
    return pd.DataFrame(rows)


# --- iclbench specialization ----------------------------------------------------------------------------

#: what the table's numbers are (printed on stderr above it): the same interval kind as the leaderboard's ±
CAPTION = ("Numbers: mean over training seeds [95% Student-t interval over seeds]. 'model error' is each run's "
           "evaluation error, the leaderboard's number, whose ± is the half-width of this same interval; the "
           "other numbers are measured on the probe sequences. Labels: each seed's verdict (from an interval over "
           "probe sequences), counted over seeds.")

@hookimpl
def iclbench_add_commands(subparsers):
    s = subparsers.add_parser("specialization", help="role per layer and the seed paper's claims, tasks x models")
    s.add_argument("--results", default="results", help="results directory (default: results)")
    s.add_argument("--format", default="github", choices=("github", "markdown", "plain", "csv", "json", "latex"))
    s.add_argument("--table", choices=("full", "paper"), help="full: every column (roles per layer, each claim, "
                   "key numbers); paper: " + ", ".join(PAPER_COLUMNS) + " (default: paper for --format latex, "
                   "else full)")
    s.set_defaults(iclbench_command=specialization_command)


def specialization_command(args) -> int:
    """``iclbench specialization``: the probe's cross-run table over every run under ``--results``."""
    from iclbench.cli import results_dir
    from iclbench.probing import cross_run

    narrow = (args.table or ("paper" if args.format == "latex" else "full")) == "paper"
    if args.format not in ("csv", "json"):  # on stderr, as the leaderboard's --compare caption: stdout pastes as is
        print(CAPTION, file=sys.stderr)
    print(cross_run(results_dir(args.results), Specialization.name, args.format,
                    columns=PAPER_COLUMNS if narrow else None))
    return 0
