"""Layer lens: what prediction the residual stream holds after each layer.

*Logit lens*: the model's own final norm and read-out applied to an intermediate residual (nostalgebraist
2020). *Tuned lens*: a per-layer affine read-out fitted by ridge on one batch and scored on another
(Belrose et al. 2023; here fitted to the target, since the output is a real value, not a distribution).
Each is compared with the target and with every baseline: a lens that sits on ``copy_last`` after layer 0
says "layer 0 copies". The tuned lens is fitted, and it finds good predictors in a random network too: its
``nearest_baseline`` is named only where its error beats the same lens on untrained controls
(:func:`.common.controls`) by an interval (``selectivity`` clearing ``SELECT_MARGIN``); the logit lens fits
nothing and is reported as it is.
"""

from __future__ import annotations

import pandas as pd
import torch

from iclbench import Probe, ProbeFigure, ProbeResult

from .common import (baselines, controls, probe_batch, reference_error, residual_sites, ridge_fit, ridge_predict,
                     scored_positions, sq_error)
from .figures import lens_figure, run_title
from .stats import HOLDS, SELECT_MARGIN, estimate, mean_with_ci, resample_weights, selectivity, verdict

#: ridge of the tuned lens, relative to the mean feature variance: enough to keep the 2 x d_model features
#: from fitting noise on a few thousand rows, small enough to represent the model's own read-out
LENS_RIDGE = 1e-4


def lens_features(resid: torch.Tensor) -> torch.Tensor:
    """The residual and its per-position standardized form (what a final LayerNorm sees), side by side, so
    an affine map of them can express the model's own read-out at the last layer as well as any linear
    read-out of the raw stream."""
    centered = resid - resid.mean(-1, keepdim=True)
    return torch.cat([resid, centered / (centered.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()], -1)


@torch.no_grad()
def lens_predictions(model, task, fit_batch, test_batch) -> dict[str, dict[int, torch.Tensor]]:
    """``{"logit": {layer: pred}, "tuned": {layer: pred}}`` on ``test_batch``; layer -1 is the embedding.

    The tuned lens of each layer is one affine map of :func:`lens_features` shared by all positions, fitted
    on the *scored* positions of ``fit_batch`` (other sequences than the test batch). Fitting it on unscored
    positions too (answer tokens, the first positions, whose targets are unpredictable) spends its capacity
    where nothing is judged: after the last layer it then reads out worse than the model itself, although
    the model's own read-out is one of the maps it can represent."""
    sites = residual_sites(model)
    names = [name for _, name in sites]
    _, fit_cache = model.run_with_cache(fit_batch.inputs, names_filter=names)
    _, test_cache = model.run_with_cache(test_batch.inputs, names_filter=names)
    positions = scored_positions(task, fit_batch).to(fit_batch.inputs.device)
    d_out = fit_batch.targets.shape[-1]
    targets = fit_batch.targets[:, positions].reshape(-1, d_out)
    out = {"logit": {}, "tuned": {}}
    for layer, name in sites:
        out["logit"][layer] = model.readout(test_cache[name]).float()
        x = lens_features(fit_cache[name][:, positions])
        affine = ridge_fit(x.reshape(-1, x.shape[-1]), targets, LENS_RIDGE)
        out["tuned"][layer] = ridge_predict(lens_features(test_cache[name]), affine).float()
    return out


def lens_distances(task, model, fit_batch, test_batch, per_sequence: bool = False, found: dict | None = None):
    """``{lens: {layer: {reference: distance}}}``: normalized squared distance ``[T]`` averaged over the
    test sequences (``[B, T]`` per sequence with ``per_sequence``); references are ``target``, ``model``
    (the final output) and each baseline."""
    norm = task.normalizer(test_batch.inputs.device)
    refs = {"target": test_batch.targets, "model": model(test_batch.inputs).detach()}
    refs.update(baselines(task, test_batch) if found is None else found)
    preds = lens_predictions(model, task, fit_batch, test_batch)
    reduce = (lambda d: d) if per_sequence else (lambda d: d.mean(0))  # noqa: E731
    return {lens: {layer: {ref: reduce(sq_error(p, r, norm)) for ref, r in refs.items()}
                   for layer, p in per_layer.items()}
            for lens, per_layer in preds.items()}


class LayerLens(Probe):
    name = "layer_lens"
    description = "prediction read from the residual after each layer (logit and tuned lens) vs target and baselines"
    n_sequences = 512

    requires_hooks = ("blocks.0.hook_resid_pre", "blocks.{layer}.hook_resid_post")
    requires_attributes = ("readout",)

    def applies_to(self, task, model):
        return "blocks.0.hook_resid_pre" in model.hook_points()

    @classmethod
    def figures(cls, table, summary, run):
        return [ProbeFigure(cls.name, lens_figure(table, run["curves"]["score_from"],
                                                  f"Layer lens: {run_title(run)}"),
                            "Prediction read from the residual stream after each layer (logit lens and tuned lens): "
                            "error and distance to each baseline's prediction.")]

    def run(self, model, task, generator, device):
        fit = probe_batch(task, self.n_sequences, generator, device)
        test = probe_batch(task, self.n_sequences, generator, device)
        found = baselines(task, test)  # once, for the distances and the reference error
        dist = lens_distances(task, model, fit, test, per_sequence=True, found=found)
        scored = scored_positions(task, test).to(test.inputs.device)
        weights = resample_weights(len(test), generator)
        norm = task.normalizer(test.inputs.device)
        reference = reference_error(task, test, found)[0][:, scored].mean(1).double().cpu()
        control_tuned = [lens_predictions(c, task, fit, test)["tuned"] for c in controls(model)]

        def boot(x):
            return (weights @ x) / weights.sum(1)
        rows, summary = [], {}
        for lens, per_layer in dist.items():
            summary[lens] = {}
            for layer, per_ref in per_layer.items():
                for ref, d in per_ref.items():
                    curve = d.mean(0)
                    rows += [{"lens": lens, "layer": layer, "position": t, "reference": ref, "distance": float(v)}
                             for t, v in enumerate(curve)]
                means = {ref: mean_with_ci(d[:, scored].mean(1), generator, weights) for ref, d in per_ref.items()}
                baseline_means = {r: v["mean"] for r, v in means.items() if r not in ("target", "model")
                                  and v["mean"] is not None}
                nearest = min(baseline_means, key=baseline_means.get) if baseline_means else None
                entry = summary[lens][str(layer)] = {"error": means["target"], "distance": means,
                                                     "nearest_baseline": nearest}
                if lens == "tuned":  # fitted: it counts only beyond what it reads from untrained controls
                    err = per_ref["target"][:, scored].mean(1).double().cpu()
                    control = min((sq_error(c[layer], test.targets, norm)[:, scored].mean(1).double().cpu()
                                   for c in control_tuned), key=lambda e: float(e.mean()))
                    sel = selectivity(err, control, reference, boot)
                    entry.update({"control_error": estimate(float(control.mean()), boot(control)),
                                  "selectivity": sel, "nearest_baseline_raw": nearest,
                                  "nearest_baseline": nearest if verdict(sel["ci"], SELECT_MARGIN) == HOLDS else None})
        summary["note"] = ("normalized squared distance averaged over scored positions, mean and 95% bootstrap "
                           "interval over probe sequences; layer -1 = embedding; 'error' = distance to the target; "
                           "the tuned lens is fitted on the scored positions of other sequences; its nearest_baseline is named "
                           "only where it beats the same lens on untrained controls (selectivity, control_error)")
        return ProbeResult(pd.DataFrame(rows), summary)
