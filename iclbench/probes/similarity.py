"""Similarity heads: does a head's attention depend on how similar the query's value is to the key's?

The seed paper (Bhargav & Gu 2024) describes "negative similarity" heads. Counting the attention mass on
the most similar earlier value cannot test that: in a smooth sequence the most similar value is usually the
previous one, so the statistic mostly measures previous-token attention. Here the dependence is isolated
with position held fixed. Per head, the pre-softmax score of query ``q`` on key ``k`` is regressed on

    x_q·x_k  (similarity),   x_k,   |x_k|²,   one indicator per (q, k) position pair,

all centred within each query's row (softmax ignores what is common to a row, so only differences between
keys of one query count). With ``x_k`` and ``|x_k|²`` in the model, the similarity coefficient is exactly
the coefficient on ``-|x_q - x_k|² / 2``: a head is *negative-similarity* when it is below 0 with its
interval excluding 0, *positive-similarity* when above. Intervals are bootstrapped over sequences, at a
Bonferroni-corrected level over all heads tested. ``effect`` is the coefficient times the within-row
standard deviation of the similarity: nats of attention logit per standard deviation.

Causal check (:func:`causal_slopes`): the input at one key position is replaced by another sequence's
input there; the observed change of the key's score relative to earlier keys (which the change cannot
reach) is regressed on the change the fitted dependence predicts. A slope whose interval is above 0 says
the dependence is causal, a slope near 1 that the fit accounts for all of it.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from iclbench import Probe, ProbeResult

from .common import clean, has_heads, probe_batch, scored_positions
from .stats import HOLDS, estimate, resample_weights, sweep, verdict

CONFIDENCE = 0.95
#: the smallest effect (nats of attention logit per sd of similarity) that counts: a head whose interval lies
#: inside (-MIN_EFFECT, MIN_EFFECT) is ``none``. A purely positional head still shows a real but tiny
#: dependence on the values (LayerNorm's scale moves with them), far below this.
MIN_EFFECT = 0.1
#: criteria at which the "negative similarity" verdict is also shown
EFFECT_SWEEP = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)


def query_positions(task, batch) -> list[int]:
    """Scored positions with at least two keys to compare."""
    return [int(q) for q in scored_positions(task, batch) if q >= 1]


def pair_design(x: torch.Tensor, queries: list[int]):
    """``(pairs, design [B, M, K], names, row_of [M])`` for every (query, key <= query) pair. Columns:
    similarity, x_k (each dimension), |x_k|². Centred two ways (:func:`two_way_center`), which is exactly
    what one indicator per query row of each sequence and one per (query, key) position pair would remove."""
    x = x.double()
    pairs = [(q, k) for q in queries for k in range(q + 1)]
    qi = torch.tensor([p[0] for p in pairs])
    ki = torch.tensor([p[1] for p in pairs])
    xq, xk = x[:, qi], x[:, ki]  # [B, M, d]
    design = torch.cat([(xq * xk).sum(-1, keepdim=True), xk, xk.pow(2).sum(-1, keepdim=True)], -1)
    names = ["similarity"] + [f"x_k[{i}]" for i in range(x.shape[-1])] + ["|x_k|^2"]
    row_of = torch.tensor([queries.index(q) for q, _ in pairs])
    return pairs, two_way_center(design, row_of, len(queries)), names, row_of


def two_way_center(values: torch.Tensor, row_of: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Remove each query row's mean (softmax ignores what is common to a row) and then each (query, key)
    pair's mean over sequences (the position effects). Within one query the layout is balanced (every
    sequence has every key), so this double centring equals least squares with both sets of indicators
    (Frisch–Waugh–Lovell). The bootstrap keeps the pair means of the full sample: with hundreds of sequences
    per pair that understates the spread by O(pairs / sequences)."""
    centred = center_rows(values, row_of, n_rows)
    return centred - centred.mean(0, keepdim=True)


