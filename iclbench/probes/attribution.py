"""Direct attribution: what each head, attention bias, MLP and the embedding writes straight into the
prediction through the model's read-out (final norm's scale frozen, so the parts add up exactly).

Each head's contribution is compared with ``copy_last`` and with the values it attends to (its attention
pattern applied to the inputs). A head whose contribution is strongly *negatively* correlated with what it
attends to is flagged ``anti_copy`` — the seed paper's "negative similarity heads" that refine the copied
estimate; strongly positive is ``copy``.
"""

from __future__ import annotations

import pandas as pd
import torch

from iclbench import Probe, ProbeResult

from .common import (baselines, clean, corr, has_heads, has_mlp, head_writes, probe_batch, scored_positions)

#: a head is flagged when its contribution correlates with its attended values at least this strongly
FLAG_CORRELATION = 0.5
#: ... and its contribution is not negligible: rms at least this fraction of the target's standard deviation
FLAG_MIN_SIZE = 0.05


@torch.no_grad()
def contributions(model, batch) -> tuple[dict[tuple, torch.Tensor], dict[tuple, torch.Tensor], torch.Tensor]:
    """``(contribution, attended)`` keyed by ``(kind, layer, head)``; contributions are ``[B, T, d_out]``,
    attended values (pattern @ inputs, only where inputs and outputs have one size) likewise. Also returns
    the model's prediction. Kinds: embed, head, attn_bias, mlp."""
    L = model.n_layers
    heads = has_heads(model)
    names = ["hook_embed", "hook_pos_embed", f"blocks.{L - 1}.hook_resid_post"]
    for l in range(L):
        names.append(f"blocks.{l}.hook_attn_out")
        if heads:
            names += [f"blocks.{l}.attn.hook_z", f"blocks.{l}.attn.hook_pattern"]
        if has_mlp(model, l):
            names.append(f"blocks.{l}.hook_mlp_out")
    pred, cache = model.run_with_cache(batch.inputs, names_filter=names)
    resid = cache[f"blocks.{L - 1}.hook_resid_post"]

    def through_readout(component):
        return model.direct_readout(component, resid).float()

    out = {("embed", -1, -1): through_readout(cache["hook_embed"] + cache["hook_pos_embed"])}
    attended = {}
    same_size = batch.inputs.shape[-1] == pred.shape[-1]
    for l in range(L):
        attn_out = cache[f"blocks.{l}.hook_attn_out"]
        if heads:
            writes = head_writes(model, cache[f"blocks.{l}.attn.hook_z"], l)  # [B, T, H, d_model]
            pattern = cache[f"blocks.{l}.attn.hook_pattern"]  # [B, H, Tq, Tk]
            for h in range(model.n_heads):
                out[("head", l, h)] = through_readout(writes[:, :, h])
                if same_size:
                    attended[("head", l, h)] = pattern[:, h] @ batch.inputs.float()
            out[("attn_bias", l, -1)] = through_readout(attn_out - writes.sum(2))
        else:
            out[("attn", l, -1)] = through_readout(attn_out)
        if has_mlp(model, l):
            out[("mlp", l, -1)] = through_readout(cache[f"blocks.{l}.hook_mlp_out"])
    return out, attended, pred.float()


def head_flag(corr_attended, size, target_sd, current=None, previous=None) -> str:
    """``anti_copy`` / ``copy`` by the sign of the correlation of the head's write with what it attends to;
    a positive head is ``copy`` only when it attends mostly to the current token (the last input, what
    copy-last predicts) and ``previous_token`` when mostly to the one before: a previous-token head writes
    what it reads too, but that is not copying the last value."""
    if corr_attended is None or size < FLAG_MIN_SIZE * target_sd:
        return ""
    if corr_attended <= -FLAG_CORRELATION:
        return "anti_copy"
    if corr_attended >= FLAG_CORRELATION:
        if previous is not None and previous >= 0.5:
            return "previous_token"
        if current is None or current >= 0.5:
            return "copy"
    return ""


