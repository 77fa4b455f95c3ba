"""Specialization: what each layer does, and the seed paper's two claims, tested so they can fail.

Everything is measured on one set of probe sequences with one set of bootstrap resamples, so every score
has an interval and differences between scores are paired. A claim reads ``holds`` when its interval clears
its criterion, ``fails`` when it lies on the other side, ``inconclusive`` when it straddles it, ``n/a``
when the task or model cannot test it (never a failure). Each verdict is also shown at other criteria.

Per layer (every task):

* ``role``: the algorithm its tuned-lens read-out is nearest to on the ladder (:mod:`.ladder`: copy-last,
  GD-k, least squares, Bayes, ...), only where that read-out beats the same lens on untrained controls by an
  interval (else ``none``), with the read-out's error, the model's own read-out's (nothing fitted) and the
  refinement across the layer (drop of the lens's reducible error from before to after it).
* ``copy``: the layer's direct write (all heads and MLP through the read-out) regressed jointly on
  ``y_t`` (copy-last), ``y_{t-1}`` and the Bayes prediction (the target where the task has none), with
  intervals; also on the positions where copying and the answer disagree most (upper half of
  |answer - y_t|); and the write's size, its variance as a share of the prediction's.

The seed paper's claims (Bhargav & Gu 2024: "an initial estimate ... using a copying mechanism in the zeroth
layer, which is subsequently refined through negative similarity heads in the second layer"):

1. ``claim_1``, layer 0's write is a copy of ``y_t``: in *form* (the copy coefficient's interval within
   ``COPY_TOLERANCE`` of 1, the previous value's and the answer's within it of 0) and in *size* (the write's
   variance share clears ``SIZE_MARGIN``). An extrapolation 2·y_t − y_{t−1}, a damped difference or a
   negligible write fails. A layer 0 that writes nothing material fails too, also when the embedding itself
   carries y_t to the read-out: the claim is about layer 0 (``embedding_copy`` reports the embedding's own
   write). Needs ``copy_last`` (a task whose output is its next input); ``n/a`` elsewhere.
2. ``claim_2``, the refinement goes through negative-similarity attention, at layer 2 (the paper's "second
   layer", counted from the zeroth; ``n/a`` below three layers) and, as ``any_later_layer``, at any layer
   after 0. At a layer it needs all of: the layer refines (its read-out's reducible error drops by
   ``REFINE_MARGIN``, and the read-out is selective); a negative-similarity head (:mod:`.similarity`,
   position controlled) whose fitted dependence is causal (swapping a key's value moves the score as fitted);
   removing the *similarity dependence* from those heads' scores (their logits minus the fitted similarity
   term, positions untouched) moves their attention *probabilities* (mean total variation clearing
   ``PATTERN_MARGIN``) and raises the model's *excess over the Bayes limit* by ``ABLATION_MARGIN`` of that
   excess (floored at ``EXCESS_FLOOR``, so vanishing errors cannot make large ratios). Whole-head
   mean-ablation and mean-pattern ablation costs are reported beside it, not judged.

``refines_with_depth`` (every task, from the ladder) is the generalized pattern: the selective read-out after
the last block has less reducible error than after the first.

``iclbench specialization`` combines these over runs (:meth:`Specialization.cross_run_table`): per
(task, model) the labels per seed, and each key number's mean with a Student-t interval over training seeds
(:func:`.stats.seed_ci`, coverage checked by simulation), read against the same criteria.
"""

from __future__ import annotations

import pandas as pd
import torch

from iclbench import Probe, ProbeResult
from iclbench.evaluate import is_evidence

from .attribution import contributions
from .common import baselines, clean, has_heads, probe_batch, scored_positions, sq_error
from .ladder import REFINE_MARGIN, ladder
from .similarity import MIN_EFFECT, causal_slopes, similarity_heads
from .stats import (EXCESS_FLOOR, HOLDS, NA, any_of, combine, estimate, ratio, regression_with_ci, relative_drop,
                    resample_weights, seed_ci, sweep, verdict, within)

