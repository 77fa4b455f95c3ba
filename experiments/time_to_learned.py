"""Issue 22's time-to-learned table: every built-in task × gpt3l, this project's recipe (each task's training
defaults) against Garg et al.'s (iclbench.learned.GARG), both until flat, one after the other in one process,
on one thread. Resumable: each task's rows are written to results/time-to-learned/<task>.json as it finishes,
and a task already there is skipped. The committed copies are under results/reference/records/time-to-learned.

    OMP_NUM_THREADS=1 taskset -c 1 python experiments/time_to_learned.py        # train what is missing
    python experiments/time_to_learned.py --table                                # the table in BENCHMARKS.md
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "time-to-learned"
RECORDS = ROOT / "results" / "reference" / "records" / "time-to-learned"
#: the cap of each training, by family: the recurrences are learned within a few hundred steps
CAPS = {"affine": 3000, "affine-vec": 3000, "linrec": 3000, "quadratic": 3000, "logistic": 3000, "poly": 3000,
        "relu-nn": 6000, "sparse-linreg": 6000, "decision-tree": 6000, "linreg": 6000}
MODEL = "gpt3l"


def measure(tasks):
    import torch

    from iclbench.learned import time_to_learned

    OUT.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        path = OUT / f"{task}.json"
        if path.exists():
            continue
        start, load = time.time(), os.getloadavg()
        rows = time_to_learned(task, MODEL, max_steps=CAPS[task], device="cpu")
        record = {"task": task, "model": MODEL, "max_steps": CAPS[task], "rows": rows,
                  "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
                             f"torch {torch.__version__}",
                  "loadavg_at_start": load, "loadavg_at_end": os.getloadavg(), "wall_s": time.time() - start}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
        print(f"{task}: {time.time() - start:.0f} s", flush=True)


def cell(v, spec):
    return "—" if v is None else format(v, spec)


def table():
    from tabulate import tabulate

    from iclbench.learned import ratio

    src = OUT if OUT.exists() else RECORDS
    rows = []
    for task in CAPS:
        path = src / f"{task}.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        by = {r["recipe"]: r for r in rec["rows"]}
        ours, garg = by["ours"], by["garg"]
        rows.append([
            task, f"{ours['lr']:g}/{ours['batch_size']}",
            f"{cell(ours['steps_to_learned'], 'd')} / {cell(ours['s_to_learned'], '.0f')} s",
            f"{cell(garg['steps_to_learned'], 'd')} / {cell(garg['s_to_learned'], '.0f')} s",
            ratio(garg, ours, "s_to_learned"),
            f"{ours['steps']} ({ours['stopped']})", f"{garg['steps']} ({garg['stopped']})",
            "[{:.3f}, {:.3f}]".format(*ours["final_relative_excess"]),
            "[{:.3f}, {:.3f}]".format(*garg["final_relative_excess"]), rec["max_steps"]])
    print(tabulate(rows, headers=["task", "ours: lr/batch", "ours: to learned (steps / s)",
                                  "Garg: to learned (steps / s)", "Garg ÷ ours (s to learned)", "ours: steps (stop)",
                                  "Garg: steps (stop)", "ours: final rel. excess", "Garg: final rel. excess", "cap"],
                   tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", action="store_true", help="print the table from the stored rows")
    p.add_argument("tasks", nargs="*", default=list(CAPS), help="tasks to measure (default: all, in order)")
    args = p.parse_args()
    unknown = [t for t in args.tasks if t not in CAPS]
    if unknown:
        sys.exit(f"time_to_learned.py: unknown task(s) {unknown}; allowed: {', '.join(CAPS)}")
    table() if args.table else measure(args.tasks)
