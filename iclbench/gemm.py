"""The CPU GEMM of the models' linear layers: MKL (torch's default) or oneDNN, whichever is faster here.

torch's CPU wheel carries two GEMM libraries. ``F.linear`` runs MKL, which on AMD CPUs takes its AVX2 kernels;
oneDNN (``torch.ops.mkldnn._linear_pointwise``, same wheel) can be faster there (a gpt3l trained 1.28x faster
at one thread on the project's AMD EPYC machines), and is slower on some Intel CPUs. So the path is chosen by
measurement: at the first use of a shape ``(M, K, N, threads)`` in training, the three GEMMs of a linear
layer (forward ``x W^T``, input gradient ``g W``, weight gradient ``g^T x``) are each timed both ways in
alternating rounds; where oneDNN wins one of them by :data:`MARGIN`, the whole layer (forward and backward
through :class:`_Linear`, an ``autograd.Function``) is timed against plain ``F.linear`` and kept only if it
wins by the margin too. A shape used without autograd (evaluation, probes) is a separate entry for which only
the forward GEMM is timed. Ties go to MKL, so nothing changes where oneDNN does not clearly pay.

The choice is kept in memory and on disk, one JSON file per machine (CPU model, torch version, the
environment variables that steer MKL's and oneDNN's kernels) under the user's cache directory
(``$ICLBENCH_GEMM_CACHE``, else ``$XDG_CACHE_HOME/iclbench``, else ``~/.cache/iclbench``); never inside a
run or the repository. An unwritable directory or a corrupt file only means measuring again.

``ICLBENCH_GEMM=auto|mkl|onednn`` (default ``auto``) forces a path. oneDNN is never used off the CPU, for
other dtypes than float32, under autocast, ``torch.compile`` or ``torch.func`` transforms (``vmap`` of
stacked seeds) or forward-mode AD, or where oneDNN is absent or disabled: ``F.linear`` there (and a double
backward runs the MKL ops, which are differentiable).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ICLBenchError

ENV = "ICLBENCH_GEMM"
CACHE_ENV = "ICLBENCH_GEMM_CACHE"
MODES = ("auto", "mkl", "onednn")
#: oneDNN is chosen only where it is at least this much faster (a relative margin on the best time)
MARGIN = 0.10
#: alternating timing rounds per candidate
ROUNDS = 5
#: environment variables that change which kernels MKL or oneDNN run (part of the machine's key)
KERNEL_ENV = ("MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA",
              "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
CACHE_VERSION = 1

#: ``timer(fn, label) -> seconds`` for one timing of ``fn``; ``label`` is ``(what, path)``, e.g.
#: ``("forward", "onednn")`` or ``("layer", "mkl")`` (what a test's fake timer answers by)
Timer = Callable[[Callable[[], object], tuple[str, str]], float]


def mode() -> str:
    """``ICLBENCH_GEMM``: ``auto`` (default), ``mkl`` or ``onednn``."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ICLBenchError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


@dataclass(frozen=True)
class Choice:
    """Which GEMMs of one linear layer run on oneDNN (True) rather than MKL."""
    forward: bool = False
    grad_input: bool = False
    grad_weight: bool = False

    @property
    def any(self) -> bool:
        return self.forward or self.grad_input or self.grad_weight


MKL = Choice()
ONEDNN = Choice(True, True, True)


