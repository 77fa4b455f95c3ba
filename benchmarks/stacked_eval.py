"""CPU seconds to evaluate the seeds of one stacked cell, with the baselines' predictions shared across its seeds
(one memo, as `run --seeds --stack yes` and a stacked sweep now do) and without (each seed scores them again):

    python benchmarks/stacked_eval.py relu-nn gpt2l --seeds 3 --sequences 1024

Each seed's model (untrained: the time does not depend on the weights) is scored as a run's evaluation scores it:
the main evaluation set, then every OOD shift. The two arms alternate (--rounds, default 2); process CPU time, one
torch thread. The machine is shared, so quote the ratio."""

import argparse
import time

import torch

from iclbench.build import build
from iclbench.config import resolve
from iclbench.evaluate import evaluation_batch, score
from iclbench.registry import get_registry
from iclbench.runner import evaluate_ood


def evaluate_cell(registry, cells, memo) -> float:
    started = time.process_time()
    for cfg, task, model in cells:
        batch = evaluation_batch(task, cfg.eval, torch.device("cpu"))
        baselines = {n: e.obj for n, e in registry.task_baselines(task).items()}
        score(model, baselines, task, batch, score_from=task.score_from, replicates=cfg.eval.bootstrap,
              confidence=cfg.eval.confidence, seed=cfg.eval.seed, warn=lambda m: None, memo=memo)
        evaluate_ood(model, task, registry, cfg, torch.device("cpu"), task.score_from, memo)
    return time.process_time() - started


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("task")
    ap.add_argument("model")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sequences", type=int, default=4096, help="eval.n_sequences")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    registry = get_registry()
    cells = []
    for seed in range(args.seeds):
        cfg = resolve(registry, task=args.task, model=args.model, seed=seed, device="cpu",
                      overrides={"eval.n_sequences": args.sequences})
        cells.append((cfg, *build(registry, cfg, torch.device("cpu"))))
    for round_ in range(args.rounds):
        alone, shared = evaluate_cell(registry, cells, None), evaluate_cell(registry, cells, {})
        print(f"{args.task} {args.model}, {args.seeds} seeds, {args.sequences} sequences, round {round_ + 1}: "
              f"each seed alone {alone:.1f} s, one memo {shared:.1f} s, ratio {alone / shared:.2f}x", flush=True)


if __name__ == "__main__":
    main()
