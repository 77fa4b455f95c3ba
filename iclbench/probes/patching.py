"""Activation patching: copy one activation from a clean run into a run on a corrupted sequence (same task,
other parameters and inputs) and measure how much of the clean prediction comes back.

*Residual*: the residual stream after layer l (layer -1: the embedding) at one position p; recovery is
measured at every query position t >= p, so it shows which positions carry what later predictions need.
*Heads*: one head's output at every position. Recovery at position t is
``1 - E|patched - clean|² / E|corrupted - clean|²``: 1 = the clean prediction is back, 0 = no effect.
"""

from __future__ import annotations

import pandas as pd
import torch

from iclbench import Probe, ProbeResult

from .common import clean, has_heads, probe_batch, residual_sites, scored_positions


def recovery(patched: torch.Tensor, clean_pred: torch.Tensor, corrupt_pred: torch.Tensor) -> torch.Tensor:
    """``[..., T]`` fraction of the clean prediction restored, per position (``patched [..., B, T, d]``)."""
    gap = (corrupt_pred - clean_pred).pow(2).sum(-1).mean(-2)
    return 1 - (patched - clean_pred).pow(2).sum(-1).mean(-2) / gap.clamp_min(1e-12)


@torch.no_grad()
def residual_patching(model, clean_batch, corrupt_batch) -> dict[int, torch.Tensor]:
    """``{layer: recovery [patch position p, query position t]}``; each site is one batched run with a
    copy of the corrupted batch per patched position."""
    sites = residual_sites(model)[:-1]  # patching the last residual is the output itself
    clean_pred, cache = model.run_with_cache(clean_batch.inputs, names_filter=[n for _, n in sites])
    corrupt_pred = model(corrupt_batch.inputs)
    n, T = corrupt_batch.inputs.shape[:2]
    repeated = corrupt_batch.inputs.repeat(T, 1, 1)  # copy p patches position p
    out = {}
    for layer, name in sites:
        def patch(x, hook, src=cache[name]):
            x = x.clone().view(T, n, T, -1)
            p = torch.arange(T, device=x.device)
            x[p, :, p] = src.transpose(0, 1)  # [T, n, d]: copy p gets the clean residual at position p
            return x.view(T * n, T, -1)

        patched = model.run_with_hooks(repeated, [(name, patch)]).view(T, n, T, -1)
        out[layer] = recovery(patched, clean_pred, corrupt_pred)
    return out


@torch.no_grad()
def head_patching(model, clean_batch, corrupt_batch) -> torch.Tensor:
    """``[L, H, T]`` recovery from patching each head's output (``hook_z``) at every position; all heads in
    one batched run, a copy of the corrupted batch per head."""
    L, H = model.n_layers, model.n_heads
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    clean_pred, cache = model.run_with_cache(clean_batch.inputs, names_filter=names)
    corrupt_pred = model(corrupt_batch.inputs)
    n, T = corrupt_batch.inputs.shape[:2]
    hooks = []
    for l in range(L):
        def patch(z, hook, l=l):
            z = z.clone().view(L, H, n, T, H, -1)
            h = torch.arange(H, device=z.device)
            z[l, h, :, :, h] = cache[names[l]].permute(2, 0, 1, 3)  # copy (l, h) gets head h's clean output
            return z.view(L * H * n, T, H, -1)
        hooks.append((names[l], patch))
    patched = model.run_with_hooks(corrupt_batch.inputs.repeat(L * H, 1, 1), hooks).view(L, H, n, T, -1)
    return recovery(patched, clean_pred, corrupt_pred)


class ActivationPatching(Probe):
    name = "patching"
    description = "clean→corrupted patching of each layer's residual (per position) and each head's output"
    n_sequences = 64

    requires_hooks = ("blocks.0.hook_resid_pre", "blocks.{layer}.hook_resid_post")

    def applies_to(self, task, model):
        return "blocks.0.hook_resid_pre" in model.hook_points()

    def run(self, model, task, generator, device):
        clean_batch = probe_batch(task, self.n_sequences, generator, device)
        corrupt_batch = probe_batch(task, self.n_sequences, generator, device)
        scored = scored_positions(task, clean_batch)
        T = clean_batch.inputs.shape[1]
        rows, summary = [], {"residual": {}, "heads": {}}
        for layer, rec in residual_patching(model, clean_batch, corrupt_batch).items():
            rows += [{"site": "resid", "layer": layer, "head": -1, "patch_position": p, "position": t,
                      "recovery": float(rec[p, t])} for p in range(T) for t in range(p, T)]
            # how much of the prediction at t lives in the residual at t itself, and at t - 1
            summary["residual"][str(layer)] = {
                "same_position": clean(rec.diagonal()[scored].mean()),
                "previous_position": clean(rec.diagonal(1)[scored[scored >= 1] - 1].mean()),
            }
        if has_heads(model):
            rec = head_patching(model, clean_batch, corrupt_batch)
            for l in range(model.n_layers):
                for h in range(model.n_heads):
                    rows += [{"site": "head", "layer": l, "head": h, "patch_position": -1, "position": t,
                              "recovery": float(rec[l, h, t])} for t in range(T)]
                    summary["heads"][f"L{l}H{h}"] = clean(rec[l, h, scored].mean())
        summary["note"] = ("recovery of the clean prediction (1 = fully back), mean over scored query positions; "
                           "residual: patched at the query position itself or the one before it")
        return ProbeResult(pd.DataFrame(rows), summary)
