"""decision-tree: every baseline, scikit-learn's gradient boosting included, on the default task.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/trees_baselines.py --sequences 256

prints each baseline's normalized error (mean over the scored positions, k >= 1 examples seen) and wall time;
``--out FILE`` also writes the per-position curves as JSON. Needs ``pip install 'iclbench[trees]'`` for
gradient_boosting (one fit per sequence and prefix: ~35 ms each on an idle core)."""

import argparse
import json
import time

import torch

from iclbench.tasks.trees import DecisionTreeRegression, TreeOptions


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--out")
    args = ap.parse_args()
    task = DecisionTreeRegression(TreeOptions(sklearn=True))
    batch = task.sample(args.sequences, torch.Generator().manual_seed(args.seed))
    norm = task.normalizer()[batch.mask]
    out = {}
    for name, fn in task.baselines().items():
        start = time.time()
        err = ((fn(batch) - batch.targets) ** 2)[..., 0][:, batch.mask].mean(0) / norm
        out[name] = {"mean_k>=1": round(float(err[1:].mean()), 4), "by_k": [round(v, 4) for v in err.tolist()],
                     "seconds": round(time.time() - start, 1)}
        print(f"{name:20s} {out[name]['mean_k>=1']:.3f}  {out[name]['seconds']:8.1f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
