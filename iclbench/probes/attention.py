"""Attention statistics per head: where each query position looks.

Mass on the previous token, on the current token, and on the earlier position whose input is most similar
to the current input (the seed paper's "similarity" heads), beside what a uniform causal pattern would put
there; the mean pattern per head is kept in the table for plots (``stat == "pattern"``, ``key`` column).

"similar" is descriptive, not a test of similarity-based attention: in a smooth sequence the most similar
earlier value is usually the previous one (on affine, about two thirds of scored positions, where a uniform
pattern would put 1/t there), so a previous-token head scores high on it. :mod:`.similarity` tests the
dependence on value similarity with position held fixed.
"""

from __future__ import annotations

import pandas as pd
import torch

from iclbench import Probe, ProbeFigure, ProbeResult

from .common import clean, has_heads, probe_batch, scored_positions
from .figures import attention_figure, run_title


@torch.no_grad()
def attention_stats(model, batch) -> dict[str, torch.Tensor]:
    """``{stat: [L, H, T]}`` mean over the batch per query position, plus ``pattern [L, H, T, T]``."""
    L, T = model.n_layers, batch.inputs.shape[1]
    _, cache = model.run_with_cache(batch.inputs, names_filter="blocks.*.attn.hook_pattern")
    pattern = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(L)], 1).float()  # [B,L,H,T,T]
    t = torch.arange(T, device=pattern.device)
    prev = torch.zeros_like(pattern[..., 0])
    prev[..., 1:] = pattern[..., t[1:], t[1:] - 1]
    current = pattern[..., t, t]
    # the earlier position (s < t) whose input is closest to the input at t; none at t = 0
    x = batch.inputs.float()
    dist = torch.cdist(x, x)  # [B, T, T]
    dist = dist.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1), float("inf"))
    nearest = dist.argmin(-1)  # [B, T]
    index = nearest[:, None, None, :, None].expand(*pattern.shape[:-1], 1)
    similar = pattern.gather(-1, index)[..., 0]
    similar[..., 0] = 0
    uniform = torch.cat([torch.zeros(1, device=x.device), 1 / (t[1:] + 1).float()])
    return {"prev": prev.mean(0), "current": current.mean(0), "similar": similar.mean(0),
            "uniform_single": uniform.expand_as(prev[0]), "pattern": pattern.mean(0)}


class AttentionStats(Probe):
    name = "attention"
    description = "per head: attention mass on previous, current and most-similar-value tokens; mean pattern"
    n_sequences = 512

    requires_hooks = ("blocks.{layer}.attn.hook_pattern", "blocks.{layer}.attn.hook_z")
    requires_attributes = ("n_heads",)

    def applies_to(self, task, model):
        return has_heads(model) and "blocks.0.attn.hook_pattern" in model.hook_points()

    @classmethod
    def figures(cls, table, summary, run):
        return [ProbeFigure(cls.name, attention_figure(table, f"Mean attention patterns: {run_title(run)}"),
                            "Mean attention pattern of every head (rows: query position, columns: key position).")]

    def run(self, model, task, generator, device):
        batch = probe_batch(task, self.n_sequences, generator, device)
        stats = attention_stats(model, batch)
        scored = scored_positions(task, batch)
        rows, summary = [], {}
        T = batch.inputs.shape[1]
        for l in range(model.n_layers):
            for h in range(model.n_heads):
                for stat in ("prev", "current", "similar", "uniform_single"):
                    rows += [{"layer": l, "head": h, "stat": stat, "position": t, "key": -1,
                              "value": float(stats[stat][l, h, t])} for t in range(T)]
                pat = stats["pattern"][l, h]
                rows += [{"layer": l, "head": h, "stat": "pattern", "position": q, "key": k,
                          "value": float(pat[q, k])} for q in range(T) for k in range(q + 1)]
                s = {stat: clean(stats[stat][l, h, scored].mean()) for stat in ("prev", "current", "similar")}
                s["similar_lift"] = clean(stats["similar"][l, h, scored].mean()
                                          / stats["uniform_single"][l, h, scored].mean())
                summary[f"L{l}H{h}"] = s
        summary["note"] = ("mean attention over scored query positions; similar_lift = mass on the most similar "
                           "earlier value / what a uniform causal pattern gives it")
        return ProbeResult(pd.DataFrame(rows), summary)
