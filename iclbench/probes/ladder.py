"""Algorithm ladder: which known algorithm does each layer's read-out match?

In the spirit of Akyürek et al. 2022 and von Oswald et al. 2023. Each layer's prediction is read from the
residual stream by the tuned lens (:mod:`.lens`, fitted on the scored positions of other sequences) and
compared with a ladder of estimators that use the same context, from crude to refined:

* the task's own baselines (copy-last, the context mean, nearest neighbours, least squares, the Bayes
  posterior mean where the task has one; oracles are left out: they see the rule);
* ``gd_k``: k steps of gradient descent from 0 on the mean squared loss of the in-context examples, in the
  task's linear view (:meth:`iclbench.Task.rule_features`), step size tuned per k on the fit sequences
  (the best a k-step learner with one step size can do).

Rungs are ordered by their own error (crude → refined). Per layer: the normalized squared distance to every
rung with a bootstrap interval over probe sequences, the nearest rung, and which rungs cannot be told apart
from it (paired interval of the difference includes 0).

A fitted read-out finds a good predictor in a random network's residual stream too (an untrained gpt3l's
tuned lens reaches 0.09 on affine while the model's own error is 1.2). So every statement is *selective*: the
same lens is fitted on untrained controls (:func:`.common.controls`, the model's weights shuffled) and a
layer's ``role`` is its nearest rung only where its lens beats the best control's by an interval
(``selectivity``: the relative cut in reducible error, clearing ``SELECT_MARGIN``); elsewhere the role is
``none`` (``nearest`` keeps the raw answer). Errors are taken above the task's reference (Bayes, else an
oracle: :func:`.common.reference_error`), with ``EXCESS_FLOOR`` under every ratio, so observation noise and
vanishing errors decide nothing. The model's own read-out applied to each layer (``direct_error``, the logit
lens: nothing fitted) is reported beside the tuned lens.

``refines_with_depth``: the reducible error of the read-out falls from the first block to the last by a
relative margin whose interval clears ``REFINE_MARGIN``, *and* the last block's read-out is selective
(holds / fails / inconclusive, with the verdict at other margins beside it).
"""

from __future__ import annotations

import pandas as pd
import torch

from iclbench import Probe, ProbeFigure, ProbeResult

from .common import baselines, controls, probe_batch, reference_error, scored_positions, sq_error
from .figures import ladder_figure, run_title
from .lens import lens_predictions
from .stats import (HOLDS, SELECT_MARGIN, SELECT_SWEEP, combine, estimate, interval, relative_drop, resample_weights,
                    selectivity, sweep, verdict)

GD_STEPS = (1, 2, 4, 16)
#: step sizes tried for each k, as multiples of 1 / trace of the examples' second moment (stable below 2)
GD_STEP_GRID = (0.125, 0.25, 0.5, 1.0, 1.5, 1.9)
#: relative drop of the lens error from the first to the last block that counts as refinement
REFINE_MARGIN = 0.2
REFINE_SWEEP = (0.0, 0.1, 0.2, 0.5, 0.8)
#: the role of a layer whose read-out is no better than an untrained network's
NO_ROLE = "none"


def gradient_descent(phi: torch.Tensor, targets: torch.Tensor, examples: torch.Tensor, steps: int,
                     step_size: float) -> torch.Tensor:
    """Prediction at every position after ``steps`` of gradient descent from ``w = 0`` on the mean squared
    loss of the examples before it: ``phi [B, T, k]``, ``targets [B, T, m]``, ``examples [T]`` (bool).
    Vectorised over the batch and every prefix through cumulative sufficient statistics (float64)."""
    phi64, z = phi.double(), targets.double()
    use = examples.to(phi64)[None, :, None]

    def before(x):  # prefix sums over the examples s < t: shift the inclusive cumsum by one position
        x = x.cumsum(1)
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)

    count = before(examples.to(phi64)[None, :, None]).clamp_min(1)[..., None]  # [1, T, 1, 1]
    xtx = before(torch.einsum("bti,btj->btij", phi64 * use, phi64)) / count
    xtz = before(torch.einsum("bti,btm->btim", phi64 * use, z)) / count
    # the step is relative to the trace of the examples' second moment, a bound on its largest eigenvalue, so
    # that every step size in (0, 2) is stable whatever the number of examples
    eta = step_size / torch.diagonal(xtx, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-12)[..., None, None]
    w = torch.zeros_like(xtz)
    for _ in range(steps):
        w = w - eta * (xtx @ w - xtz)
    return (phi64[..., None] * w).sum(-2).to(targets.dtype)


def gd_rungs(task, fit, test, positions_fit) -> dict[str, torch.Tensor]:
    """``{"gd_k": predictions on test}`` with the step size of each k chosen on ``fit``."""
    view_fit, view_test = task.rule_features(fit), task.rule_features(test)
    if view_fit is None or view_test is None:
        return {}
    phi, examples = view_fit
    examples = examples.to(torch.bool)
    norm = task.normalizer(fit.inputs.device)
    out = {}
    for k in GD_STEPS:
        best, best_err = None, float("inf")
        for c in GD_STEP_GRID:
            pred = gradient_descent(phi, fit.targets, examples, k, c)
            err = float(sq_error(pred, fit.targets, norm)[:, positions_fit].mean())
            if err < best_err:
                best, best_err = c, err
        out[f"gd_{k}"] = gradient_descent(view_test[0], test.targets, view_test[1].to(torch.bool), k, best)
    return out


