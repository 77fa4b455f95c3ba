"""Linear probes: where is the rule represented? Ridge regression from the residual stream after each layer
(layer -1: the embedding) at each position to each latent parameter of the sequence (a, b for affine; w for
linear regression; ...; see :func:`.common.sequence_latents`), fitted on one half of the batch, R² on the other.

A ridge read-out decodes latents from a random network's residual stream too (an untrained gpt3l gives b on
affine with R² 0.34 from the embedding alone), so every R² stands beside the same probe on untrained controls
(:func:`.common.controls`): a latent counts as ``decoded`` at a layer only where the model's R² beats the best
control's by ``DECODE_MARGIN``, by an interval (bootstrap over held-out sequences, paired).
"""

from __future__ import annotations

import pandas as pd
import torch

from iclbench import Probe, ProbeFigure, ProbeResult

from .common import (clean, controls, probe_batch, residual_sites, ridge_fit, ridge_predict, scored_positions,
                     sequence_latents)
from .figures import linear_probe_figure, run_title
from .stats import HOLDS, estimate, resample_weights, verdict

#: ridge strength relative to the mean feature variance (the residual has d_model features and the fit half
#: of the batch per position; a little shrinkage keeps held-out R² honest)
RIDGE = 1e-2
#: a latent is decoded at a layer where the model's held-out R² exceeds the best control's by this much
DECODE_MARGIN = 0.1


@torch.no_grad()
def probe_residuals(model, task, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{latent[index]: (residual, total)}``, each ``[n_sites, T, B_held_out]``: the held-out half's squared
    prediction error and squared deviation from its mean, per sequence; sites as :func:`residual_sites`."""
    latents = sequence_latents(task, batch)
    sites = residual_sites(model)
    _, cache = model.run_with_cache(batch.inputs, names_filter=[n for _, n in sites])
    half = len(batch) // 2
    resid = torch.stack([cache[n] for _, n in sites])  # [S, B, T, d]
    x = resid.transpose(1, 2)  # [S, T, B, d]: one fit per site and position
    out = {}
    for name, y in latents.items():
        y = y[None, None].expand(*x.shape[:2], *y.shape).double()  # [S, T, B, k]
        fit = ridge_fit(x[:, :, :half], y[:, :, :half], RIDGE)
        held = y[:, :, half:]
        res = (held - ridge_predict(x[:, :, half:], fit)).pow(2).cpu()
        tot = (held - held.mean(-2, keepdim=True)).pow(2).cpu()
        for i in range(y.shape[-1]):
            out[name if y.shape[-1] == 1 else f"{name}[{i}]"] = (res[..., i], tot[..., i])
    return out


def r2_over(residual, total, positions, weights=None) -> torch.Tensor:
    """Held-out R² averaged over ``positions``: ``[S]``, or ``[S, R]`` per bootstrap replicate."""
    residual, total = residual[:, positions], total[:, positions]
    if weights is None:
        return (1 - residual.sum(-1) / total.sum(-1).clamp_min(1e-12)).mean(1)
    return (1 - (residual @ weights.T) / (total @ weights.T).clamp_min(1e-12)).mean(1)


class LinearProbes(Probe):
    name = "linear_probe"
    description = ("ridge probes from each layer's residual to the task's latent parameters: held-out R², "
                   "against untrained controls")
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
        fits = probe_residuals(model, task, batch)
        control_fits = [probe_residuals(c, task, batch) for c in controls(model)]
        scored = scored_positions(task, batch)
        weights = resample_weights(len(batch) - len(batch) // 2, generator)
        layers = [l for l, _ in residual_sites(model)]
        rows, summary = [], {}
        for latent, (res, tot) in fits.items():
            r2 = (1 - res.sum(-1) / tot.sum(-1).clamp_min(1e-12)).float()  # [S, T]
            point, boot = r2_over(res, tot, scored), r2_over(res, tot, scored, weights)
            # the best control at each site
            c_point = torch.stack([r2_over(*c[latent], scored) for c in control_fits])  # [C, S]
            best = c_point.argmax(0)
            c_boot = torch.stack([r2_over(*c[latent], scored, weights) for c in control_fits])  # [C, S, R]
            per_layer = {}
            for i, layer in enumerate(layers):
                rows += [{"latent": latent, "layer": layer, "position": t, "r2": float(r2[i, t])}
                         for t in range(r2.shape[1])]
                gain = estimate(float(point[i] - c_point[best[i], i]), boot[i] - c_boot[best[i], i])
                per_layer[str(layer)] = {"r2": clean(point[i]), "control_r2": clean(c_point[best[i], i]),
                                         "gain": gain, "decoded": verdict(gain["ci"], DECODE_MARGIN)}
            decoded = [l for l in layers if per_layer[str(l)]["decoded"] == HOLDS]
            summary[latent] = {"r2": {k: v["r2"] for k, v in per_layer.items()}, "layers": per_layer,
                               "decoded_at": decoded,
                               "best_layer": max(decoded, key=lambda l: per_layer[str(l)]["r2"]) if decoded else None}
        summary["note"] = ("held-out R², mean over scored positions; layer -1 = embedding; control_r2: the same probe "
                           "on the best of the untrained controls (weights shuffled); decoded: R² above the "
                           f"control's by {DECODE_MARGIN} with a 95% interval over held-out sequences")
        return ProbeResult(pd.DataFrame(rows, columns=["latent", "layer", "position", "r2"]), summary)
