"""Specialization: what each layer does, and the seed paper's two claims, tested so they can fail.

Everything is measured on one set of probe sequences with one set of bootstrap resamples, so every score
has an interval and differences between scores are paired. A claim reads ``holds`` when its interval clears
its criterion, ``fails`` when it lies on the other side, ``inconclusive`` when it straddles it, ``n/a``
when the task or model cannot test it (never a failure). Each verdict is also shown at other criteria.

Per layer (every task):

* ``role``: the algorithm its tuned-lens read-out is nearest to on the ladder (:mod:`.ladder`: copy-last,
  GD-k, least squares, Bayes, ...), with the read-out's error and the relative refinement across the layer
  (drop of the lens error from before to after it).
* ``copy``: the layer's direct write (all heads and MLP through the read-out) regressed jointly on
  ``y_t`` (copy-last), ``y_{t-1}`` and the Bayes prediction (the target where the task has none), with
  intervals; also on the positions where copying and the answer disagree most (upper half of
  |answer - y_t|). A layer that writes the answer correlates with copy-last (the target itself does, ≈ 0.87
  on affine), but its copy coefficient does not dominate.

The seed paper's claims (Bhargav & Gu 2024):

1. ``claim_1``, layer 0 copies: in layer 0's write the copy coefficient dominates — it exceeds the
   magnitude of both the previous value's and the answer's coefficient (``copy_dominance`` >
   ``COPY_MARGIN``). Needs ``copy_last`` (a task whose output is its next input); ``n/a`` elsewhere.
2. ``claim_2``, the last layer refines through negative-similarity heads: the layer refines (relative gain
   > ``REFINE_MARGIN``), holds a negative-similarity head (:mod:`.similarity`, position controlled), whose
   dependence is confirmed causally (swapping a key's value moves the score as fitted), and mean-ablating the
   layer's negative-similarity heads together raises the model's error by more than ``ABLATION_MARGIN``
   (relative). ``claim_2_any_later_layer`` asks the same of any layer after 0.

``refines_with_depth`` (every task, from the ladder) is the generalized pattern: the read-out after the
first block is worse than after the last one.

``iclbench specialization`` combines these over runs (:meth:`Specialization.cross_run_table`): per
(task, model) the labels per seed, and each key number's mean with an interval over training seeds, read
against the same criteria.
"""

from __future__ import annotations

import pandas as pd
import torch

from iclbench import Probe, ProbeResult

from .attribution import contributions
from .common import baselines, clean, has_heads, probe_batch, scored_positions, sq_error
from .ladder import REFINE_MARGIN, ladder, relative_drop
from .similarity import MIN_EFFECT, causal_slopes, similarity_heads
from .stats import (HOLDS, NA, any_of, combine, estimate, regression_with_ci, resample_weights, sweep,
                    verdict)

#: claim 1: the copy coefficient must exceed the other signals' (in magnitude) by this much in layer 0's write
COPY_MARGIN = 0.0
COPY_SWEEP = (-0.5, -0.25, 0.0, 0.25, 0.5)
#: claim 2: mean-ablating the negative-similarity heads must raise the model's error by this fraction
ABLATION_MARGIN = 0.25
ABLATION_SWEEP = (0.0, 0.1, 0.25, 1.0, 4.0)

#: the similarity regression's sample, as a multiple of the probe's sequences
SIMILARITY_SEQUENCES = 4

CRITERIA = {"copy_margin": COPY_MARGIN, "refine_margin": REFINE_MARGIN, "ablation_margin": ABLATION_MARGIN}


def copy_signals(task, batch, found=None):
    """``{"copy", "previous", "answer"}`` ``[B, T, d]``, or ``None`` when the task has no copy-last (its
    outputs are not its next inputs). ``found``: the baselines' predictions on ``batch``, when computed."""
    found = baselines(task, batch) if found is None else found
    if "copy_last" not in found or found["copy_last"].shape != batch.targets.shape:
        return None
    copy = found["copy_last"].float()
    previous = torch.cat([torch.zeros_like(copy[:, :1]), copy[:, :-1]], 1)
    answer = found["bayes"].float() if "bayes" in found and found["bayes"].shape == copy.shape \
        else batch.targets.float()
    return {"copy": copy, "previous": previous, "answer": answer}


