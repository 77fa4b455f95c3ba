"""Are the specialization verdicts stable? Re-probe trained runs with several probe seeds and print every
label and the statistic behind it, one line per (run, probe seed), plus the CPU time of each probe.

    python benchmarks/probe_stability.py RUN_DIR [RUN_DIR ...] [--seeds 1-5]

A verdict that flips between probe seeds, or between two runs that differ only in the torch thread count
they were trained with, is not a finding; this script is how the stability figures in results/reference/README.md were measured.
"""

from __future__ import annotations

import argparse
import time

import torch

from iclbench.probing import run_probes
from iclbench.rundir import load_run


def ci(e):
    return f"{e['mean']:.3g} [{e['ci'][0]:.3g}, {e['ci'][1]:.3g}]" if e and None not in (e["mean"], *e["ci"]) else "—"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--seeds", default="1-5")
    args = parser.parse_args()
    lo, hi = (int(v) for v in args.seeds.split("-"))
    for run_dir in args.runs:
        cfg, task, model = load_run(run_dir)
        labels = set()
        for seed in range(lo, hi + 1):
            started = time.process_time()
            out = run_probes(model, task, ["specialization"], seed=seed, device="cpu")["specialization"]
            cpu = time.process_time() - started
            s = out["summary"]
            last = s["layers"][-1]
            label = (s["claim_1"]["verdict"], s["claim_2"]["verdict"], s["claim_2"]["any_later_layer"],
                     s["refines_with_depth"]["verdict"], tuple(s["roles"]))
            labels.add(label)
            print(f"{run_dir} probe-seed {seed}: claim1 {label[0]} (copy coefficient "
                  f"{ci(s['claim_1'].get('coefficients', {}).get('copy'))}, variance share "
                  f"{ci(s['claim_1'].get('variance_share'))}); claim2 {label[1]} "
                  f"(any later {label[2]}; L{last['layer']} refinement {ci(last['refinement'])}, negative heads "
                  f"{last.get('negative_heads')}, similarity removal cost {ci(last.get('similarity_removal_cost'))}); refines with depth "
                  f"{label[3]} ({ci(s['refines_with_depth']['relative_gain'])}); roles {list(label[4])}; model error "
                  f"{ci(s['model_error'])}; {cpu:.1f} s CPU", flush=True)
            for e in s["layers"]:
                if "copy" in e:
                    c = e["copy"]
                    print(f"    L{e['layer']} write: copy {ci(c['copy'])} previous {ci(c['previous'])} answer "
                          f"{ci(c['answer'])}; lens error {ci(e['lens_error'])}; similarity "
                          f"{ {h: (v['label'], v['effect']['mean']) for h, v in e.get('similarity_heads', {}).items()} }")
        print(f"{run_dir}: {len(labels)} distinct label set(s) over probe seeds {args.seeds}", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