#: claim 1, form: the copy coefficient within this of 1, the previous value's and the answer's within it of 0
COPY_TOLERANCE = 0.25
COPY_SWEEP = (0.1, 0.25, 0.5, 1.0)
#: claim 1, size: layer 0's write must carry at least this share of the prediction's variance
SIZE_MARGIN = 0.25
SIZE_SWEEP = (0.05, 0.1, 0.25, 0.5)
#: claim 2: removing the similarity dependence must move the heads' attention by this mean total variation (an
#: inert term moves it by < 1e-20; the wired positive controls by 0.6-0.76)
PATTERN_MARGIN = 0.02
PATTERN_SWEEP = (0.005, 0.01, 0.02, 0.05, 0.1)
#: claim 2: ... and raise the model's excess over the Bayes limit by this fraction of it (floored)
ABLATION_MARGIN = 0.25
ABLATION_SWEEP = (0.0, 0.1, 0.25, 1.0, 4.0)
#: the paper's "second layer", counted from the zeroth
PAPER_LAYER = 2

#: the similarity regression's sample, as a multiple of the probe's sequences
SIMILARITY_SEQUENCES = 4

CRITERIA = {"copy_tolerance": COPY_TOLERANCE, "size_margin": SIZE_MARGIN, "refine_margin": REFINE_MARGIN,
            "pattern_margin": PATTERN_MARGIN, "ablation_margin": ABLATION_MARGIN, "excess_floor": EXCESS_FLOOR}


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
    return fit


def copy_form(fit: dict, tolerance: float = COPY_TOLERANCE) -> str:
    """The write is y_t in form: the copy coefficient within ``tolerance`` of 1, the others within it of 0."""
    return combine(within(fit["copy"]["ci"], 1 - tolerance, 1 + tolerance),
                   within(fit["previous"]["ci"], -tolerance, tolerance),
                   within(fit["answer"]["ci"], -tolerance, tolerance))


def variance_share(write, pred, targets, positions, boot) -> dict:
    """The write's variance over the scored positions as a share of the read-out's: the larger of the
    prediction's and the target's (so a model that predicts almost nothing cannot make a tiny write look
    material). Pooled over sequences, each term centred on its overall mean."""
    def spread(x):
        x = x[:, positions].double().cpu()
        return (x - x.mean()).pow(2).flatten(1).sum(1)

    sw, sp, st = spread(write), spread(pred), spread(targets)
    den = lambda f: torch.maximum(f(sp), f(st)).clamp_min(1e-12)  # noqa: E731
    return estimate(float(sw.sum() / den(torch.sum)), boot(sw) / den(boot))


def copy_test(write, pred, targets, signals, scored, generator, weights, boot) -> dict:
    """Claim 1's measurements of one write: the regression, its size, and the verdicts."""
    fit = copy_regression(write, signals, scored, generator, weights)
    share = variance_share(write, pred, targets, scored, boot)
    form, size = copy_form(fit), verdict(share["ci"], SIZE_MARGIN)
    return {"fit": fit, "variance_share": share, "form": form, "size": size, "verdict": combine(form, size)}


def _heads_by_layer(heads):
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    return by_layer


@torch.no_grad()
def ablated_error(model, task, batch, heads: list[tuple[int, int]]) -> torch.Tensor:
    """Per-sequence error over the scored positions with ``heads`` mean-ablated together (their output
    replaced by its mean over the batch at each position)."""
    def hook_for(hs):
        def ablate(z, hook):
            z = z.clone()
            z[:, :, hs] = z[:, :, hs].mean(0, keepdim=True)
            return z
        return ablate

    return _patched_error(model, task, batch, [(f"blocks.{l}.attn.hook_z", hook_for(hs))
                                               for l, hs in _heads_by_layer(heads).items()])


def _patched_error(model, task, batch, hooks) -> torch.Tensor:
    norm = task.normalizer(batch.inputs.device)
    scored = scored_positions(task, batch).to(batch.inputs.device)
    pred = model.run_with_hooks(batch.inputs, hooks)
    return sq_error(pred, batch.targets, norm)[:, scored].mean(1).double().cpu()


@torch.no_grad()
def mean_pattern_error(model, task, batch, layer: int, heads: list[int]) -> torch.Tensor:
    """Per-sequence error with the heads' attention patterns replaced by their mean over the batch (the
    position-only expectation: every value dependence removed, the positional pattern kept)."""
    def patch(pattern, hook):
        pattern = pattern.clone()
        pattern[:, heads] = pattern[:, heads].mean(0, keepdim=True)
        return pattern

    return _patched_error(model, task, batch, [(f"blocks.{layer}.attn.hook_pattern", patch)])