def center_rows(values: torch.Tensor, row_of: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Subtract each query row's mean over its keys; ``values [..., M, ...]`` with pairs on dim 1."""
    shape = values.shape
    flat = values.reshape(shape[0], shape[1], -1)
    sums = torch.zeros(shape[0], n_rows, flat.shape[-1], dtype=flat.dtype).index_add_(1, row_of, flat)
    counts = torch.bincount(row_of, minlength=n_rows).to(flat.dtype)[None, :, None]
    return (flat - (sums / counts)[:, row_of]).reshape(shape)


def scores(model, inputs: torch.Tensor) -> torch.Tensor:
    """``[B, L, H, T, T]`` pre-softmax attention scores (``hook_attn_scores``), float64 on the CPU."""
    names = [f"blocks.{l}.attn.hook_attn_scores" for l in range(model.n_layers)]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    return torch.stack([cache[n] for n in names], 1).double().cpu()


def fit_heads(design, responses, weights):
    """Least squares of every head's centred scores on the design: ``(point [H, K], samples [R, H, K])``,
    through per-sequence sufficient statistics. ``responses [B, M, H]``."""
    xtx = torch.einsum("bmi,bmj->bij", design, design)
    xty = torch.einsum("bmi,bmh->bih", design, responses)
    k = design.shape[-1]
    ridge = 1e-9 * torch.diagonal(xtx.sum(0)).mean().clamp_min(1e-12) * torch.eye(k, dtype=design.dtype)

    def solve(a, b):
        return torch.linalg.solve(a + ridge, b).transpose(-1, -2)

    return solve(xtx.sum(0), xty.sum(0)), solve(torch.einsum("rb,bij->rij", weights, xtx),
                                                torch.einsum("rb,bih->rih", weights, xty))


def head_label(effect_ci, margin: float = MIN_EFFECT) -> str:
    """``negative`` / ``positive`` when the effect's interval is beyond ``-margin`` / ``margin``, ``none``
    when it lies inside (-margin, margin), ``inconclusive`` otherwise."""
    if verdict(effect_ci, -margin, above=False) == HOLDS:
        return "negative"
    if verdict(effect_ci, margin) == HOLDS:
        return "positive"
    if verdict(effect_ci, -margin) == HOLDS and verdict(effect_ci, margin, above=False) == HOLDS:
        return "none"
    return "inconclusive"


def normal_interval(point: float, samples: torch.Tensor, confidence: float) -> list:
    """Point ± z·(bootstrap sd): at the far tails a Bonferroni correction asks for, a few hundred replicates
    cannot place percentiles, but their spread estimates the standard error well."""
    z = math.sqrt(2) * torch.erfinv(torch.tensor(confidence, dtype=torch.float64)).item()
    sd = float(samples.std())
    return [point - z * sd, point + z * sd]


@torch.no_grad()
def similarity_heads(model, task, batch, generator, weights=None, layers=None) -> dict:
    """Per head ``"L{l}H{h}"``: the similarity coefficient and effect with intervals, and its label
    (``negative``, ``positive`` or ``none``). Also returns what :func:`causal_slopes` needs."""
    queries = query_positions(task, batch)
    layers = list(range(model.n_layers)) if layers is None else layers
    if not queries or not has_heads(model):
        return {"heads": {}, "queries": queries}
    pairs, design, names, row_of = pair_design(batch.inputs.cpu(), queries)
    S = scores(model, batch.inputs)
    qi = torch.tensor([p[0] for p in pairs])
    ki = torch.tensor([p[1] for p in pairs])
    weights = resample_weights(len(batch), generator) if weights is None else weights
    n_tests = len(layers) * model.n_heads
    level = 1 - (1 - CONFIDENCE) / n_tests
    sim_sd = float(design[..., 0].std())  # within-row, within-pair spread of the similarity
    heads, coefs = {}, {}
    for l in layers:
        responses = two_way_center(S[:, l][:, :, qi, ki].transpose(1, 2), row_of, len(queries))  # [B, M, H]
        point, samples = fit_heads(design, responses, weights)
        for h in range(model.n_heads):
            beta, boot = float(point[h, 0]), samples[:, h, 0]
            ci = normal_interval(beta, boot, level)
            effect_ci = [c * sim_sd for c in ci]
            label = head_label(effect_ci)
            heads[f"L{l}H{h}"] = {
                "coefficient": {"mean": clean(beta), "ci": [clean(c) for c in ci]},
                "effect": {"mean": clean(beta * sim_sd), "ci": [clean(c) for c in effect_ci]},
                "label": label,
                # the verdict "negative similarity" at stricter criteria on the effect (nats per sd)
                "negative_sweep": sweep(effect_ci, [-c for c in EFFECT_SWEEP], above=False),
            }
            coefs[(l, h)] = point[h]  # similarity, x_k, |x_k|^2
    return {"heads": heads, "queries": queries, "confidence": level, "names": names, "_coefs": coefs}


@torch.no_grad()
def causal_slopes(model, task, batch, fitted: dict, which, generator, weights=None) -> dict:
    """For each head ``(l, h)`` in ``which``: slope of the observed change of its relative scores on the
    change its fitted similarity dependence predicts, when one key's input is swapped for another
    sequence's (see the module docstring)."""
    queries = fitted["queries"]
    if not which or not queries:
        return {}
    x = batch.inputs
    B, T, d = x.shape
    hi = max(queries)
    k_star = torch.randint(1, max(hi, 2), (B,), generator=generator)  # a key with earlier keys and later queries
    donor = x.roll(1, 0)
    rows = torch.arange(B)
    swapped = x.clone()
    swapped[rows, k_star.to(x.device)] = donor[rows, k_star.to(x.device)]
    before, after = scores(model, x), scores(model, swapped)
    x0, x1 = x.double().cpu(), swapped.double().cpu()
    weights = resample_weights(B, generator) if weights is None else weights
    out = {}
    for l, h in which:
        coef = fitted["_coefs"][(l, h)]
        obs_sum = torch.zeros(B, dtype=torch.float64)
        pred_sq, cross = torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
        for q in queries:
            later = q > k_star  # sequences whose swapped key lies before this query
            if not later.any():
                continue
            d_scores = (after[:, l, h, q, : q + 1] - before[:, l, h, q, : q + 1])  # [B, q+1]
            earlier = (torch.arange(q + 1)[None] < k_star[:, None]).double()
            reference = (d_scores * earlier).sum(1) / earlier.sum(1).clamp_min(1)
            observed = d_scores[rows, k_star.clamp_max(q)] - reference
            xq = x0[:, q]

            def features(xs):
                xk = xs[rows, k_star]
                return torch.cat([(xq * xk).sum(-1, keepdim=True), xk, xk.pow(2).sum(-1, keepdim=True)], -1)

            predicted = (features(x1) - features(x0)) @ coef
            use = later.double()
            cross += use * observed * predicted
            pred_sq += use * predicted.pow(2)
            obs_sum += use * observed.pow(2)
        point = float(cross.sum() / pred_sq.sum().clamp_min(1e-12))
        samples = (weights @ cross) / (weights @ pred_sq).clamp_min(1e-12)
        corr_point = float(cross.sum() / (pred_sq.sum() * obs_sum.sum()).sqrt().clamp_min(1e-12))
        slope = estimate(point, samples)
        out[f"L{l}H{h}"] = {"slope": slope, "correlation": clean(corr_point),
                            "verdict": verdict(slope["ci"], 0.0)}
    return out


class SimilarityHeads(Probe):
    name = "similarity"
    description = ("per head: dependence of pre-softmax attention on query-key value similarity, position "
                   "controlled, with intervals; causal check by swapping a key's value")
    n_sequences = 4096
    requires_hooks = ("blocks.{layer}.attn.hook_attn_scores", "blocks.{layer}.attn.hook_z")
    requires_attributes = ("n_heads",)

    def run(self, model, task, generator, device):
        batch = probe_batch(task, self.n_sequences, generator, device)
        fitted = similarity_heads(model, task, batch, generator)
        flagged = [(int(n[1:n.index("H")]), int(n[n.index("H") + 1:])) for n, e in fitted["heads"].items()
                   if e["label"] in ("negative", "positive")]
        causal = causal_slopes(model, task, batch, fitted, flagged, generator)
        rows = []
        for name, e in fitted["heads"].items():
            c = causal.get(name, {})
            rows.append({"head": name, "coefficient": e["coefficient"]["mean"], "lo": e["coefficient"]["ci"][0],
                         "hi": e["coefficient"]["ci"][1], "effect": e["effect"]["mean"], "label": e["label"],
                         "causal_slope": c.get("slope", {}).get("mean"), "causal_verdict": c.get("verdict")})
            e["causal"] = c or None
        summary = {k: v for k, v in fitted.items() if not k.startswith("_")}
        summary["note"] = ("coefficient of x_q·x_k in each head's pre-softmax scores, (query, key) positions held "
                           "fixed, centred per query; interval Bonferroni-corrected over heads; causal: slope of "
                           "observed on predicted score change when one key's value is swapped")
        return ProbeResult(pd.DataFrame(rows), summary)
