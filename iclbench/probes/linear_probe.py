"""Linear probes: where is the rule represented? Ridge regression from the residual stream after each layer
(layer -1: the embedding) at each position to each latent parameter of the sequence (a, b for affine; w for
linear regression; ...; see :func:`.common.sequence_latents`), fitted on one half of the batch, R² on the other.
"""

from __future__ import annotations

import pandas as pd
import torch

from iclbench import Probe, ProbeFigure, ProbeResult

from .common import (clean, probe_batch, r_squared, residual_sites, ridge_fit, ridge_predict, scored_positions,
                     sequence_latents)
from .figures import linear_probe_figure, run_title

#: ridge strength relative to the mean feature variance (the residual has d_model features and the fit half
#: of the batch per position; a little shrinkage keeps held-out R² honest)
RIDGE = 1e-2


@torch.no_grad()
def probe_r2(model, task, batch) -> dict[str, torch.Tensor]:
    """``{latent[index]: R² [n_sites, T]}`` on the held-out half; sites as :func:`residual_sites`."""
    latents = sequence_latents(task, batch)
    sites = residual_sites(model)
    _, cache = model.run_with_cache(batch.inputs, names_filter=[n for _, n in sites])
    half = len(batch) // 2
    resid = torch.stack([cache[n] for _, n in sites])  # [S, B, T, d]
    x = resid.transpose(1, 2)  # [S, T, B, d]: one fit per site and position
    out = {}
    for name, y in latents.items():
        y = y[None, None].expand(*x.shape[:2], *y.shape)  # [S, T, B, k]
        fit = ridge_fit(x[:, :, :half], y[:, :, :half], RIDGE)
        r2 = r_squared(ridge_predict(x[:, :, half:], fit), y[:, :, half:])  # [S, T, k]
        for i in range(r2.shape[-1]):
            out[name if r2.shape[-1] == 1 else f"{name}[{i}]"] = r2[..., i].float()
    return out


class LinearProbes(Probe):
    name = "linear_probe"
    description = "ridge probes from each layer's residual to the task's latent parameters: held-out R²"
    n_sequences = 512

    requires_hooks = ("blocks.0.hook_resid_pre", "blocks.{layer}.hook_resid_post")

    def applies_to(self, task, model):
        return "blocks.0.hook_resid_pre" in model.hook_points()

    @classmethod
    def figures(cls, table, summary, run):
        return [ProbeFigure(cls.name, linear_probe_figure(table, run["curves"]["score_from"],
                                                f"Linear probes: {run_title(run)}"),
                            "Held-out R² of ridge probes for the task's latent parameters, per layer.")]

    def run(self, model, task, generator, device):
        batch = probe_batch(task, self.n_sequences, generator, device)
        r2 = probe_r2(model, task, batch)
        scored = scored_positions(task, batch)
        layers = [l for l, _ in residual_sites(model)]
        rows, summary = [], {}
        for latent, values in r2.items():
            per_layer = {}
            for i, layer in enumerate(layers):
                rows += [{"latent": latent, "layer": layer, "position": t, "r2": float(values[i, t])}
                         for t in range(values.shape[1])]
                per_layer[str(layer)] = clean(values[i, scored].mean())
            summary[latent] = {"r2": per_layer, "best_layer": int(max(layers, key=lambda l: per_layer[str(l)]
                                                                     or -1e9))}
        summary["note"] = "held-out R², mean over scored positions; layer -1 = embedding"
        return ProbeResult(pd.DataFrame(rows, columns=["latent", "layer", "position", "r2"]), summary)
