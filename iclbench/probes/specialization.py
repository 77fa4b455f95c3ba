"""Specialization: one role per layer, from the other probes' measurements, by the thresholds below.

Roles, first match wins:

* ``copy`` — the layer writes the last input toward the output: its direct contribution to the prediction
  (all its heads and its MLP, through the read-out) correlates with ``copy_last`` at >= ``copy_correlation``
  and is not negligible (rms >= ``min_size`` of the target's standard deviation). Needs a ``copy_last``
  baseline. What the layer *writes* decides, not what the residual after it holds (a layer that does nothing
  after a copying layer leaves a copy behind); the logit lens's distance to ``copy_last`` is reported
  beside it.
* ``refine`` — the prediction readable from the residual (tuned lens) improves across the layer by at least
  ``refine_relative`` of its error before the layer and at least ``refine_absolute``.
* ``compute`` — no readable gain, but mean-ablating the layer's attention or MLP raises the error by at
  least ``ablation_matters``: it builds something later layers use.
* ``none`` — none of the above.

The seed paper's (Bhargav & Gu 2024) two claims, checked per run:

1. ``claim_1_layer0_copies``: layer 0's role is ``copy``.
2. ``claim_2_last_layer_refines_with_anti_copy_heads``: the last layer (layer 2 of the paper's 3) is
   ``refine`` and holds an anti-copy head (see :mod:`.attribution`) whose mean-ablation raises the error by
   at least ``ablation_matters``. ``..._any_later_layer`` relaxes "last" to "any layer after 0".

A claim that cannot be tested on a task is ``None`` (no ``copy_last`` baseline; outputs not of the inputs'
kind, as in linear regression, so "the values it attends to" are not predictions). Each flagged head's
attention (previous / current token, similar-value lift) is reported beside it.

``iclbench specialization`` combines these summaries over runs (:meth:`Specialization.cross_run_table`).
"""

from __future__ import annotations

from collections import Counter

import pandas as pd
import torch

from iclbench import Probe, ProbeResult

from .ablation import ablation_errors
from .attention import attention_stats
from .attribution import FLAG_MIN_SIZE, attribution_table, contributions
from .common import baselines, clean, corr, has_heads, has_mlp, probe_batch, scored_positions
from .lens import lens_distances

THRESHOLDS = {
    "copy_correlation": 0.8,
    "min_size": FLAG_MIN_SIZE,
    "refine_relative": 0.2,
    "refine_absolute": 0.005,
    "ablation_matters": 0.01,
}


def layer_roles(model, task, generator, device, n: int = 256) -> dict:
    """The per-layer numbers behind each role, the roles, and the two claims."""
    th = THRESHOLDS
    fit, test = probe_batch(task, n, generator, device), probe_batch(task, n, generator, device)
    scored = scored_positions(task, test)
    lens = lens_distances(task, model, fit, test)
    # correlations are cheap (one forward pass) and decide roles: measure them on 4x more sequences
    wide = probe_batch(task, 4 * n, generator, device)
    computed = contributions(model, wide)
    parts = computed[0]
    _, attribution = attribution_table(model, task, wide, computed)
    copy_last = baselines(task, wide).get("copy_last")
    if copy_last is not None and copy_last.shape != wide.targets.shape:
        copy_last = None
    anti = attribution["anti_copy_heads"]
    which = [(k, l, -1) for l in range(model.n_layers) for k in (("attn", "mlp") if has_mlp(model, l)
                                                                 else ("attn",))]
    which += [("head", int(h[1:h.index("H")]), int(h[h.index("H") + 1:])) for h in anti]
    clean_err, ablated = ablation_errors(model, task, test, which, methods=("mean",))
    delta = {key[:3]: float((err - clean_err)[scored].mean()) for key, err in ablated.items()}
    looks = {}  # where each flagged head attends: the paper's copy heads look at x_t, its refiners by similarity
    if has_heads(model):
        stats = attention_stats(model, test)
        for h in attribution["copy_heads"] + anti:
            l, i = int(h[1:h.index("H")]), int(h[h.index("H") + 1:])
            looks[h] = {"prev": clean(stats["prev"][l, i, scored].mean()),
                        "current": clean(stats["current"][l, i, scored].mean()),
                        "similar_lift": clean(stats["similar"][l, i, scored].mean()
                                              / stats["uniform_single"][l, i, scored].mean())}

    layers = []
    for l in range(model.n_layers):
        own = sum(c for (kind, layer, _), c in parts.items() if layer == l)
        size = float(own[:, scored].pow(2).mean().sqrt())
        big_enough = size >= th["min_size"] * attribution["target_sd"]
        copy_corr = corr(own[:, scored], copy_last[:, scored]) if copy_last is not None else None
        logit = lens["logit"][l]
        copy_dist = float(logit["copy_last"][scored].mean()) if "copy_last" in logit else None
        before = float(lens["tuned"][l - 1]["target"][scored].mean())
        after = float(lens["tuned"][l]["target"][scored].mean())
        gain = before - after
        abl = max(delta[(k, l, -1)] for k in ("attn", "mlp") if (k, l, -1) in delta)
        heads = [h for h in anti if h.startswith(f"L{l}H")]
        if big_enough and copy_corr is not None and copy_corr >= th["copy_correlation"]:
            role = "copy"
        elif gain >= th["refine_absolute"] and gain >= th["refine_relative"] * before:
            role = "refine"
        elif abl >= th["ablation_matters"]:
            role = "compute"
        else:
            role = "none"
        layers.append({
            "layer": l, "role": role,
            "direct_rms": clean(size), "direct_copy_corr": clean(copy_corr),
            "logit_lens_copy_distance": clean(copy_dist),
            "tuned_error_before": clean(before), "tuned_error_after": clean(after),
            "ablation_delta": clean(abl),
            "copy_heads": [h for h in attribution["copy_heads"] if h.startswith(f"L{l}H")],
            "anti_copy_heads": heads,
            "anti_copy_head_ablation_delta": {h: clean(delta[("head", l, int(h.split("H")[1]))]) for h in heads},
            "flagged_head_attention": {h: v for h, v in looks.items() if h.startswith(f"L{l}H")},
        })

    def refines_with_anti_copy(entry):
        return entry["role"] == "refine" and any(v is not None and v >= th["ablation_matters"]
                                                 for v in entry["anti_copy_head_ablation_delta"].values())

    claim2_layers = [e["layer"] for e in layers[1:] if refines_with_anti_copy(e)]
    # a claim that cannot be tested here is None, not False: no copy_last baseline, or outputs that are not
    # the inputs' kind (anti-copy compares a head's write with the inputs it attends to)
    testable_1 = copy_last is not None
    testable_2 = has_heads(model) and model.n_layers > 1 and wide.inputs.shape[-1] == wide.targets.shape[-1]
    return {
        "roles": [e["role"] for e in layers],
        "claim_1_layer0_copies": layers[0]["role"] == "copy" if testable_1 else None,
        "claim_2_last_layer_refines_with_anti_copy_heads": refines_with_anti_copy(layers[-1]) if testable_2 else None,
        "claim_2_any_later_layer": bool(claim2_layers) if testable_2 else None,
        "claim_2_layers": claim2_layers,
        "model_error": clean(clean_err[scored].mean()),
        "layers": layers,
        "thresholds": dict(th),
    }


