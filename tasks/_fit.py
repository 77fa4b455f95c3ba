"""Fitting routines shared by the task families' baselines.

Every baseline predicts at each position from the context before it. Fitting a separate model per position
would be a Python loop; instead the sufficient statistics of every prefix are accumulated with ``cumsum`` and
all prefixes are solved at once, vectorised over the batch.
"""

from __future__ import annotations

from typing import Callable

import torch

from iclbench.task import on_host


def prefix_least_squares(features: torch.Tensor, targets: torch.Tensor, ridge: float = 0.0,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares coefficients fitted on examples ``0..n-1``, for every ``n = 0..N`` at once.

    ``features [B, N, k]`` and ``targets [B, N, m]`` are the examples in order; ``weights [N]`` (0 or 1)
    drops examples that do not follow the rule. Returns ``coef [B, N+1, k, m]`` where ``coef[:, n]``
    minimises ``sum_{i<n} w_i |targets_i - coef^T features_i|^2 + ridge |coef|^2`` — the minimum-norm
    solution (pseudo-inverse) while under-determined, zero before any example. Float64 for conditioning.
    """
    phi, z = features.double(), targets.double()
    weighted = phi if weights is None else phi * weights.to(phi)[:, None]
    xtx = torch.einsum("bni,bnj->bnij", weighted, phi).cumsum(1)
    xtz = torch.einsum("bni,bnm->bnim", weighted, z).cumsum(1)
    xtx = torch.cat([torch.zeros_like(xtx[:, :1]), xtx], 1)  # prefix n = 0 holds no example
    xtz = torch.cat([torch.zeros_like(xtz[:, :1]), xtz], 1)
    if ridge:
        xtx = xtx + ridge * torch.eye(phi.shape[-1], dtype=phi.dtype, device=phi.device)
    return on_host(lambda a, b: torch.linalg.pinv(a, hermitian=True) @ b, xtx, xtz)


def least_squares_recurrence(y: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor],
                             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Predict ``y[:, t+1]`` at every ``t`` by least squares on the transitions seen up to ``t``.

    ``y [B, T]`` (scalar states) or ``[B, T, d]`` (vector states); ``features(y) -> [B, T, k]`` builds the
    regressors at each position from the states up to it (lagged values must be built causally). The
    transition ``s`` maps ``features[:, s]`` to ``y[:, s+1]``; ``weights [T-1]`` drops transitions that do
    not follow the rule (e.g. initial values of a higher-order recurrence). Returns ``y``'s shape.
    """
    vector = y.dim() == 3
    y64 = y.double() if vector else y.double()[..., None]
    phi = features(y.double())  # [B, T, k]
    coef = prefix_least_squares(phi[:, :-1], y64[:, 1:], weights=weights)  # [B, T, k, m]: n = t transitions
    pred = (coef * phi[..., None]).sum(-2)
    return (pred if vector else pred[..., 0]).to(y.dtype)