def _dnn(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``a @ w.T (+ b)`` through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")


def _forward(x2, w, b, dnn: bool):
    return _dnn(x2, w, b) if dnn else F.linear(x2, w, b)


def _grad_input(g, w, dnn: bool):
    return _dnn(g, w.t(), None) if dnn else g.mm(w)


def _grad_weight(g, x2, dnn: bool):
    return _dnn(g.t(), x2.t(), None) if dnn else g.t().mm(x2)


class _Linear(torch.autograd.Function):
    """``F.linear`` on 2-D ``x`` with each of its three GEMMs on the path ``choice`` names."""

    @staticmethod
    def forward(ctx, x2, weight, bias, choice: Choice):
        ctx.save_for_backward(x2, weight)
        ctx.choice, ctx.has_bias = choice, bias is not None
        return _forward(x2, weight, bias, choice.forward)

    @staticmethod
    def backward(ctx, g):
        x2, weight = ctx.saved_tensors
        g = g.contiguous()
        # with create_graph (double backward) the differentiable MKL ops, so the graph is recorded
        dnn = ctx.choice if not torch.is_grad_enabled() else MKL
        gx = _grad_input(g, weight, dnn.grad_input) if ctx.needs_input_grad[0] else None
        gw = _grad_weight(g, x2, dnn.grad_weight) if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN may take this call at all (else plain ``F.linear``)."""
    if not (x.is_cpu and weight.is_cpu) or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1):
        return False
    if x.dim() < 2 or weight.dim() != 2 or x.numel() == 0 or x.layout != torch.strided \
            or weight.layout != torch.strided:
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:  # vmap / grad / jvp of torch.func
        return False
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:  # forward-mode AD: no jvp here
        return False
    return torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear``, with the CPU GEMMs on the faster library (see the module's doc)."""
    which = mode()
    if which == "mkl" or not x.is_cpu or x.dtype != torch.float32 or x.dim() < 2:
        return F.linear(x, weight, bias)
    K, N = x.shape[-1], weight.shape[0]
    M = x.numel() // K if K else 0
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    if which == "auto":  # the common case first: a shape already measured, MKL's
        choice = selector().known.get((M, K, N, torch.get_num_threads(), grad))
        if choice is not None and not choice.any:
            return F.linear(x, weight, bias)
    if not eligible(x, weight, bias):
        return F.linear(x, weight, bias)
    x2 = x.reshape(M, K)
    choice = ONEDNN if which == "onednn" else selector().choose(M, K, N, x2, weight, bias, grad)
    if not choice.any:
        return F.linear(x, weight, bias)
    x2 = x2.contiguous()
    y = _Linear.apply(x2, weight, bias, choice) if grad else _forward(x2, weight, bias, choice.forward)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], N)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict names) whose forward is :func:`linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)


# ---------------------------------------------------------------------------------------------- selection


def default_timer(fn: Callable[[], object], label: tuple[str, str]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_key() -> dict:
    """What the measurements hold for: the CPU, torch (hence its MKL and oneDNN) and the kernel switches."""
    return {"cpu": cpu_model(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(),
            "env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iclbench"


class Selector:
    """Chooses, caches and remembers the path per shape for one machine."""

    def __init__(self, cache_dir: str | Path | None = None, timer: Timer | None = None,
                 rounds: int = ROUNDS, margin: float = MARGIN):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.timer, self.rounds, self.margin = timer or default_timer, rounds, margin
        self.machine = machine_key()
        digest = hashlib.sha256(json.dumps(self.machine, sort_keys=True).encode()).hexdigest()[:16]
        self.path = self.cache_dir / f"gemm-{digest}.json"
        self.choices: dict[str, Choice] = {}  # by :meth:`key`, as in the file
        self.known: dict[tuple, Choice] = {}  # (M, K, N, threads, backward): those used in this process
        self.times: dict[str, dict] = {}
        self._loaded = False
        self._lock = threading.Lock()

    @staticmethod
    def key(M: int, K: int, N: int, threads: int, backward: bool = True) -> str:
        """``MxKxN@Tt`` for a layer trained (forward and backward timed), ``.../forward`` for inference."""
        return f"{M}x{K}x{N}@{threads}t{'' if backward else '/forward'}"

    def choose(self, M: int, K: int, N: int, x2: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, backward: bool = True) -> Choice:
        """The choice for this shape at the current thread count, for a layer that is trained (``backward``)
        or only run forward: from memory, else the file, else measured now (on copies of ``x2``, ``weight``
        and ``bias``)."""
        threads = torch.get_num_threads()
        choice = self.known.get((M, K, N, threads, backward))
        if choice is not None:
            return choice
        key = self.key(M, K, N, threads, backward)
        with self._lock:
            if not self._loaded:
                self.choices.update(self.load())
                self._loaded = True
            if key not in self.choices:
                self.choices[key], self.times[key] = self.measure(x2, weight, bias, backward)
                self.save(key)
            self.known[(M, K, N, threads, backward)] = self.choices[key]
            return self.choices[key]

    # -- measuring

    def _best(self, what: str, candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
        """The best time per call of each candidate over :attr:`rounds` alternating rounds (3 where a call
        takes over 5 ms), after one warm-up call each (a timing repeats a call of a few microseconds until it
        lasts about 50 us, as many times for both)."""
        warm = []
        for fn in candidates.values():
            start = time.perf_counter()
            fn()
            warm.append(time.perf_counter() - start)
        reps = max(1, min(20, int(5e-5 / max(min(warm), 1e-7))))
        rounds = self.rounds if min(warm) < 5e-3 else min(self.rounds, 3)  # a big GEMM: fewer, long rounds
        if reps > 1:
            candidates = {name: (lambda fn=fn: [fn() for _ in range(reps)]) for name, fn in candidates.items()}
        best = {name: math.inf for name in candidates}
        names = list(candidates)
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                best[name] = min(best[name], self.timer(candidates[name], (what, name)) / reps)
        return best

    def _wins(self, t: dict[str, float]) -> bool:
        return t["onednn"] < (1 - self.margin) * t["mkl"]

    def measure(self, x2, weight, bias, backward: bool = True) -> tuple[Choice, dict]:
        """Time the forward GEMM both ways; for a layer that is trained also the two backward GEMMs and,
        where oneDNN wins one of the three, the layer's forward and backward (on copies: the first use may
        come under ``no_grad`` or ``inference_mode``)."""
        with torch.inference_mode(False), torch.no_grad():
            x2 = x2.detach().clone(memory_format=torch.contiguous_format)
            weight, bias = weight.detach().clone(), bias.detach().clone() if bias is not None else None
            if not backward:
                t = self._best("forward", {"mkl": lambda: _forward(x2, weight, bias, False),
                                           "onednn": lambda: _forward(x2, weight, bias, True)})
                return Choice(forward=self._wins(t)), {"forward": {p: round(v * 1e6, 1) for p, v in t.items()}}
            return self._measure(x2, weight, bias)

    def _measure(self, x2, weight, bias) -> tuple[Choice, dict]:
        gen = torch.Generator().manual_seed(0)  # not the global generator: training's stream is untouched
        g = torch.randn(x2.shape[0], weight.shape[0], generator=gen)
        times = {
            "forward": self._best("forward", {p: (lambda d=d: _forward(x2, weight, bias, d))
                                              for p, d in (("mkl", False), ("onednn", True))}),
            "grad_input": self._best("grad_input", {p: (lambda d=d: _grad_input(g, weight, d))
                                                    for p, d in (("mkl", False), ("onednn", True))}),
            "grad_weight": self._best("grad_weight", {p: (lambda d=d: _grad_weight(g, x2, d))
                                                      for p, d in (("mkl", False), ("onednn", True))}),
        }
        choice = Choice(*(self._wins(times[k]) for k in ("forward", "grad_input", "grad_weight")))
        if choice.any:  # the whole layer, autograd's overhead included, must pay too
            xs, ws = x2.clone().requires_grad_(), weight.clone().requires_grad_()
            bs = bias.clone().requires_grad_() if bias is not None else None

            def step(fn):
                def run():
                    with torch.enable_grad():
                        fn(xs, ws, bs).backward(g)
                return run

            times["layer"] = self._best("layer", {
                "mkl": step(F.linear), "onednn": step(lambda a, w, b: _Linear.apply(a, w, b, choice))})
            if not self._wins(times["layer"]):
                choice = MKL
        return choice, {k: {p: round(v * 1e6, 1) for p, v in t.items()} for k, t in times.items()}

    # -- the file

    def entries(self) -> dict[str, dict]:
        """The file's entries for this machine; none where it is absent, unreadable, corrupt or another's."""
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != CACHE_VERSION or data.get("machine") != self.machine:
                return {}
            return {k: dict(v) for k, v in data["choices"].items() if isinstance(k, str)}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}

    def load(self) -> dict[str, Choice]:
        """The choices on disk for this machine (see :meth:`entries`)."""
        out = {}
        for k, v in self.entries().items():
            try:
                out[k] = Choice(**{f: bool(v[f]) for f in ("forward", "grad_input", "grad_weight")})
            except (KeyError, TypeError):
                continue
        return out

    def save(self, key: str) -> None:
        """Add ``key``'s choice to the file (merged with what another process may have written meanwhile,
        replaced atomically); a directory that cannot be written is no error."""
        try:
            entries = self.entries()
            entries[key] = {**asdict(self.choices[key]), "us": self.times.get(key, {})}
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".gemm-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": CACHE_VERSION, "machine": self.machine,
                               "choices": dict(sorted(entries.items()))}, f, indent=1)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            pass


_selector: Selector | None = None


def selector() -> Selector:
    """The process's selector (created at first use, with the cache directory of that moment)."""
    global _selector
    if _selector is None:
        _selector = Selector()
    return _selector


def set_selector(new: Selector | None) -> Selector | None:
    """Replace the process's selector (``None``: a fresh default one at next use); returns the old one."""
    global _selector
    old, _selector = _selector, new
    return old


def summary() -> dict[str, str]:
    """The path of each shape this process has used through the selector (``ICLBENCH_GEMM=auto``):
    ``{"MxKxN@Tt": "mkl" | "onednn" | "grad_weight onednn" ..., "MxKxN@Tt/forward": ...}`` (forward only:
    evaluation); a run's provenance records it."""
    if _selector is None:
        return {}
    out = {}
    for (M, K, N, threads, backward), c in sorted(_selector.known.items()):
        out[Selector.key(M, K, N, threads, backward)] = "mkl" if not c.any else "onednn" if c == ONEDNN else \
            "+".join(n for n in ("forward", "grad_input", "grad_weight") if getattr(c, n)) + " onednn"
    return out