@torch.no_grad()
def attention_mass(model, batch, scored) -> dict[tuple[int, int], tuple[float, float]]:
    """``{(layer, head): (mass on the current token, mass on the previous one)}`` over scored positions."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)]
    _, cache = model.run_with_cache(batch.inputs, names_filter=names)
    q = scored[scored >= 1].to(batch.inputs.device)
    out = {}
    for l, name in enumerate(names):
        pattern = cache[name].float()  # [B, H, T, T]
        current = pattern[:, :, q, q].mean((0, 2))
        previous = pattern[:, :, q, q - 1].mean((0, 2))
        for h in range(model.n_heads):
            out[(l, h)] = (float(current[h]), float(previous[h]))
    return out


def attribution_table(model, task, batch, parts=None) -> tuple[pd.DataFrame, dict]:
    """One row per component: size, mean, correlations, flag; summary lists the flagged heads.
    ``parts``: the output of :func:`contributions` on ``batch`` when already computed."""
    parts, attended, pred = parts or contributions(model, batch)
    scored = scored_positions(task, batch)
    copy_last = baselines(task, batch).get("copy_last")
    target = batch.targets.float()[:, scored]
    target_sd = float(target.std())
    total = sum(parts.values())
    looks = attention_mass(model, batch, scored) if has_heads(model) else {}
    rows = []
    for (kind, layer, head), c in parts.items():
        c = c[:, scored]
        att = attended.get((kind, layer, head))
        corr_att = corr(c, att[:, scored]) if att is not None else None
        size = float(c.pow(2).mean().sqrt())
        rows.append({
            "component": kind if head < 0 else f"L{layer}H{head}", "kind": kind, "layer": layer, "head": head,
            "rms": size, "mean": float(c.mean()),
            "corr_target": corr(c, target),
            "corr_copy_last": corr(c, copy_last[:, scored]) if copy_last is not None and copy_last.shape ==
            batch.targets.shape else None,
            "corr_attended": corr_att,
            "attn_current": looks.get((layer, head), (None, None))[0],
            "attn_previous": looks.get((layer, head), (None, None))[1],
            "flag": head_flag(corr_att, size, target_sd, *looks.get((layer, head), (None, None)))
            if kind == "head" else "",
        })
    table = pd.DataFrame(rows)
    heads = table[table.kind == "head"]
    summary = {
        "target_sd": clean(target_sd),
        # the parts add up to the prediction up to a constant (biases of the norm and read-out)
        "sum_check_max_abs": clean(float(((pred - total) - (pred - total).mean((0, 1))).abs().max())),
        "anti_copy_heads": heads[heads.flag == "anti_copy"].component.tolist(),
        "copy_heads": heads[heads.flag == "copy"].component.tolist(),
        "previous_token_heads": heads[heads.flag == "previous_token"].component.tolist(),
        "components": {r["component"]: {k: clean(r[k]) for k in ("rms", "corr_copy_last", "corr_attended")}
                       | {"flag": r["flag"]} for r in rows},
        "thresholds": {"flag_correlation": FLAG_CORRELATION, "flag_min_size_of_target_sd": FLAG_MIN_SIZE},
    }
    return table, summary


class DirectAttribution(Probe):
    name = "attribution"
    description = "each head's/MLP's direct contribution to the prediction; flags copy and anti-copy heads"
    n_sequences = 512

    requires_hooks = ("hook_embed", "hook_pos_embed", "blocks.{layer}.hook_attn_out", "blocks.{layer}.hook_resid_post")
    requires_attributes = ("direct_readout",)

    def applies_to(self, task, model):
        return "blocks.0.hook_attn_out" in model.hook_points()

    def run(self, model, task, generator, device):
        table, summary = attribution_table(model, task, probe_batch(task, self.n_sequences, generator, device))
        return ProbeResult(table, summary)