def copy_regression(response, signals, positions, generator, weights, subset=None) -> dict:
    """Coefficients of ``response ≈ c + copy·y_t + previous·y_{t-1} + answer·ŷ`` over ``positions`` (rows
    of ``subset`` only, when given), with intervals, and ``copy − answer``."""
    names = ["copy", "previous", "answer"]
    cols = [torch.ones_like(response)] + [signals[n] for n in names]
    design = torch.stack(cols, -1)[:, positions]  # [B, P, d, 4]
    y = response[:, positions]
    if subset is not None:
        keep = subset[:, positions].to(design.dtype)
        design, y = design * keep[..., None], y * keep
    B = design.shape[0]
    fit = regression_with_ci(design.reshape(B, -1, 4), y.reshape(B, -1), generator, ["intercept"] + names,
                             weights)
    samples, point = fit.pop("_samples"), fit.pop("_point")
    fit["copy_minus_answer"] = estimate(float(point[1] - point[3]), samples[:, 1] - samples[:, 3])

    def dominance(b):  # the copy coefficient over the largest other signal's, in magnitude
        return b[..., 1] - torch.maximum(b[..., 2].abs(), b[..., 3].abs())

    fit["copy_dominance"] = estimate(float(dominance(point)), dominance(samples))
    return fit


def copies(fit: dict, margin: float = COPY_MARGIN) -> str:
    """The copy coefficient dominates: it exceeds the magnitude of both the previous value's and the answer's
    by ``margin`` (so it is positive)."""
    return verdict(fit["copy_dominance"]["ci"], margin)


@torch.no_grad()
def ablated_error(model, task, batch, heads: list[tuple[int, int]]) -> torch.Tensor:
    """Per-sequence error over the scored positions with ``heads`` mean-ablated together (their output
    replaced by its mean over the batch at each position)."""
    norm = task.normalizer(batch.inputs.device)
    scored = scored_positions(task, batch).to(batch.inputs.device)
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)

    def hook_for(hs):
        def ablate(z, hook):
            z = z.clone()
            z[:, :, hs] = z[:, :, hs].mean(0, keepdim=True)
            return z
        return ablate

    pred = model.run_with_hooks(batch.inputs, [(f"blocks.{l}.attn.hook_z", hook_for(hs))
                                               for l, hs in by_layer.items()])
    return sq_error(pred, batch.targets, norm)[:, scored].mean(1).double().cpu()


def _head(name: str) -> tuple[int, int]:
    return int(name[1:name.index("H")]), int(name[name.index("H") + 1:])


def layer_roles(model, task, generator, device, n: int = 1024) -> dict:
    """The per-layer measurements, the claims and their criteria sweeps (see the module docstring)."""
    fit, test = probe_batch(task, n, generator, device), probe_batch(task, n, generator, device)
    scored = scored_positions(task, test).to(test.inputs.device)
    weights = resample_weights(len(test), generator)
    boot = lambda x: (weights @ x) / weights.sum(1)  # noqa: E731
    L = model.n_layers

    lad = ladder(model, task, fit, test, generator, weights)
    errors = lad["_errors"]  # per-sequence tuned-lens error after each layer (-1: embedding)

    parts, _, pred = contributions(model, test)  # the prediction comes with the parts: no second forward pass
    norm = task.normalizer(test.inputs.device)
    model_err = sq_error(pred, test.targets, norm)[:, scored].mean(1).double().cpu()
    signals = copy_signals(task, test, lad["_baselines"])
    if signals is not None:
        gap = (signals["answer"] - signals["copy"]).abs()
        disagree = gap >= gap[:, scored].median()

    heads_ok = has_heads(model) and "blocks.0.attn.hook_attn_scores" in model.hook_points() and L > 1
    sim, causal = {"heads": {}}, {}
    if heads_ok:
        # the similarity fit is cheap per sequence and its heads' effects are small: it gets its own, larger
        # sample (SIMILARITY_SEQUENCES x n), so a head's label does not hinge on the probe draw
        wide = probe_batch(task, SIMILARITY_SEQUENCES * n, generator, device)
        sim = similarity_heads(model, task, wide, generator, layers=list(range(1, L)))
        negative = [_head(h) for h, e in sim["heads"].items() if e["label"] == "negative"]
        causal = causal_slopes(model, task, wide, sim, negative, generator) if negative else {}

    layers = []
    for l in range(L):
        write = sum(c for (kind, layer, _), c in parts.items() if layer == l)
        entry = {"layer": l, "role": lad["layers"][l + 1]["nearest"],
                 "indistinguishable": lad["layers"][l + 1]["indistinguishable"],
                 "lens_error": lad["layers"][l + 1]["error"],
                 "refinement": relative_drop(errors[l - 1], errors[l], boot),
                 "direct_rms": clean(float(write[:, scored].pow(2).mean().sqrt()))}
        entry["refines"] = verdict(entry["refinement"]["ci"], REFINE_MARGIN)
        if signals is not None:
            entry["copy"] = copy_regression(write, signals, scored, generator, weights)
            entry["copy_where_they_disagree"] = copy_regression(write, signals, scored, generator, weights,
                                                                disagree)
            entry["copies"] = copies(entry["copy"])
        if l >= 1 and heads_ok:
            entry.update(negative_similarity(model, task, test, l, sim, causal, model_err, boot, entry["refines"]))
        layers.append(entry)

    claim1 = NA
    if signals is not None:
        c0 = layers[0]["copy"]
        claim1 = copies(c0)
        lens_fit = copy_regression(lad["_lens"][0], signals, scored, generator, weights)
    claim2 = [e.get("claim_2", NA) for e in layers[1:]]
    summary = {
        "roles": [e["role"] for e in layers],
        "ladder": lad["ladder"],
        "refines_with_depth": lad["refinement"],
        "claim_1": {"verdict": claim1, "criterion": COPY_MARGIN} | (
            {"copy_dominance": c0["copy_dominance"], "copy_minus_answer": c0["copy_minus_answer"],
             "where_they_disagree": layers[0]["copy_where_they_disagree"]["copy_dominance"],
             "lens_after_layer0": lens_fit,
             "sweep": {f"{m:g}": copies(c0, m) for m in COPY_SWEEP}} if signals is not None else {}),
        "claim_2": {"verdict": claim2[-1] if claim2 else NA,
                    "any_later_layer": any_of(claim2) if claim2 else NA,
                    "layers_holding": [l + 1 for l, v in enumerate(claim2) if v == HOLDS]},
        "model_error": estimate(float(model_err.mean()), boot(model_err)),
        "layers": layers,
        "criteria": dict(CRITERIA),
    }
    return summary