@torch.no_grad()
def similarity_removed(model, task, batch, layer: int, heads: list[int], coefficients: list[float]):
    """``(error [B], moved [B])`` with the fitted similarity term taken out of the heads' scores: each
    head's logit of key k for query q loses ``coefficient · (x_q·x_k − its mean over sequences at (q, k))``
    (positions untouched). ``moved``: total variation between the heads' patterns with and without it,
    averaged over the heads and the scored queries of each sequence."""
    x = batch.inputs.float()
    sim = x @ x.transpose(1, 2)  # [B, Tq, Tk]
    sim = sim - sim.mean(0, keepdim=True)
    beta = torch.tensor(coefficients, dtype=sim.dtype, device=sim.device)[None, :, None, None]
    scored = scored_positions(task, batch).to(batch.inputs.device)
    seen = {}

    def remove(scores, hook):  # the pattern before the removal is the softmax of the scores it receives
        seen["before"] = scores[:, heads].softmax(-1).detach()
        scores = scores.clone()
        scores[:, heads] = scores[:, heads] - (beta * sim[:, None]).to(scores.dtype)
        return scores

    def after(pattern, hook):
        seen["after"] = pattern[:, heads].detach()

    error = _patched_error(model, task, batch, [(f"blocks.{layer}.attn.hook_attn_scores", remove),
                                                (f"blocks.{layer}.attn.hook_pattern", after)])
    tv = 0.5 * (seen["after"] - seen["before"]).abs().sum(-1)  # [B, h, Tq]
    return error, tv[:, :, scored].mean((1, 2)).double().cpu()


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
    errors, reference = lad["_errors"], lad["_reference"]  # per-sequence lens error after each layer (-1: embedding)

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
        lens = lad["layers"][l + 1]
        entry = {"layer": l, "role": lens["role"], "nearest": lens["nearest"],
                 "indistinguishable": lens["indistinguishable"], "lens_error": lens["error"],
                 "direct_error": lens["direct_error"], "control_error": lens["control_error"],
                 "selectivity": lens["selectivity"], "selective": lens["selective"],
                 "refinement": relative_drop(errors[l - 1], errors[l], reference, boot),
                 "direct_rms": clean(float(write[:, scored].pow(2).mean().sqrt()))}
        entry["refines"] = combine(verdict(entry["refinement"]["ci"], REFINE_MARGIN), lens["selective"])
        if signals is not None:
            test_l = copy_test(write, pred, test.targets, signals, scored, generator, weights, boot)
            entry["copy"] = test_l["fit"] | {"variance_share": test_l["variance_share"], "form": test_l["form"],
                                             "size": test_l["size"]}
            entry["copy_where_they_disagree"] = copy_regression(write, signals, scored, generator, weights,
                                                                disagree)
            entry["copies"] = test_l["verdict"]
        if l >= 1 and heads_ok:
            entry.update(negative_similarity(model, task, test, l, sim, causal, model_err, reference, boot,
                                             entry["refines"]))
        layers.append(entry)

    claim1 = {"verdict": NA}
    if signals is not None:
        c0 = layers[0]["copy"]
        embed = copy_test(parts[("embed", -1, -1)], pred, test.targets, signals, scored, generator, weights, boot)
        claim1 = {"verdict": layers[0]["copies"], "form": c0["form"], "size": c0["size"],
                  "coefficients": {k: c0[k] for k in ("copy", "previous", "answer")},
                  "variance_share": c0["variance_share"],
                  "where_they_disagree": {k: layers[0]["copy_where_they_disagree"][k]
                                          for k in ("copy", "previous", "answer")},
                  "embedding_copy": {"verdict": embed["verdict"], "variance_share": embed["variance_share"],
                                     "copy": embed["fit"]["copy"]},
                  "lens_after_layer0": copy_regression(lad["_lens"][0], signals, scored, generator, weights),
                  "sweep": {f"tolerance {t:g}": combine(copy_form(c0, t), c0["size"]) for t in COPY_SWEEP}
                  | {f"size {m:g}": combine(c0["form"], verdict(c0["variance_share"]["ci"], m))
                     for m in SIZE_SWEEP}}
    claim2 = [e.get("claim_2", NA) for e in layers[1:]]
    value_attention = [e.get("claim_2_value_attention", NA) for e in layers[1:]]
    summary = {
        "roles": [e["role"] for e in layers],
        "ladder": lad["ladder"],
        "reference": lad["reference"],
        "refines_with_depth": lad["refinement"],
        "claim_1": claim1 | {"criterion": {"tolerance": COPY_TOLERANCE, "size": SIZE_MARGIN}},
        "claim_2": {"verdict": claim2[PAPER_LAYER - 1] if len(claim2) >= PAPER_LAYER else NA,
                    "layer": PAPER_LAYER,
                    "last_layer": claim2[-1] if claim2 else NA,
                    "any_later_layer": any_of(claim2) if claim2 else NA,
                    "layers_holding": [l + 1 for l, v in enumerate(claim2) if v == HOLDS],
                    # the looser reading (any value dependence of the heads' attention, not only similarity)
                    "value_attention": {"verdict": value_attention[PAPER_LAYER - 1]
                                        if len(value_attention) >= PAPER_LAYER else NA,
                                        "any_later_layer": any_of(value_attention) if value_attention else NA}},
        "model_error": estimate(float(model_err.mean()), boot(model_err)),
        "excess_over_reference": estimate(float((model_err - reference).mean()), boot(model_err - reference)),
        "layers": layers,
        "criteria": dict(CRITERIA),
    }
    return summary


