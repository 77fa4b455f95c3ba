"""The released reference models: seed 0 of each task × model configuration found under the results
directories given, exported (``iclbench export``: weights in float16, resolved config, manifest) into
results/reference/models/, with a README.md index table, so that a researcher probes trained models without
training (``iclbench probe results/reference/models/<name>``, ``iclbench.load``).

    python experiments/reference_models.py RESULTS_DIR... [--out results/reference/models] [--model gpt3l ...]

Incomplete runs (still training, interrupted, failed, unstable) and runs without weights (compact records) are
skipped with a line each; a configuration present in several results directories is exported once. Rerunning
replaces each export and rebuilds the index from every export in the folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tabulate import tabulate

from iclbench import store
from iclbench.errors import ICLBenchError
from iclbench.export import STORAGE_DTYPE, describe_export, export_run, is_export, read_manifest
from iclbench.rundir import distinct_runs, find_runs

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "reference" / "models"


def candidates(results_dirs, seed: int = 0, models=None) -> tuple[list[Path], list[str]]:
    """The run directories to export (seed ``seed``, complete, with weights; one per configuration) and a
    line for each run skipped."""
    chosen, skipped = [], []
    runs = distinct_runs([run for results in results_dirs for run in find_runs(Path(results))])
    for run in runs:
        try:
            metrics = store.read_run(run)
        except store.DamagedRun as exc:
            skipped.append(f"{run}: {exc}")
            continue
        if metrics["seed"] != seed or (models and metrics["model"] not in models):
            continue
        if store.unstable_reason(metrics):
            skipped.append(f"{run}: unstable ({store.unstable_reason(metrics)})")
        elif not (run / store.CHECKPOINT).is_file():
            skipped.append(f"{run}: no {store.CHECKPOINT} (a compact record)")
        else:
            chosen.append(run)
    return chosen, skipped


def index(out: Path) -> str:
    """README.md of the folder: one row per exported model in it."""
    rows, total = [], 0
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and is_export(p)):
        m = read_manifest(folder)
        total += m["bytes"]
        error = m["error"]
        rows.append([m["label"]["task"], m["model"], m["label"]["model"].removeprefix(m["model"]).strip(),
                     m["steps"], m["stop"], f"{error['mean']:.4f} [{error['ci'][0]:.4f}, {error['ci'][1]:.4f}]",
                     f"{m['reevaluated']['stored']['mean']:.4f}", m["learned"] or "—", m["dtype"],
                     f"{m['bytes'] / 1024:.0f} KB", f"[{m['name']}]({m['name']}/)"])
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    table = tabulate(rows, headers=["task", "model", "settings", "steps", "stop", "error [95% CI]",
                                    "error (stored weights)", "label", "dtype", "size", "folder"],
                     tablefmt="github", disable_numparse=True)
    return f"""# Reference models

Trained models, seed 0 of each task × model, exported from finished runs by `experiments/reference_models.py`
(`iclbench export`): per folder the weights (`model.safetensors`, {STORAGE_DTYPE} unless the rounding moved the
error beyond the tolerance), the run's resolved `config.yaml` and `manifest.json` (task, model, seed, config hash,
steps, why training stopped, the run's headline error and learned label, that error re-evaluated on the stored
weights, the source commit). Probe one without training:

    iclbench probe results/reference/models/<folder>                  # printed; this folder is never written to
    iclbench probe results/reference/models/<folder> --out probes/X   # probes.json and the tables in probes/X

or open it in Python: `iclbench.load("results/reference/models/<folder>")` (config, task, model; `manifest`).
`iclbench run --config results/reference/models/<folder>/config.yaml --out results` retrains it.

error: the run's normalized error (mean over the scored positions, 95% bootstrap interval over the evaluation
sequences; 1.0 = the prior mean), as recorded by the run; error (stored weights): re-evaluated on the CPU from the
exported weights. stop: flat (the held-out error stopped improving), cap (train.max_steps) or steps (a fixed
count). label: the run's learned label (docs/probes.md). {len(rows)} models, {total / 2 ** 20:.1f} MB in all.

{table}
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results directories holding finished runs")
    p.add_argument("--out", default=str(OUT), help="folder of the exports (default: results/reference/models)")
    p.add_argument("--seed", type=int, default=0, help="the seed exported (default 0)")
    p.add_argument("--model", action="append", help="only this model (repeatable)")
    args = p.parse_args(argv)
    chosen, skipped = candidates(args.results, args.seed, args.model)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    out = Path(args.out)
    try:
        for run in chosen:
            print(describe_export(export_run(run, out), out / run.name))
        if out.is_dir():
            store.write_atomic(out / "README.md", index(out))
    except ICLBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(chosen)} exported into {out} ({len(skipped)} skipped); index: {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
