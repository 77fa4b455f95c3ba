"""``iclbench bench``: how fast a model trains and runs with its activations cached, and how much memory a
training step holds; with TransformerLens installed, the same on a ``HookedTransformer`` of identical
configuration and weights (``Model.to_transformer_lens``), side by side in one process.

The two models run the trainer's own :func:`~iclbench.trainer.train_step` on the same batches, and their
timing rounds alternate, so a change in machine load hits both alike; ratios are taken round by round and
the median is reported, which is what stays stable on a shared machine (absolute figures do not).
"""

from __future__ import annotations

import itertools
import platform
import resource
import statistics
import sys
import time
from importlib import metadata
from typing import Callable

import torch

from .config import resolve
from .errors import ICLBenchError
from .registry import get_registry
from .build import build
from .step import compile_model, make_optimizer, mask_index, train_step
from .store import device_name
from .trainer import resolve_device

N_BATCHES = 4  # distinct batches cycled through, drawn once, so data generation is not timed


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fixed_batches(task, batch_size: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [task.sample(batch_size, gen, device) for _ in range(N_BATCHES)]


def training_step(model, task, cfg, batches, compile: bool = False) -> Callable[[], None]:
    """One call = one step of the real trainer (forward, loss, backward, clipping, AdamW, loss.item())."""
    opt = make_optimizer(model, cfg.train)
    device = batches[0].inputs.device
    step_model = compile_model(model, device) if compile else model
    norm = task.normalizer(device).to(device)
    scored = mask_index(batches[0].mask)
    cycle = itertools.cycle(batches)
    model.train()

    def step():
        train_step(step_model, opt, next(cycle), norm, cfg.train.lr, cfg.train, scored).item()

    return step


def forward_with_cache(model, batches, names) -> Callable[[], None]:
    """One call = a no-grad forward pass caching the activations at ``names`` (what a probe does)."""
    cycle = itertools.cycle(batches)

    @torch.no_grad()
    def forward():
        model.eval()
        model.run_with_cache(next(cycle).inputs, names_filter=names)

    return forward


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, reps: int, device) -> dict[str, list[float]]:
    """Seconds per call of each function, one figure per round; the functions alternate within a round."""
    for fn in fns.values():  # warm-up: allocator, lazy init, compilation
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / reps)
    return times