def negative_similarity(model, task, test, layer, sim, causal, model_err, reference, boot, refines) -> dict:
    """Claim 2 at one layer: its negative-similarity heads, their causal check, and what removing their
    similarity dependence does to their attention and to the model's excess over the reference."""
    heads = {h: e for h, e in sim["heads"].items() if h.startswith(f"L{layer}H")}
    # per head: is it negative-similarity (effect below -MIN_EFFECT)? A head that is clearly not (its interval
    # above -MIN_EFFECT, e.g. a positive one that straddles +MIN_EFFECT) answers "no", not "inconclusive"
    is_negative = {h: verdict(e["effect"]["ci"], -MIN_EFFECT, above=False) for h, e in heads.items()}
    neg = [h for h, v in is_negative.items() if v == HOLDS]
    found = any_of(list(is_negative.values()))
    out = {"similarity_heads": {h: {"label": e["label"], "effect": e["effect"]} for h, e in heads.items()},
           "negative_heads": neg}
    if not neg:
        out["claim_2"] = out["claim_2_value_attention"] = combine(refines, found)
        return out
    excess = model_err - reference

    def cost(err):  # the rise of the model's excess, as a fraction of that excess (floored)
        return ratio(err - model_err, excess, boot)

    idx = [_head(h)[1] for h in neg]
    removed, moved = similarity_removed(model, task, test, layer, idx,
                                        [sim["_coefs"][(layer, h)][0] for h in idx])
    removal = cost(removed)
    out["causal"] = {h: causal[h] for h in neg if h in causal}
    out["attention_moved"] = estimate(float(moved.mean()), boot(moved))
    out["similarity_removal_cost"] = removal
    out["ablation_sweep"] = sweep(removal["ci"], ABLATION_SWEEP)
    out["mean_pattern_cost"] = cost(mean_pattern_error(model, task, test, layer, idx))
    out["head_ablation_cost"] = cost(ablated_error(model, task, test, [_head(h) for h in neg]))
    causal_ok = any_of([c["verdict"] for c in out["causal"].values()])
    out["attention_sweep"] = sweep(out["attention_moved"]["ci"], PATTERN_SWEEP)
    out["claim_2"] = combine(refines, found, causal_ok, verdict(out["attention_moved"]["ci"], PATTERN_MARGIN),
                             verdict(removal["ci"], ABLATION_MARGIN))
    # the looser reading, shown beside the verdict: the cost of removing *every* value dependence of the heads'
    # attention (mean pattern), which may be a dependence other than similarity
    out["claim_2_value_attention"] = combine(refines, found, causal_ok,
                                             verdict(out["attention_moved"]["ci"], PATTERN_MARGIN),
                                             verdict(out["mean_pattern_cost"]["ci"], ABLATION_MARGIN))
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
            row = {"layer": e["layer"], "role": e["role"], "nearest": e["nearest"], "lens_error": e["lens_error"]["mean"],
                   "direct_error": e["direct_error"]["mean"], "control_error": e["control_error"]["mean"],
                   "selectivity": e["selectivity"]["mean"], "selective": e["selective"],
                   "refinement": e["refinement"]["mean"], "refinement_lo": e["refinement"]["ci"][0],
                   "refinement_hi": e["refinement"]["ci"][1], "refines": e["refines"], "direct_rms": e["direct_rms"]}
            if "copy" in e:
                c = e["copy"]
                row.update({"copy_coef": c["copy"]["mean"], "previous_coef": c["previous"]["mean"],
                            "answer_coef": c["answer"]["mean"], "variance_share": c["variance_share"]["mean"],
                            "form": c["form"], "size": c["size"], "copies": e["copies"]})
            row["negative_heads"] = " ".join(e.get("negative_heads", []))
            if "similarity_removal_cost" in e:
                row.update({"attention_moved": e["attention_moved"]["mean"],
                            "similarity_removal_cost": e["similarity_removal_cost"]["mean"],
                            "mean_pattern_cost": e["mean_pattern_cost"]["mean"],
                            "head_ablation_cost": e["head_ablation_cost"]["mean"]})
            row["claim_2"] = e.get("claim_2", NA)
            rows.append(row)
        return ProbeResult(pd.DataFrame(rows), summary)

    @classmethod
    def cross_run_table(cls, runs: pd.DataFrame) -> pd.DataFrame:
        """One row per (task, model): each claim's labels over seeds, and the key numbers as the mean over
        seeds with a 95% Student-t interval over seeds, labelled against the probe's own criteria (so the
        row's verdict is about the population of trained models, not one seed). Only runs that learned their
        task count as evidence for or against a claim (:func:`iclbench.evaluate.is_evidence`: the interval of
        the run's excess over Bayes lies below the not-learned cut); a cell without one says "not learned"
        instead of a verdict."""
        rows = []
        runs = runs[runs["summary"].map(lambda s: isinstance(s, dict) and "claim_1" in s)]
        if "learned" not in runs:  # a caller without the Bayes labels: every run counts
            runs = runs.assign(learned=None, excess_bayes=None)
        if "evidence" not in runs:
            runs = runs.assign(evidence=[is_evidence({"learned": label}) for label in runs["learned"]])
        depth = max((len(s["roles"]) for s in runs["summary"]), default=0)  # a column per layer of the deepest
        for (task, model), group in runs.groupby(["task", "model"], sort=True):
            every = list(group["summary"])
            # the evidence: runs that learned their task (or partly, or a task without a Bayes baseline);
            # a model that may not have learned it says nothing about how a trained model solves it
            learned = [label if isinstance(label, str) else NA for label in group["learned"]]
            summaries = [s for s, evidence in zip(every, group["evidence"]) if evidence]
            n = len(summaries)
            row = {"task": task, "model": model, "seeds": len(every), "learned": across_seeds(learned)}
            for l in range(depth):
                roles = pd.Series([s["roles"][l] for s in every if l < len(s["roles"])]).value_counts()
                row[f"layer {l}"] = f"{roles.index[0]} {roles.iloc[0]}/{len(every)}" if len(roles) else "—"
            per_seed = [claim_verdicts(s) for s in summaries]
            for label in CLAIM_LABELS:
                row[label] = across_seeds([v[label] for v in per_seed]) if n else "not learned"
            copy = [s["claim_1"]["coefficients"]["copy"]["mean"] for s in summaries if "coefficients" in s["claim_1"]]
            row["L0 copy coefficient"] = seed_interval(copy, None)
            row["refinement first→last"] = seed_interval(  # n/a with one block: nothing to compare
                [s["refines_with_depth"]["relative_gain"]["mean"] for s in summaries
                 if s["refines_with_depth"]["verdict"] != NA], REFINE_MARGIN)
            # the evaluation's headline error (``runs.error``, the leaderboard's number) where the runs give it,
            # so that one model has one error in every table; else the probe's own, on its probe sequences
            evaluated = [v for v in group.get("error", ()) if isinstance(v, (int, float)) and v == v]
            row["model error"] = seed_interval(evaluated if len(evaluated) == len(every) else
                                               [s["model_error"]["mean"] for s in every], None, digits=4)
            row["excess over Bayes"] = seed_interval(
                [v for v in group["excess_bayes"] if isinstance(v, (int, float)) and v == v], None, digits=4)
            rows.append(row)
        return pd.DataFrame(rows)


#: the claims judged for each trained model, in table order
CLAIM_LABELS = ("claim 1: layer 0 copies", "claim 2: layer 2 refines via neg.-similarity heads",
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


def seed_interval(values, criterion, digits: int = 2) -> str:
    """'mean [lo, hi]' over training seeds (Student-t, :func:`.stats.seed_ci`), with the verdict against
    ``criterion``."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    mean, ci = sum(values) / len(values), seed_ci(values)
    text = f"{mean:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text if criterion is None else f"{text} {verdict(ci, criterion)}"