def negative_similarity(model, task, test, layer, sim, causal, model_err, boot, refines) -> dict:
    """Claim 2 at one layer: its negative-similarity heads, their causal check, the cost of ablating them."""
    heads = {h: e for h, e in sim["heads"].items() if h.startswith(f"L{layer}H")}
    # per head: is it negative-similarity (effect below -MIN_EFFECT)? A head that is clearly not (its interval
    # above -MIN_EFFECT, e.g. a positive one that straddles +MIN_EFFECT) answers "no", not "inconclusive"
    is_negative = {h: verdict(e["effect"]["ci"], -MIN_EFFECT, above=False) for h, e in heads.items()}
    neg = [h for h, v in is_negative.items() if v == HOLDS]
    found = any_of(list(is_negative.values()))
    out = {"similarity_heads": {h: {"label": e["label"], "effect": e["effect"]} for h, e in heads.items()},
           "negative_heads": neg}
    if not neg:
        out["claim_2"] = combine(refines, found)
        return out
    cost = ablated_error(model, task, test, [_head(h) for h in neg]) - model_err
    rel = estimate(float(cost.mean() / model_err.mean().clamp_min(1e-12)),
                   boot(cost) / boot(model_err).clamp_min(1e-12))
    out["causal"] = {h: causal[h] for h in neg if h in causal}
    out["ablation_cost"] = rel
    out["ablation_sweep"] = sweep(rel["ci"], ABLATION_SWEEP)
    out["claim_2"] = combine(refines, found, any_of([c["verdict"] for c in out["causal"].values()]),
                             verdict(rel["ci"], ABLATION_MARGIN))
    return out


