"""What every built-in probe shares: its data, the residual-stream sites, per-head writes, ridge fits.

Probes see a model only through its hook points (TransformerLens names) and the read-out accessors of
:class:`iclbench.Model` (``readout``, ``direct_readout``, ``head_write_weights``), so they run unchanged on
any model that exposes them. Errors are the task's normalized squared error (1.0 = the prior mean), the
same scale as the leaderboard.
"""

from __future__ import annotations

import copy
import math

import torch

from iclbench.contracts import is_oracle
from iclbench.registry import get_registry
from iclbench.task import Batch, on_host


def probe_batch(task, n: int, generator: torch.Generator, device) -> Batch:
    """``n`` fresh sequences drawn with ``generator`` (on its own device), moved to ``device``."""
    return task.sample(n, generator, generator.device).to(device)


def scored_positions(task, batch: Batch) -> torch.Tensor:
    """Positions in the headline average: scored by the mask and at or after the task's ``score_from``."""
    mask = batch.mask.clone()
    mask[: task.score_from] = False
    return torch.nonzero(mask.cpu()).flatten() if bool(mask.any()) else torch.nonzero(batch.mask.cpu()).flatten()


def baselines(task, batch: Batch) -> dict[str, torch.Tensor]:
    """Predictions of the task's baselines plus those other plugins add for it. Oracles are left out (a name
    starting with ``oracle``, or ``fn.oracle``): they see the latents, so agreeing with them is just being
    right."""
    return {name: e.obj(batch).float() for name, e in _entries(task).items() if not is_oracle(name, e.obj)}


def _entries(task) -> dict:
    """The task's baseline entries from the registry the run was given (the global one otherwise)."""
    return (getattr(task, "registry", None) or get_registry()).task_baselines(task)


def reference_error(task, batch: Batch, found: dict | None = None) -> tuple[torch.Tensor, str]:
    """``([B, T] error, name)``: the normalized error of the best predictor the task offers, the floor every
    ratio of errors is taken above. The Bayes posterior mean where the task has one, else an oracle (it sees
    the rule, so its error is the irreducible noise), else zero (``"none"``)."""
    norm = task.normalizer(batch.inputs.device)
    found = baselines(task, batch) if found is None else found
    if "bayes" in found and found["bayes"].shape == batch.targets.shape:
        return sq_error(found["bayes"], batch.targets, norm), "bayes"
    for name, e in _entries(task).items():
        if is_oracle(name, e.obj):
            pred = e.obj(batch).float()
            if pred.shape == batch.targets.shape:
                return sq_error(pred, batch.targets, norm), name
    return torch.zeros(batch.targets.shape[:2], device=batch.targets.device), "none"


#: controls a lens or probe statement must beat: the model's own parameters, each tensor's entries shuffled
N_CONTROLS = 2
CONTROL_SEED = 1000


@torch.no_grad()
def controls(model, n: int = N_CONTROLS) -> list:
    """Untrained controls of ``model``: copies whose every parameter tensor has its entries permuted (the same
    architecture and weight statistics, no learned structure). Seeded apart from the probe's generator, so a
    probe's own draws do not move when controls are added. A fitted read-out (tuned lens, linear probe) finds
    structure in a random network's residual stream too; a statement about a trained model counts only where
    it beats these."""
    out = []
    for i in range(n):
        gen = torch.Generator().manual_seed(CONTROL_SEED + i)
        control = copy.deepcopy(model)
        for p in control.parameters():
            flat = p.detach().reshape(-1)
            p.copy_(flat[torch.randperm(flat.numel(), generator=gen).to(flat.device)].view_as(p))
        out.append(control.eval())
    return out


def sq_error(pred: torch.Tensor, ref: torch.Tensor, normalizer: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` squared distance over the prior-mean error: 1.0 = as far apart as the prior mean is from
    the target."""
    return (pred.float() - ref.float()).pow(2).mean(-1) / normalizer


def residual_sites(model) -> list[tuple[int, str]]:
    """``(layer, hook name)`` of the residual stream before block 0 (layer -1: the embedding) and after
    every block."""
    return [(-1, "blocks.0.hook_resid_pre")] + [(l, f"blocks.{l}.hook_resid_post") for l in range(model.n_layers)]


def has_heads(model) -> bool:
    return model.n_heads > 0 and "blocks.0.attn.hook_z" in model.hook_points()


def has_mlp(model, layer: int) -> bool:
    return f"blocks.{layer}.hook_mlp_out" in model.hook_points()


def head_writes(model, z: torch.Tensor, layer: int) -> torch.Tensor:
    """``[B, T, H, d_model]``: what each head of ``layer`` adds to the residual stream, from its ``hook_z``
    output ``z [B, T, H, d_head]``."""
    return torch.einsum("bthd,hdm->bthm", z, model.head_write_weights(layer).to(z.dtype))


def corr(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation of two equally shaped tensors, ``None`` when either is constant."""
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x.pow(2).sum()) * float(y.pow(2).sum()))
    if denom < 1e-12 * max(1, x.numel()):
        return None
    return float((x * y).sum()) / denom


def ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3):
    """Affine least squares ``y ≈ x @ w + c`` with a ridge relative to the mean feature variance (float64).

    ``x [..., N, d]``, ``y [..., N, k]``; leading dimensions are solved as a batch. Returns ``(w, c)``."""
    x, y = x.double(), y.double()
    mx, my = x.mean(-2, keepdim=True), y.mean(-2, keepdim=True)
    xc, yc = x - mx, y - my
    gram = xc.transpose(-1, -2) @ xc
    d = gram.shape[-1]
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[..., None, None]
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    w = on_host(torch.linalg.solve, gram + ridge * scale * eye, xc.transpose(-1, -2) @ yc)
    return w, my - mx @ w


def ridge_predict(x: torch.Tensor, fit) -> torch.Tensor:
    w, c = fit
    return x.double() @ w + c


def r_squared(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Held-out R² over dim -2 (samples), per remaining index; can be negative (worse than the mean)."""
    pred, y = pred.double(), y.double()
    ss_res = (y - pred).pow(2).sum(-2)
    ss_tot = (y - y.mean(-2, keepdim=True)).pow(2).sum(-2)
    return 1 - ss_res / ss_tot.clamp_min(1e-12)


def sequence_latents(task, batch: Batch) -> dict[str, torch.Tensor]:
    """The latents that are the sequence's rule, each flattened to ``[B, k]`` (a matrix ``A [B, d, d]``
    becomes ``[B, d*d]``). The task names them in ``rule_latents`` (see :class:`iclbench.Task`); a task
    that does not say gets every ``[B]`` latent and every ``[B, k]`` one that is not per position."""
    T = batch.inputs.shape[1]
    named = getattr(task, "rule_latents", None)
    out = {}
    for name, value in batch.latents.items():
        if not torch.is_tensor(value) or (named is not None and name not in named):
            continue
        if named is not None:
            out[name] = value.reshape(len(value), -1).float()
        elif value.ndim == 1:
            out[name] = value[:, None].float()
        elif value.ndim == 2 and value.shape[1] not in (T, T + 1):
            out[name] = value.float()
    missing = set(named or ()) - set(out)
    if missing:
        raise ValueError(f"task '{task.name}' declares rule latents {sorted(missing)} that its batch lacks")
    return out


def mean_over(values: torch.Tensor, positions: torch.Tensor) -> float:
    return float(values[..., positions].mean())


def clean(x):
    """JSON-safe float (NaN/inf → None), rounded for readable summaries."""
    if x is None:
        return None
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None