def saved_activation_bytes(model, fn: Callable[[], None]) -> int:
    """Bytes of the tensors autograd keeps for the backward pass during ``fn`` (weights excluded): the
    activation memory of a training step, measured the same way on every device."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def peak_step_bytes(fn: Callable[[], None], device: torch.device) -> int | None:
    """Peak device memory allocated during one call of ``fn`` (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def step_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of ``fn`` (GEMMs and attention, forward and backward), as torch's FlopCounterMode
    counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_gemm_flops(device: torch.device, dtype=torch.float32, seconds: float = 0.3) -> float:
    """The machine's GEMM throughput (FLOP/s): the best of square matrix products of a few sizes, timed
    for about ``seconds`` each — what the models' GEMMs could reach at best on this device and thread
    count. The FLOP floor of a step is its FLOPs over this figure."""
    best = 0.0
    sizes = (256, 512, 1024) if device.type == "cpu" else (2048, 4096, 8192)
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        synchronize(device)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
            if device.type != "cpu" and reps % 10:
                continue
            synchronize(device)
        synchronize(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best


def stacked_seeds(cfg, device: torch.device, n: int, rounds: int, reps: int) -> dict:
    """Seconds per step of ``n`` seeds trained one after another (each its own model and optimizer) and of
    the same ``n`` seeds stacked into one model (:class:`~iclbench.stacked.StackedSeeds`), alternating."""
    import dataclasses

    from .stacked import StackedSeeds

    models, task = [], None
    for seed in range(n):
        task, model = build(get_registry(), dataclasses.replace(cfg, seed=seed), device)
        models.append(model)
    batches = fixed_batches(task, cfg.train.batch_size, device)
    norm, scored = task.normalizer(device).to(device), mask_index(batches[0].mask)
    separate = [training_step(m, task, cfg, batches) for m in models]
    together = StackedSeeds(models, cfg.train)
    cycle = itertools.cycle(batches)

    def one_by_one():
        for step in separate:
            step()

    def stacked():
        b = next(cycle)
        together.step([b] * n, norm, [cfg.train.lr] * n, scored).sum().item()

    return interleaved({"separate": one_by_one, "stacked": stacked}, rounds, reps, device)


def hf_gpt2_twin(model, task, cfg):
    """Garg et al. (2022)'s in-context-learning model: Hugging Face ``GPT2Model`` between a linear read-in and
    read-out, of the same width, depth, heads, MLP size and context as ``model`` (its own random weights:
    only speed is compared), dropout off and exact GELU as ours; its unused token embedding has one row.
    ``None`` when ``transformers`` is absent."""
    try:
        from transformers import GPT2Config, GPT2Model
    except ImportError:
        return None
    if getattr(cfg.model_options, "attn_only", False):
        return None
    o = cfg.model_options

    class Garg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            conf = GPT2Config(vocab_size=1, bos_token_id=None, eos_token_id=None,  # inputs_embeds: no vocabulary
                              n_positions=task.context_len, n_embd=o.d_model, n_layer=o.n_layers, n_head=o.n_heads,
                              n_inner=o.d_mlp, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
                              attn_pdrop=0.0, use_cache=False)
            conf._attn_implementation = "sdpa"
            self.read_in = torch.nn.Linear(task.d_in, o.d_model)
            self.backbone = GPT2Model(conf)
            self.read_out = torch.nn.Linear(o.d_model, task.d_out)

        def forward(self, x):
            return self.read_out(self.backbone(inputs_embeds=self.read_in(x)).last_hidden_state)

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Garg().to(device)


def mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:,.1f} MiB"


def compare(cfg, device: torch.device, rounds: int, reps: int, compile: bool, with_tl: bool,
            with_hf: bool = True) -> dict:
    """Throughput and memory of ``cfg.model``, its TransformerLens twin and the Hugging Face GPT2Model of
    Garg et al. (where installed) on ``cfg.task``."""
    task, model = build(get_registry(), cfg, device)
    models, note = {"iclbench": model}, None
    if with_tl:
        try:
            models["TransformerLens"] = model.to_transformer_lens()
        except ICLBenchError as exc:
            note = str(exc)
    if with_hf:
        twin = hf_gpt2_twin(model, task, cfg)
        if twin is not None:
            models["HF GPT2Model"] = twin
    batches = fixed_batches(task, cfg.train.batch_size, device)
    tokens = batches[0].inputs.shape[0] * batches[0].inputs.shape[1]
    names = list(model.hook_points())  # the same activations cached in every model that has hooks
    steps = {name: training_step(m, task, cfg, batches, compile) for name, m in models.items()}
    hooked = {n: m for n, m in models.items() if hasattr(m, "run_with_cache")}
    out = {"models": list(models), "note": note, "tokens_per_batch": tokens,
           "params": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
           "train": interleaved(steps, rounds, reps, device),
           "forward_cache": interleaved({n: forward_with_cache(m, batches, names) for n, m in hooked.items()},
                                        rounds, reps, device),
           "saved_activations": {n: saved_activation_bytes(m, steps[n]) for n, m in models.items()},
           "weights_grads_adam": {n: 4 * sum(p.numel() * p.element_size() for p in m.parameters())
                                  for n, m in models.items()},
           "peak_step": {n: peak_step_bytes(steps[n], device) for n in models}}
    out["flops"] = {n: step_flops(steps[n]) for n in models}
    return out


def ratio_text(ours: list[float], theirs: list[float]) -> str:
    """Median over rounds of their time / our time, with the range: > 1 means iclbench is faster."""
    ratios = sorted(t / o for o, t in zip(ours, theirs))
    return f"{statistics.median(ratios):.2f}× ({ratios[0]:.2f}–{ratios[-1]:.2f})"


def format_compare(r: dict, fmt: str) -> str:
    from tabulate import tabulate

    names, ours = r["models"], r["models"][0]
    others = names[1:]
    headers = ["", *names] + [f"{n} time / iclbench time (median, range)" for n in others]
    blank = [""] * len(others)
    rows = []
    for key, label in (("train", "training tokens/s"), ("forward_cache", "forward + cache tokens/s")):
        row = [label] + [f"{r['tokens_per_batch'] / statistics.median(r[key][n]):,.0f}" if n in r[key] else "—"
                         for n in names]
        row += [ratio_text(r[key][ours], r[key][n]) if n in r[key] else "— (no hooks)" for n in others]
        rows.append(row)
    rows.append(["parameters"] + [f"{r['params'][n]:,}" for n in names] + blank)
    if r.get("peak_flops"):
        rows.append(["training GFLOP/step (GEMMs + attention)"] + [f"{r['flops'][n] / 1e9:.2f}" for n in names]
                    + blank)
        rows.append(["FLOP floor ÷ step time (share of peak GEMM speed)"]
                    + [f"{r['flops'][n] / r['peak_flops'] / statistics.median(r['train'][n]):.0%}" for n in names]
                    + blank)
    for key, label in (("saved_activations", "activations kept for backward"),
                       ("weights_grads_adam", "weights + grads + AdamW state"),
                       ("peak_step", "peak allocated in a training step")):
        if any(v is not None for v in r[key].values()):
            rows.append([label] + [mib(r[key][n]) for n in names] + blank)
    return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)


