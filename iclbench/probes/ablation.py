"""Ablations: silence one head, one attention layer or one MLP and see how much worse the prediction gets.

*Zero* replaces the component's output with 0; *mean* with its mean over the batch at each position (keeps
what the component says regardless of the sequence, removes what it says about this one). The change in
normalized error per position is recorded; a component whose ablation costs nothing is not needed.
"""

from __future__ import annotations

import pandas as pd
import torch

from iclbench import Probe, ProbeFigure, ProbeResult

from .common import clean, has_heads, has_mlp, probe_batch, scored_positions, sq_error
from .figures import ablation_figure, run_title

METHODS = ("zero", "mean")


def components(model) -> list[tuple[str, int, int]]:
    """``(kind, layer, head)`` for every head, attention layer and MLP (head -1 for whole layers)."""
    out = []
    for l in range(model.n_layers):
        if has_heads(model):
            out += [("head", l, h) for h in range(model.n_heads)]
        out.append(("attn", l, -1))
        if has_mlp(model, l):
            out.append(("mlp", l, -1))
    return out


def label(kind, layer, head) -> str:
    return f"L{layer}H{head}" if kind == "head" else f"{kind}{layer}"


@torch.no_grad()
def ablation_errors(model, task, batch, which=None, methods=METHODS) -> tuple[torch.Tensor, dict]:
    """Clean error ``[T]`` and ``{(kind, layer, head, method): error [T]}`` for the components ``which``
    (all by default). Every ablation is one copy of the batch in a single batched forward pass."""
    which = components(model) if which is None else which
    jobs = [(kind, layer, head, method) for kind, layer, head in which for method in methods]
    norm = task.normalizer(batch.inputs.device)
    names = sorted({hook_name(k, l) for k, l, _ in which})
    pred, cache = model.run_with_cache(batch.inputs, names_filter=names)
    clean_err = sq_error(pred, batch.targets, norm).mean(0)
    n, K = len(batch), len(jobs)
    by_hook: dict[str, list] = {}
    for i, (kind, layer, head, method) in enumerate(jobs):
        by_hook.setdefault(hook_name(kind, layer), []).append((i, head, method))

    def ablate(x, hook):
        x = x.clone().view(K, n, *x.shape[1:])
        mean = cache[hook.name].mean(0)  # per position (and head)
        for i, head, method in by_hook[hook.name]:
            where = (i, slice(None), slice(None), head) if head >= 0 else (i,)
            x[where] = 0 if method == "zero" else mean[(slice(None), head) if head >= 0 else ()]
        return x.view(K * n, *x.shape[2:])

    ablated = model.run_with_hooks(batch.inputs.repeat(K, 1, 1), [(name, ablate) for name in by_hook])
    errors = sq_error(ablated.view(K, n, *ablated.shape[1:]), batch.targets, norm).mean(1)  # [K, T]
    return clean_err, dict(zip(jobs, errors))


def hook_name(kind: str, layer: int) -> str:
    return {"head": f"blocks.{layer}.attn.hook_z", "attn": f"blocks.{layer}.hook_attn_out",
            "mlp": f"blocks.{layer}.hook_mlp_out"}[kind]


class Ablation(Probe):
    name = "ablation"
    description = "zero- and mean-ablation of every head, attention layer and MLP: change in error per position"
    n_sequences = 256

    requires_hooks = ("blocks.{layer}.hook_attn_out",)

    def applies_to(self, task, model):
        return "blocks.0.hook_attn_out" in model.hook_points()

    @classmethod
    def figures(cls, table, summary, run):
        return [ProbeFigure(cls.name, ablation_figure(table, f"Ablations: {run_title(run)}"),
                            "Change in normalized error per position when a component is ablated.")]

    def run(self, model, task, generator, device):
        batch = probe_batch(task, self.n_sequences, generator, device)
        clean_err, errs = ablation_errors(model, task, batch)
        scored = scored_positions(task, batch)
        rows, summary = [], {"clean_error": clean(clean_err[scored].mean()), "delta": {}}
        for (kind, layer, head, method), err in errs.items():
            name = label(kind, layer, head)
            rows += [{"component": name, "kind": kind, "layer": layer, "head": head, "method": method,
                      "position": t, "error": float(err[t]), "delta": float(err[t] - clean_err[t])}
                     for t in range(len(err))]
            summary["delta"].setdefault(name, {})[method] = clean((err - clean_err)[scored].mean())
        summary["note"] = "delta = ablated minus clean normalized error, mean over scored positions"
        return ProbeResult(pd.DataFrame(rows), summary)