class Specialization(Probe):
    name = "specialization"
    description = "role per layer (copy, refine, compute, none) by documented thresholds; the seed paper's claims"
    n_sequences = 256

    requires_hooks = ("blocks.0.hook_resid_pre", "blocks.{layer}.hook_resid_post", "blocks.{layer}.hook_attn_out")
    requires_attributes = ("readout",)

    def applies_to(self, task, model):
        return "blocks.0.hook_attn_out" in model.hook_points() and model.n_layers >= 1

    def run(self, model, task, generator, device):
        summary = layer_roles(model, task, generator, device, self.n_sequences)
        table = pd.DataFrame([{k: v for k, v in e.items() if not isinstance(v, (list, dict))}
                              | {"anti_copy_heads": " ".join(e["anti_copy_heads"]),
                                 "copy_heads": " ".join(e["copy_heads"])} for e in summary["layers"]])
        return ProbeResult(table, summary)

    @classmethod
    def cross_run_table(cls, runs: pd.DataFrame) -> pd.DataFrame:
        """One row per (task, model): roles per layer as 'role k/n' (most common over seeds), how many seeds
        support each claim ("paper's pattern": holds = both claims in most seeds, partly = one), and the key
        numbers as mean ± sd over seeds."""
        rows = []
        depth = max(len(s["roles"]) for s in runs["summary"])  # one column per layer of the deepest model
        for (task, model), group in runs.groupby(["task", "model"], sort=True):
            summaries = list(group["summary"])
            n = len(summaries)
            row = {"task": task, "model": model, "seeds": n}
            for l in range(depth):
                roles = Counter(s["roles"][l] for s in summaries if l < len(s["roles"]))
                row[f"layer {l}"] = "{} {}/{}".format(*roles.most_common(1)[0], n) if roles else "—"
            claim1 = _count(summaries, "claim_1_layer0_copies")
            claim2 = _count(summaries, "claim_2_last_layer_refines_with_anti_copy_heads")
            if claim1 is None and claim2 is None:
                row["paper's pattern"] = "n/a"
            else:
                row["paper's pattern"] = {2: "holds", 1: "partly", 0: "no"}[
                    (claim1 is not None and claim1 > n / 2) + (claim2 is not None and claim2 > n / 2)]
            row["claim 1: layer 0 copies"] = _fraction(claim1, n)
            row["claim 2: last layer refines via anti-copy heads"] = _fraction(claim2, n)
            row["claim 2 (any later layer)"] = _fraction(_count(summaries, "claim_2_any_later_layer"), n)
            row["L0 write~copy corr"] = _mean_sd([s["layers"][0]["direct_copy_corr"] for s in summaries])
            row["last layer write~copy corr"] = _mean_sd([s["layers"][-1]["direct_copy_corr"] for s in summaries])
            row["anti-copy heads/run"] = _mean_sd([sum(len(e["anti_copy_heads"]) for e in s["layers"])
                                                    for s in summaries], digits=1)
            row["model error"] = _mean_sd([s["model_error"] for s in summaries], digits=4)
            rows.append(row)
        return pd.DataFrame(rows)


def _count(summaries, key):
    """Seeds where the claim holds; None when no seed could test it."""
    values = [s[key] for s in summaries if s.get(key) is not None]
    return sum(values) if values else None


def _fraction(count, n):
    return "n/a" if count is None else f"{count}/{n}"


def _mean_sd(values, digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    t = torch.tensor(values, dtype=torch.float64)
    sd = f" ± {float(t.std()):.{digits}f}" if len(values) > 1 else ""
    return f"{float(t.mean()):.{digits}f}{sd}"
