"""MKL (torch's default CPU GEMM) against oneDNN (``torch.ops.mkldnn._linear_pointwise``, in the same wheel) on
the linear-layer shapes of gpt3l and gpt12l (batch 64 x 16 positions), alternating rounds, best of each.

    OMP_NUM_THREADS=1 python benchmarks/gemm_paths.py

Routing the models' linear layers through oneDNN pays only where MKL runs slower kernels than oneDNN
(reported on AMD CPUs, where MKL takes its AVX2 path); run this on the machine before deciding.
"""

import time

import torch


def gflops(fn, flops, n=30):
    fn(), fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return flops / ((time.perf_counter() - start) / n) / 1e9


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN "
          f"{'available' if torch.backends.mkldnn.is_available() else 'absent'}")
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


if __name__ == "__main__":
    main()
