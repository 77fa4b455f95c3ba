"""CPU seconds of one probe on a saved run, one torch thread:
    python benchmarks/probe_cost.py RUN_DIR [--probe specialization]
Run it alternately against two checkouts (PYTHONPATH=OTHER_CHECKOUT python benchmarks/probe_cost.py RUN_DIR) to
compare code versions; the machine is shared, so quote ratios."""

import argparse
import time

import torch

from iclbench.probing import run_probes

try:
    from iclbench.rundir import load_run
except ImportError:  # a checkout from before the run-directory object (commit 40386db and earlier)
    from iclbench.runner import load_run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--probe", default="specialization")
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, task, model = load_run(args.run)
    started = time.process_time()
    run_probes(model, task, [args.probe], seed=0, device="cpu")
    print(f"{args.probe}: {time.process_time() - started:.2f} s CPU ({__import__('iclbench').__file__})")


if __name__ == "__main__":
    main()