@torch.no_grad()
def ladder(model, task, fit, test, generator, weights=None) -> dict:
    """The per-layer comparison described in the module docstring. ``weights``: bootstrap resampling counts
    of the test sequences (shared with other scores so their intervals are paired)."""
    norm = task.normalizer(test.inputs.device)
    scored = scored_positions(task, test).to(test.inputs.device)
    found = baselines(task, test)
    rungs = {**found, **gd_rungs(task, fit, test, scored_positions(task, fit))}
    rungs = {n: p for n, p in rungs.items() if p.shape == test.targets.shape and torch.isfinite(p).all()}
    weights = resample_weights(len(test), generator) if weights is None else weights

    def per_sequence(pred, ref):
        return sq_error(pred, ref, norm)[:, scored].mean(1).double().cpu()

    def boot(x):
        return (weights @ x) / weights.sum(1)

    ref_error, ref_name = reference_error(task, test, found)
    reference = ref_error[:, scored].mean(1).double().cpu()
    own = {n: per_sequence(p, test.targets) for n, p in rungs.items()}
    order = sorted(rungs, key=lambda n: -float(own[n].mean()))  # crude (high error) → refined
    lenses = lens_predictions(model, task, fit, test)
    lens = lenses["tuned"]
    control_lens = [lens_predictions(c, task, fit, test)["tuned"] for c in controls(model)]
    layers, errors, control_errors = [], {}, {}
    for layer, pred in lens.items():
        err = per_sequence(pred, test.targets)
        errors[layer] = err
        # the hardest control: the one whose read-out at this layer is best
        control_errors[layer] = min((per_sequence(c[layer], test.targets) for c in control_lens),
                                    key=lambda e: float(e.mean()))
        sel = selectivity(err, control_errors[layer], reference, boot)
        selective = verdict(sel["ci"], SELECT_MARGIN)
        dist = {n: per_sequence(pred, rungs[n]) for n in order}
        nearest = min(order, key=lambda n: float(dist[n].mean()))
        ties = [n for n in order if n == nearest or interval(boot(dist[n] - dist[nearest]))[0] <= 0]
        direct = per_sequence(lenses["logit"][layer], test.targets)
        layers.append({
            "layer": layer,
            "role": nearest if selective == HOLDS else NO_ROLE,
            "error": estimate(float(err.mean()), boot(err)),
            "direct_error": estimate(float(direct.mean()), boot(direct)),
            "control_error": estimate(float(control_errors[layer].mean()), boot(control_errors[layer])),
            "selectivity": sel, "selective": selective, "selectivity_sweep": sweep(sel["ci"], SELECT_SWEEP),
            "distance": {n: estimate(float(d.mean()), boot(d)) for n, d in dist.items()},
            "nearest": nearest,
            "nearest_rank": order.index(nearest),
            "indistinguishable": ties,
        })
    blocks = [l for l in lens if l >= 0]
    first, last = blocks[0], blocks[-1]
    rel_est = relative_drop(errors[first], errors[last], reference, boot)
    deep = len(blocks) > 1
    return {
        "_errors": errors, "_lens": lens, "_baselines": found, "_reference": reference,
        "_selective": {e["layer"]: e["selective"] for e in layers},
        "reference": ref_name,
        "ladder": [{"name": n, "error": estimate(float(own[n].mean()), boot(own[n]))} for n in order],
        "layers": layers,
        "refinement": {
            "first_block": first, "last_block": last, "relative_gain": rel_est, "criterion": REFINE_MARGIN,
            "control_relative_gain": relative_drop(control_errors[first], control_errors[last], reference, boot),
            "verdict": combine(verdict(rel_est["ci"], REFINE_MARGIN), layers[-1]["selective"]) if deep else "n/a",
            "sweep": {k: combine(v, layers[-1]["selective"]) for k, v in sweep(rel_est["ci"], REFINE_SWEEP).items()}
            if deep else {},
            "nearest_rank_rises": (layers[-1]["nearest_rank"] > layers[1]["nearest_rank"]) if deep else None,
        },
    }


class AlgorithmLadder(Probe):
    name = "ladder"
    description = "each layer's tuned-lens read-out against a ladder of algorithms (copy, GD-k, least squares, Bayes)"
    n_sequences = 512
    requires_hooks = ("blocks.0.hook_resid_pre", "blocks.{layer}.hook_resid_post")

    @classmethod
    def figures(cls, table, summary, run):
        return [ProbeFigure(cls.name, ladder_figure(table, f"Algorithm ladder: {run_title(run)}"),
                            "Distance between each layer's read-out (tuned lens) and each algorithm, crude → "
                            "refined; outlined: the nearest algorithm.")]

    def run(self, model, task, generator, device):
        fit = probe_batch(task, self.n_sequences, generator, device)
        test = probe_batch(task, self.n_sequences, generator, device)
        summary = {k: v for k, v in ladder(model, task, fit, test, generator).items() if not k.startswith("_")}
        rows = [{"layer": e["layer"], "algorithm": n, "distance": d["mean"], "lo": d["ci"][0], "hi": d["ci"][1],
                 "rank": i, "algorithm_error": summary["ladder"][i]["error"]["mean"], "layer_error": e["error"]["mean"]}
                for e in summary["layers"] for i, (n, d) in enumerate(e["distance"].items())]
        summary["note"] = ("distance: normalized squared distance between the layer's tuned-lens read-out and each "
                           "algorithm, mean over scored positions with a 95% bootstrap interval over probe sequences; "
                           "rungs ordered crude → refined by their own error")
        return ProbeResult(pd.DataFrame(rows), summary)
