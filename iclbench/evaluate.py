"""Evaluation: normalized error per context position with paired bootstrap confidence intervals, and the one
scoring function of a model and its baselines (the main evaluation, each OOD shift, ``iclbench rescore``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .contracts import PluginError, is_oracle, predictions_problem, screen_baselines
from .options import EvalOptions
from .task import Batch
from .step import normalized_error


@torch.no_grad()
def predict(model: torch.nn.Module, batch: Batch, chunk: int = 2048) -> torch.Tensor:
    model.eval()
    return torch.cat([model(batch.inputs[i:i + chunk]).float() for i in range(0, len(batch), chunk)])


def bootstrap_weights(n: int, replicates: int, seed: int) -> torch.Tensor:
    """``[R, n]`` resampling counts; shared by every predictor so their intervals are paired."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (replicates, n), generator=gen)
    return torch.zeros(replicates, n).scatter_add_(1, idx, torch.ones(replicates, n))


def error_curves(predictions: dict[str, torch.Tensor], batch: Batch, normalizer: torch.Tensor,
                 score_from: int, replicates: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> dict:
    """Per-position mean normalized squared error, its CI, and the mean over scored positions >= score_from.

    Returns ``{"positions": [...], "score_from": k, "predictors": {name: {...}}}``.
    """
    positions = torch.nonzero(batch.mask.cpu()).flatten()
    summary_cols = positions >= score_from
    if not bool(summary_cols.any()):
        summary_cols = torch.ones_like(summary_cols)
    weights = bootstrap_weights(len(batch), replicates, seed).double()
    alpha = (1 - confidence) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    out = {}
    errs = {name: normalized_error(pred, batch, normalizer).cpu().double()[:, positions]
            for name, pred in predictions.items()}
    for name, pred in predictions.items():
        err = errs[name]  # [N, P]
        curve = err.mean(0)
        boot = weights @ err / len(batch)  # [R, P]
        lo, hi = torch.quantile(boot, q, dim=0)
        summary_boot = boot[:, summary_cols].mean(1)
        s_lo, s_hi = torch.quantile(summary_boot, q)
        out[name] = {
            "mean": float(curve[summary_cols].mean()),
            "ci": [float(s_lo), float(s_hi)],
            "curve": [float(v) for v in curve],
            "curve_lo": [float(v) for v in lo],
            "curve_hi": [float(v) for v in hi],
            "mse": float((pred.float() - batch.targets.float()).pow(2).mean(-1).cpu()[:, positions]
                         [:, summary_cols].mean()),
        }
    if BAYES in errs:  # paired: the same resampled sequences for both terms of every difference
        zero = normalized_error(torch.zeros_like(batch.targets), batch, normalizer).cpu().double()[:, positions]
        zero_excess = (weights @ (zero - errs[BAYES]))[:, summary_cols].mean(1) / len(batch)
        for name, err in errs.items():
            excess = err - errs[BAYES]
            boot = (weights @ excess)[:, summary_cols].mean(1) / len(batch)
            lo, hi = torch.quantile(boot, q)
            ratio = torch.quantile(boot / zero_excess.clamp_min(1e-12), q)
            mean_ratio = float(excess[:, summary_cols].mean() / (zero - errs[BAYES])[:, summary_cols].mean()
                               .clamp_min(1e-12))
            out[name]["excess_bayes"] = {"mean": float(excess[:, summary_cols].mean()), "ci": [float(lo), float(hi)],
                                         "relative": mean_ratio, "relative_ci": [float(v) for v in ratio],
                                         "learned": learned_label(ratio[0], ratio[1])}
    return {"positions": [int(p) for p in positions], "score_from": int(score_from),
            "confidence": confidence, "bootstrap": replicates, "predictors": out}


#: the baseline every task names for its posterior mean (see :class:`iclbench.task.Baseline`)
BAYES = "bayes"
#: relative excess over Bayes, (error - Bayes) / (zero predictor - Bayes), below which a task counts as learned,
#: and above which it counts as not learned
LEARNED_BELOW, NOT_LEARNED_ABOVE = 0.1, 0.5


def learned_label(lo: float, hi: float) -> str:
    """Whether a run learned its task, from the CI ``[lo, hi]`` of its relative excess over Bayes
    ``(error - Bayes) / (zero - Bayes)`` (0: Bayes-optimal; 1: no better than predicting 0):
    ``learned`` if the whole CI is below 0.1 (the run closes >= 90 % of the gap from the zero predictor to
    Bayes), ``not learned`` if it is above 0.5 (it closes under half), ``partly`` if it lies between; a CI
    across 0.1 or 0.5 is ``inconclusive``."""
    lo, hi = float(lo), float(hi)
    if hi < LEARNED_BELOW:
        return "learned"
    if lo > NOT_LEARNED_ABOVE:
        return "not learned"
    if lo >= LEARNED_BELOW and hi <= NOT_LEARNED_ABOVE:
        return "partly"
    return "inconclusive"


def is_evidence(excess: dict | None, cut: float = NOT_LEARNED_ABOVE) -> bool:
    """Whether a run's model counts as evidence about how a trained model solves its task, from its
    ``excess_bayes`` record: the CI of its relative excess lies wholly at or below the not-learned cut 0.5
    (learned, partly, or inconclusive only across 0.1), or its task has no Bayes baseline (no label: every run
    counts). A run whose CI reaches past 0.5 may not have learned the task at all, and an untrained-like model
    says nothing about how a trained one solves it; the interval decides, as for the label. ``cut``: another
    cut, to show how a verdict moves with it."""
    if not excess or excess.get("learned") is None:
        return True
    ci = excess.get("relative_ci")
    if ci is None:  # a record without the interval: the bound its label puts on the interval's top
        bound = {"learned": LEARNED_BELOW, "partly": NOT_LEARNED_ABOVE}.get(excess["learned"])
        return bound is not None and bound <= cut
    return float(ci[1]) <= cut


def evaluation_batch(task, o: EvalOptions, device: torch.device) -> Batch:
    """The fixed evaluation set: drawn on the CPU from ``eval.seed`` so it is the same on every device and
    for every training seed, then moved to ``device``."""
    gen = torch.Generator("cpu").manual_seed(o.seed)
    return task.sample(o.n_sequences, gen, "cpu").to(device)


@dataclass
class Scores:
    """What :func:`score` found: the error curves (None when nothing was scored), the baselines scored
    (name → function) and those refused (name → reason)."""
    curves: dict | None
    baselines: dict
    refused: dict

    @property
    def oracles(self) -> list[str]:
        return sorted(n for n, fn in self.baselines.items() if is_oracle(n, fn))


def batch_digest(batch: Batch) -> str:
    """A digest of ``batch``'s contents (inputs, targets, mask, latents), whatever its device."""
    h = hashlib.sha256()
    for t in (batch.inputs, batch.targets, batch.mask, *(batch.latents[k] for k in sorted(batch.latents))):
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def score(model: torch.nn.Module | None, baselines: dict, task, batch: Batch, *, score_from: int, replicates: int,
          confidence: float, seed: int, owners: dict | None = None, strict: bool = True,
          warn=None, memo: dict | None = None) -> Scores:
    """Screen ``baselines`` (:func:`~iclbench.contracts.screen_baselines`: one that peeks or reads latents
    unmarked is refused), let the model (None: none) and then each baseline predict ``batch``, and take the
    error curves normalized by ``task``'s prior-mean error. The model predicts first, so a model that refuses
    the batch (ICLBenchError) costs no baseline time. Predictions of the wrong shape or with NaN/inf at a
    scored position raise a :class:`~iclbench.contracts.PluginError` naming the predictor (``owners``: name
    → how to call it); with ``strict=False`` a baseline's are refused instead.

    ``memo`` keeps the baselines' screening and predictions across calls, keyed by task, options and the batch's
    contents: runs that share a task configuration and differ only in their model (the seeds of a stacked
    cell) screen and run each baseline once. Only for baselines that depend on nothing else (not a per-seed
    pool)."""
    owners = owners or {}
    known = {} if memo is None else memo.setdefault((task.name, repr(task.options), batch_digest(batch)), {})
    if "screen" not in known:
        known["screen"] = screen_baselines(baselines, batch, owners, **({} if warn is None else {"warn": warn}))
    accepted, refused = (dict(found) for found in known["screen"])
    predictions = {} if model is None else {"model": predict(model, batch)}
    cached = known.setdefault("predictions", {})
    for name, fn in accepted.items():
        if name not in cached:
            cached[name] = fn(batch).float()
        predictions[name] = cached[name]
    for name, pred in list(predictions.items()):  # NaN here would only surface later as a JSON error
        default = f"model '{getattr(model, 'name', '?')}'" if name == "model" else f"baseline '{task.name}:{name}'"
        problem = predictions_problem(pred, batch, "gave predictions")
        if problem and (strict or name == "model"):
            raise PluginError(f"{owners.get(name, default)}: {problem} (evaluation batch of task '{task.name}')",
                              plugin=owners.get(f"{name}.plugin"))
        if problem:
            refused[name] = f"{owners.get(name, default)}: {problem}"
            del predictions[name], accepted[name]
    curves = error_curves(predictions, batch, task.normalizer(batch.inputs.device), score_from, replicates,
                          confidence, seed) if predictions else None
    return Scores(curves, accepted, refused)
