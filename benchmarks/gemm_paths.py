"""MKL (torch's default CPU GEMM) against oneDNN (``torch.ops.mkldnn._linear_pointwise``, in the same wheel).

Two measurements, both alternating rounds in one process:

``gemms``: the linear-layer shapes of gpt3l and gpt12l (batch 64 x 16 positions), forward only, best of each::

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/gemm_paths.py gemms

``step`` (the default): a real training step of a model (the trainer's :func:`iclbench.step.train_step`,
forward, loss, backward, clipping, AdamW) with ``ICLBENCH_GEMM`` set to ``mkl``, ``onednn`` and ``auto``
(:mod:`iclbench.gemm`: the path measured per shape at first use, here with a fresh cache), and ``mkl`` again
(a second model: the noise floor), one model per path from the same initialisation, stepped in turn; the
ratio of the per-round times, median over rounds::

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/gemm_paths.py step --task affine --model gpt3l

Routing the models' linear layers through oneDNN pays only where MKL runs slower kernels than oneDNN
(reported on AMD CPUs, where MKL takes its AVX2 path); ``auto`` should never be slower than ``mkl``.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch


def gflops(fn, flops, n=30):
    fn(), fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return flops / ((time.perf_counter() - start) / n) / 1e9


def gemms():
    M = 64 * 16
    print("  M     K     N   MKL GFLOP/s  oneDNN GFLOP/s  oneDNN/MKL")
    for K, N in ((64, 192), (64, 256), (256, 64), (256, 768), (256, 1024), (1024, 256)):
        x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
        assert torch.allclose(torch.nn.functional.linear(x, w, b),
                              torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), atol=1e-4)
        mkl, dnn = [], []
        for _ in range(5):
            mkl.append(gflops(lambda: torch.nn.functional.linear(x, w, b), 2 * M * K * N))
            dnn.append(gflops(lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), 2 * M * K * N))
        print(f"{M:5d} {K:5d} {N:5d} {max(mkl):10.0f} {max(dnn):14.0f} {max(dnn) / max(mkl):11.2f}x")


def step(task: str, model: str, rounds: int, reps: int, overrides: list[str]):
    from iclbench import gemm
    from iclbench.bench import fixed_batches, training_step
    from iclbench.build import build
    from iclbench.config import resolve
    from iclbench.registry import get_registry

    cache = tempfile.mkdtemp(prefix="iclbench-gemm-")  # a fresh measurement, not the user's cache
    gemm.set_selector(gemm.Selector(cache))
    cfg = resolve(get_registry(), task=task, model=model, device="cpu", overrides=overrides)
    paths = ("mkl", "onednn", "auto", "mkl-again")  # mkl-again: a second MKL model, the noise floor (A/A)
    steps = {}
    for path in paths:
        t, m = build(get_registry(), cfg, torch.device("cpu"))
        steps[path] = training_step(m, t, cfg, fixed_batches(t, cfg.train.batch_size, torch.device("cpu")))

    def run(path):
        os.environ[gemm.ENV] = path.removesuffix("-again")
        start = time.perf_counter()
        for _ in range(reps):
            steps[path]()
        return (time.perf_counter() - start) / reps

    start = time.perf_counter()
    run("auto")  # the first use: measures every shape of the model (then from memory)
    first = time.perf_counter() - start
    for path in paths:
        run(path)
    times = {p: [] for p in paths}
    for r in range(rounds):
        for path in (paths if r % 2 == 0 else paths[::-1]):
            times[path].append(run(path))
    print(f"{cfg.task} x {cfg.model}, batch {cfg.train.batch_size}; {rounds} rounds x {reps} steps")
    for p in paths:
        print(f"  {p:9s} median {statistics.median(times[p]) * 1e3:7.2f} ms/step, "
              f"best {min(times[p]) * 1e3:7.2f}")
    for p in paths[1:]:
        ratio = statistics.median(m / o for m, o in zip(times["mkl"], times[p]))
        print(f"  speed {p}/mkl: {ratio:.3f}x (median over rounds of the per-round ratio)")
    print(f"  auto's first step, measuring included: {first * 1e3:.0f} ms; choices:")
    for key, choice in gemm.summary().items():
        print(f"    {key}: {choice}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="?", default="step", choices=("step", "gemms"))
    parser.add_argument("--task", default="affine")
    parser.add_argument("--model", default="gpt3l")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=10, help="steps per timing")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN "
          f"{'available' if torch.backends.mkldnn.is_available() else 'absent'}")
    if args.what == "gemms":
        gemms()
    else:
        step(args.task, args.model, args.rounds, args.reps, args.overrides)


if __name__ == "__main__":
    main()