class Specialization(Probe):
    name = "specialization"
    description = ("per layer: nearest algorithm, refinement, copy test; the seed paper's claims as holds / fails / "
                   "inconclusive from intervals")
    n_sequences = 1024
    requires_hooks = ("hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.{layer}.hook_resid_post",
                      "blocks.{layer}.hook_attn_out")
    requires_attributes = ("readout", "direct_readout")

    def run(self, model, task, generator, device):
        summary = layer_roles(model, task, generator, device, self.n_sequences)
        rows = []
        for e in summary["layers"]:
            row = {"layer": e["layer"], "role": e["role"], "lens_error": e["lens_error"]["mean"],
                   "refinement": e["refinement"]["mean"], "refinement_lo": e["refinement"]["ci"][0],
                   "refinement_hi": e["refinement"]["ci"][1], "refines": e["refines"], "direct_rms": e["direct_rms"]}
            if "copy" in e:
                row.update({"copy_coef": e["copy"]["copy"]["mean"], "answer_coef": e["copy"]["answer"]["mean"],
                            "previous_coef": e["copy"]["previous"]["mean"],
                            "copy_dominance": e["copy"]["copy_dominance"]["mean"],
                            "copy_dominance_lo": e["copy"]["copy_dominance"]["ci"][0],
                            "copy_dominance_hi": e["copy"]["copy_dominance"]["ci"][1], "copies": e["copies"]})
            row["negative_heads"] = " ".join(e.get("negative_heads", []))
            row["claim_2"] = e.get("claim_2", NA)
            rows.append(row)
        return ProbeResult(pd.DataFrame(rows), summary)

    @classmethod
    def cross_run_table(cls, runs: pd.DataFrame) -> pd.DataFrame:
        """One row per (task, model): each claim's labels over seeds, and the key numbers as the mean over
        seeds with a 95% bootstrap interval over seeds, labelled against the probe's own criteria (so the
        row's verdict is about the population of trained models, not one seed). Only runs that learned their
        task count as evidence for or against a claim: a cell whose every run is "not learned" (by the
        Bayes-excess rule, :func:`iclbench.evaluate.learned_label`) says so instead of a verdict."""
        rows = []
        runs = runs[runs["summary"].map(lambda s: isinstance(s, dict) and "claim_1" in s)]
        if "learned" not in runs:  # a caller without the Bayes labels: every run counts
            runs = runs.assign(learned=None, excess_bayes=None)
        depth = max((len(s["roles"]) for s in runs["summary"]), default=0)  # a column per layer of the deepest
        for (task, model), group in runs.groupby(["task", "model"], sort=True):
            every = list(group["summary"])
            # the evidence: runs that learned their task (or partly, or a task without a Bayes baseline);
            # a model that did not learn it says nothing about how a trained model solves it
            learned = [label if isinstance(label, str) else NA for label in group["learned"]]
            summaries = [s for s, label in zip(every, learned) if label != "not learned"]
            n = len(summaries)
            row = {"task": task, "model": model, "seeds": len(every), "learned": across_seeds(learned)}
            for l in range(depth):
                roles = pd.Series([s["roles"][l] for s in every if l < len(s["roles"])]).value_counts()
                row[f"layer {l}"] = f"{roles.index[0]} {roles.iloc[0]}/{len(every)}" if len(roles) else "—"
            per_seed = [claim_verdicts(s) for s in summaries]
            for label in CLAIM_LABELS:
                row[label] = across_seeds([v[label] for v in per_seed]) if n else "not learned"
            copy = [s["claim_1"]["copy_dominance"]["mean"] for s in summaries if "copy_dominance" in s["claim_1"]]
            row["L0 copy dominance"] = seed_interval(copy, COPY_MARGIN)
            row["refinement first→last"] = seed_interval(  # n/a with one block: nothing to compare
                [s["refines_with_depth"]["relative_gain"]["mean"] for s in summaries
                 if s["refines_with_depth"]["verdict"] != NA], REFINE_MARGIN)
            row["model error"] = seed_interval([s["model_error"]["mean"] for s in every], None, digits=4)
            row["excess over Bayes"] = seed_interval(
                [v for v in group["excess_bayes"] if isinstance(v, (int, float)) and v == v], None, digits=4)
            rows.append(row)
        return pd.DataFrame(rows)


#: the claims judged for each trained model, in table order
CLAIM_LABELS = ("claim 1: layer 0 copies", "claim 2: last layer refines via neg.-similarity heads",
                "claim 2 (any later layer)", "paper's pattern", "refines with depth")


def claim_verdicts(summary: dict) -> dict[str, str]:
    """One model's verdict on each claim (:data:`CLAIM_LABELS`) from its specialization summary; the paper's
    pattern is claims 1 and 2 together."""
    c1, c2 = summary["claim_1"]["verdict"], summary["claim_2"]["verdict"]
    return dict(zip(CLAIM_LABELS, (c1, c2, summary["claim_2"]["any_later_layer"], combine(c1, c2),
                                   summary["refines_with_depth"]["verdict"])))


def across_seeds(labels: list[str]) -> str:
    """'holds 4/5 (inconclusive 1)': the per-seed labels counted; n/a only when no seed could test it."""
    tested = [v for v in labels if v != NA]
    if not tested:
        return NA
    counts = pd.Series(tested).value_counts()
    head = f"{counts.index[0]} {counts.iloc[0]}/{len(labels)}"
    rest = ", ".join(f"{k} {v}" for k, v in counts.iloc[1:].items())
    return f"{head} ({rest})" if rest else head


def seed_interval(values, criterion, digits: int = 2, replicates: int = 2000) -> str:
    """'mean [lo, hi]' over training seeds (bootstrap over seeds), with the verdict against ``criterion``."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    x = torch.tensor(values, dtype=torch.float64)
    if len(values) == 1:
        return f"{float(x[0]):.{digits}f} (1 seed)"
    gen = torch.Generator().manual_seed(0)
    w = resample_weights(len(x), gen, replicates)
    est = estimate(float(x.mean()), (w @ x) / w.sum(1))
    text = f"{est['mean']:.{digits}f} [{est['ci'][0]:.{digits}f}, {est['ci'][1]:.{digits}f}]"
    return text if criterion is None else f"{text} {verdict(est['ci'], criterion)}"