def scaling(base: dict, models: list[str], contexts: list[int], device, compile: bool,
            min_time: float = 1.0) -> list[list[str]]:
    """Training tokens/s of each model at each context length: best step time after one warm-up step,
    timed until ``min_time`` seconds and at least two steps have passed."""
    rows = []
    for name in models:
        row, params = [name], None
        for T in contexts:
            cfg = resolve(get_registry(), **{**base, "model": name,
                                             "overrides": [*base["overrides"], f"task.context_len={T}"]})
            task, model = build(get_registry(), cfg, device)
            params = sum(p.numel() for p in model.parameters())
            batches = fixed_batches(task, cfg.train.batch_size, device)
            step = training_step(model, task, cfg, batches, compile)
            step()
            times, start = [], time.perf_counter()
            while len(times) < 2 or time.perf_counter() - start < min_time:
                synchronize(device)
                t0 = time.perf_counter()
                step()
                synchronize(device)
                times.append(time.perf_counter() - t0)
            row.append(f"{cfg.train.batch_size * T / min(times):,.0f}")
        rows.append([row[0], f"{params / 1e6:.2f}M", *row[1:]])
    return rows


def describe_machine(device: torch.device) -> str:
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return (f"{device} ({device_name(device)}{threads}), torch {torch.__version__}, Python "
            f"{platform.python_version()}")


def parse_list(text: str, kind, what: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ICLBenchError(f"--scaling-{what} expects comma-separated values, got {text!r}") from None


def main(args) -> int:
    if getattr(args, "to_learned", False):
        from .learned import table, time_to_learned

        if args.max_steps < 1:
            raise ICLBenchError(f"--max-steps must be >= 1, got {args.max_steps}")
        rows = time_to_learned(args.task, args.model, max_steps=args.max_steps, overrides=args.overrides,
                               device=args.device or "auto")
        print(f"time to learned: {args.task} × {args.model}, until flat (cap {args.max_steps} steps), on "
              f"{describe_machine(resolve_device(args.device or 'auto'))}\n")
        print(table(rows, args.format))
        return 0
    if args.rounds < 1 or args.steps < 1:
        raise ICLBenchError(f"--rounds and --steps must be >= 1, got {args.rounds} and {args.steps}")
    base = {"task": args.task, "device": args.device, "overrides": list(args.overrides)}
    cfg = resolve(get_registry(), model=args.model, **base)
    device = resolve_device(cfg.device)
    tl_version = ""
    if not args.no_tl:
        try:
            tl_version = f", TransformerLens {metadata.version('transformer-lens')}"
        except metadata.PackageNotFoundError:
            tl_version = ", TransformerLens not installed (pip install 'iclbench[tl]')"
    if not getattr(args, "no_hf", False):
        try:
            tl_version += f", transformers {metadata.version('transformers')}"
        except metadata.PackageNotFoundError:
            tl_version += ", transformers not installed (pip install 'iclbench[hf]')"
    T = cfg.task_options.context_len if hasattr(cfg.task_options, "context_len") else "?"
    precision = "bf16 autocast" if cfg.train.precision == "bf16" else "fp32"
    print(f"bench {cfg.task} × {cfg.model}: batch {cfg.train.batch_size} × {T} positions, {precision}"
          f"{', compiled' if args.compile else ''}; {args.rounds} rounds × {args.steps} steps")
    print(f"on {describe_machine(device)}{tl_version}\n")
    result = compare(cfg, device, args.rounds, args.steps, args.compile, not args.no_tl,
                     not getattr(args, "no_hf", False))
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    result["peak_flops"] = peak_gemm_flops(device, dtype)
    floor = statistics.median(f / result["peak_flops"] for f in result["flops"].values())
    print(f"peak GEMM throughput measured here: {result['peak_flops'] / 1e9:,.0f} GFLOP/s ({dtype}); "
          f"FLOP floor of one training step: {floor * 1e3:.2f} ms\n")
    print(format_compare(result, args.format))
    if getattr(args, "seeds", 0) and args.seeds > 1:
        t = stacked_seeds(cfg, device, args.seeds, args.rounds, args.steps)
        tokens = result["tokens_per_batch"] * args.seeds
        sep, stk = statistics.median(t["separate"]), statistics.median(t["stacked"])
        print(f"\n{args.seeds} seeds, training tokens/s (all seeds): one after another {tokens / sep:,.0f}, "
              f"stacked into one model {tokens / stk:,.0f}; stacked/separate speed "
              f"{ratio_text(t['stacked'], t['separate'])}")
    if result["note"]:
        print(f"\n(no TransformerLens comparison: {result['note']})")
    if device.type != "cuda":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        print(f"\nprocess peak resident memory: {mib(peak)}")
    if args.scaling:
        from tabulate import tabulate

        models = parse_list(args.scaling_models, str, "models")
        contexts = parse_list(args.scaling_contexts, int, "contexts")
        print(f"\ntraining tokens/s by model and context length (batch {cfg.train.batch_size}):\n")
        rows = scaling(base, models, contexts, device, args.compile)
        print(tabulate(rows, headers=["model", f"params (T={contexts[-1]})", *[f"T={t}" for t in contexts]],
                       tablefmt=args.format,
                       disable_numparse=True))
    return 0
