"""Depth-limited decision trees learned in context: Garg et al. 2022's fourth function class.

Each sequence draws a complete binary tree of depth ``depth`` (4): each of its ``2^depth - 1`` internal nodes
tests one coordinate of x, drawn uniformly from the ``d`` (with replacement, so a path may test a coordinate
twice), and sends x right iff ``x_c > 0``; each of its ``2^depth`` leaves holds a value ``~ N(0, w_scale^2)``.
Inputs are ``x_i ~ N(0, x_scale^2 I_d)``, targets ``y_i = tree(x_i) + noise * N(0, 1)``. The prompt is the
regression family's (:mod:`iclbench.tasks.regression`): ``[x_i, 0]`` then ``[0.., y_i]``.

Every threshold is 0, so the tree is a function of the sign pattern of x (one of ``2^d`` cells): scaling x
changes nothing (the ``scale_x*`` shifts test whether a model learned that), and two inputs in the same cell
always share a leaf. ``Var y = w_scale^2 + noise^2`` whatever the tree: the normalizer in closed form.

The ``bayes`` baseline is the exact posterior mean (:func:`tree_posterior_mean`): the prior factorises over
the tree's nodes and the likelihood over its leaves, so a dynamic programme over the ``3^d`` axis-aligned
sign regions sums over all ``d^(2^depth - 1)`` structures (4^15 ~ 1e9 at the defaults) with the leaf values
integrated in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from iclbench import hookimpl
from iclbench.errors import warn

from ._bayes import mark
from .regression import InContextRegression, LinRegOptions, causal_mask, on_examples

#: the exact Bayes baseline keeps ``[chunk, N, 3^d, d]`` float64 tensors; past this d it is not offered
MAX_BAYES_D = 8


@dataclass
class TreeOptions(LinRegOptions):
    # d = 4: 16 sign cells, so a query often lands in a cell seen before (exact by lookup), yet the tree's
    # structure still pays (Bayes well below the lookup while the cells are being discovered); the exact
    # Bayes is cheap (81 regions). Garg et al. use d = 20 with 100 points; d = 8 is one override away.
    d: int = 4
    n_points: int = 24
    depth: int = 4
    #: also register scikit-learn's GradientBoostingRegressor (``pip install 'iclbench[trees]'``): one fit per
    #: sequence and prefix, ~35 ms each, so about an hour of one core per 4096-sequence evaluation set (spread
    #: over the cores): off by default. A finished run gains it by ``iclbench rescore RUN --set task.sklearn=true``
    sklearn: bool = False
    #: options that add baselines and never change the data, so ``iclbench rescore --set`` may turn them on later
    scoring_only: ClassVar[frozenset] = frozenset({"sklearn"})

    def validate(self):
        super().validate()
        if not 1 <= self.depth <= 6:
            raise ValueError(f"depth must be in [1, 6], got {self.depth}")


# --- the tree ---------------------------------------------------------------------------------------------
def evaluate_tree(coords: torch.Tensor, leaves: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``tree(x)``: heap layout (node k's children are 2k+1 (x_c <= 0) and 2k+2 (x_c > 0)); ``coords [B, 2^D - 1]``
    (long), ``leaves [B, 2^D]``, ``x [B, N, d]`` → ``[B, N]``. Every leaf is D levels down, so the walk takes
    exactly D steps and never asks the device whether it is done: a host sync per level makes sampling on a
    GPU wait for the queue (decision trees trained 10 times slower than the other regression tasks on an H200
    while the walk asked ``any()`` per level)."""
    internal = coords.shape[1]
    if (internal + 1) & internal:
        raise ValueError(f"a full tree has 2^D - 1 internal nodes, got {internal}")
    node = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
    for _ in range((internal + 1).bit_length() - 1):  # D = log2(2^D)
        c = torch.gather(coords, 1, node)  # [B, N]
        right = torch.gather(x, 2, c[..., None])[..., 0] > 0
        node = 2 * node + 1 + right.long()
    return torch.gather(leaves, 1, node - internal)


# --- sign regions -----------------------------------------------------------------------------------------
def cell_index(x: torch.Tensor) -> torch.Tensor:
    """Sign cell of each x: ``sum_c [x_c > 0] 2^c`` (``[B, N, d]`` → ``[B, N]`` long)."""
    bits = 2 ** torch.arange(x.shape[-1], device=x.device)
    return ((x > 0).long() * bits).sum(-1)


def ternary(stats: torch.Tensor, d: int, op) -> torch.Tensor:
    """Per-cell statistics ``[..., 2^d]`` → per-region ``[..., 3^d]``: region ``sum_c t_c 3^c`` with ``t_c`` = 0
    (coordinate c free), 1 (``x_c <= 0``) or 2 (``x_c > 0``) pools its cells with ``op`` (a sum, min or max of
    two tensors), one coordinate at a time."""
    lead = stats.shape[:-1]
    out = stats.reshape(*lead, *([2] * d))  # C order: the last axis is coordinate 0
    for c in range(d):
        axis = len(lead) + d - 1 - c
        neg, pos = out.select(axis, 0), out.select(axis, 1)
        out = torch.stack([op(neg, pos), neg, pos], axis)
    return out.reshape(*lead, 3 ** d)


def region_tables(d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``children [3^d + 1, d, 2]``: the region each coordinate's test sends a region's points to (``x_c <= 0``,
    ``x_c > 0``); ``3^d`` is the empty region (a region already cut on c the other way), its own child.
    ``query_regions [2^d, 2^d]``: for a query in cell s, the region fixing the coordinates in subset m to
    s's signs, ``[s, m]``."""
    R = 3 ** d
    codes = torch.arange(R)
    digits = torch.stack([(codes // 3 ** c) % 3 for c in range(d)], -1)  # [R, d]
    children = torch.full((R + 1, d, 2), R, dtype=torch.long)
    for c in range(d):
        for side in (0, 1):
            free = digits[:, c] == 0
            same = digits[:, c] == 1 + side
            children[:R, c, side] = torch.where(free, codes + (1 + side) * 3 ** c,
                                                torch.where(same, codes, torch.full_like(codes, R)))
    cells = torch.arange(2 ** d)
    signs = torch.stack([(cells >> c) & 1 for c in range(d)], -1)  # [2^d, d]
    subsets = torch.stack([(cells >> c) & 1 for c in range(d)], -1)  # [2^d (m), d]
    pow3 = 3 ** torch.arange(d)
    query_regions = ((1 + signs[:, None, :]) * subsets[None, :, :] * pow3).sum(-1)  # [s, m]
    return children.to(device), query_regions.to(device)


# --- the exact posterior mean -------------------------------------------------------------------------------
def tree_posterior_mean(x, y, depth: int, w_scale: float = 1.0, noise: float = 0.0, chunk: int | None = None):
    """Posterior mean of ``y_i`` from the pairs ``j < i`` under the task's prior: ``x [B, N, d]``, ``y [B, N]``
    → ``[B, N]``, exact (float64).

    A subtree whose node sees the points of a sign region R (the conjunction of the tests above it) has the
    prior ``d^-1`` per node and the likelihood ``prod_leaves L(leaf)``, so its evidence obeys
    ``Z_k(R) = d^-1 sum_c Z_{k+1}(R, x_c <= 0) Z_{k+1}(R, x_c > 0)`` down to the leaves, where the leaf value
    is integrated out in closed form (``N(0, w^2)`` prior, Gaussian noise). The query's prediction follows
    its path: ``P_k(R) = sum_c softmax_c(...) P_{k+1}(R, the query's side of c)``, with the leaf's posterior
    mean at the bottom. Regions are the ``3^d`` sign patterns with free coordinates; the query's regions are
    the ``2^d`` subsets of its own signs.

    Without noise the likelihood is singular: the limit noise → 0 keeps the structures whose leaves are pure
    (equal y) with the fewest non-empty leaves (each distinct y in one leaf), weighted by their prior. That
    limit is computed exactly: evidences are pairs (non-empty leaves, log prior mass), added by keeping the
    smallest count."""
    B, N, d = x.shape
    if B == 0 or N == 0:
        return torch.zeros(B, N, dtype=x.dtype, device=x.device)
    out = torch.empty(B, N, dtype=torch.float64, device=x.device)
    children, query_regions = region_tables(d, x.device)
    if chunk is None:  # ~2M entries per [regions, B N] tensor (16 MB; a level holds ~3d of them)
        chunk = max(1, (1 << 21) // ((3 ** d + 1) * N))
    for lo in range(0, B, chunk):
        out[lo:lo + chunk] = _posterior_chunk(x[lo:lo + chunk], y[lo:lo + chunk].double(), depth, w_scale,
                                              noise, children, query_regions)
    return out.to(x.dtype)


def _prefix_cells(values: torch.Tensor, cells: torch.Tensor, n_cells: int, fill: float, op) -> torch.Tensor:
    """``[B, N, n_cells]``: at query i, ``op`` over the values of the examples j < i in each cell."""
    B, N = values.shape
    per = torch.full((B, N, n_cells), fill, dtype=values.dtype, device=values.device)
    per.scatter_(2, cells[..., None], values[..., None])
    acc = op(per, 1)
    acc = acc if isinstance(acc, torch.Tensor) else acc.values
    return torch.cat([torch.full_like(acc[:, :1], fill), acc[:, :-1]], 1)


def _posterior_chunk(x, y, depth, w_scale, noise, children, query_regions):
    B, N, d = x.shape
    K = 2 ** d
    cells = cell_index(x)
    count = _prefix_cells(torch.ones_like(y), cells, K, 0.0, torch.cumsum)
    total = _prefix_cells(y, cells, K, 0.0, torch.cumsum)
    n, S = ternary(count, d, torch.add), ternary(total, d, torch.add)  # [B, N, 3^d]
    empty = torch.zeros_like(n[..., :1])
    n, S = torch.cat([n, empty], -1), torch.cat([S, empty], -1)  # + the empty region
    w2 = w_scale ** 2
    if noise > 0:
        sq = ternary(_prefix_cells(y * y, cells, K, 0.0, torch.cumsum), d, torch.add)
        Q = torch.cat([sq, empty], -1)
        s2 = noise ** 2
        denom = s2 + n * w2
        log_z = -0.5 * (n * math.log(2 * math.pi) + (n - 1) * math.log(s2) + denom.log()
                        + (Q - w2 * S * S / denom) / s2)  # log N(y_R; 0, s2 I + w2 11^T)
        leaves = torch.zeros_like(log_z)  # no singular part
        leaf_mean = w2 * S / denom
    else:
        high = ternary(_prefix_cells(y, cells, K, -math.inf, torch.cummax), d, torch.maximum)
        low = ternary(_prefix_cells(y, cells, K, math.inf, torch.cummin), d, torch.minimum)
        pure = torch.cat([high == low, torch.ones_like(empty, dtype=torch.bool)], -1)
        occupied = n > 0
        pure = pure | ~occupied
        leaves = torch.where(pure, occupied.to(n), torch.full_like(n, math.inf))  # non-empty leaves (inf: impure)
        log_z = torch.zeros_like(n)
        leaf_mean = torch.where(occupied, S / n.clamp_min(1), torch.zeros_like(S))
        if w2 == 0:
            leaf_mean = torch.zeros_like(S)
    # region-major from here ([3^d + 1, B N]): picking a region's children is then a copy of whole rows
    major = lambda t: t.reshape(B * N, -1).T.contiguous()  # noqa: E731
    log_z, leaves, leaf_mean = major(log_z), major(leaves), major(leaf_mean)
    own = query_regions[cells].reshape(B * N, K).T  # [2^d (m), B N]: the query's regions
    pred = torch.gather(leaf_mean, 0, own)  # P at the leaves
    log_d = math.log(d)
    m_index = torch.arange(K, device=x.device)
    grow = [m_index | (1 << c) for c in range(d)]  # the query's subsets with coordinate c added
    ch = [(children[:, c, 0], children[:, c, 1]) for c in range(d)]
    for _ in range(depth):  # one level up
        e = [leaves[a] + leaves[b] for a, b in ch]
        best = e[0]
        for ec in e[1:]:
            best = torch.minimum(best, ec)
        finite = best.isfinite()
        logw = [torch.where(finite, torch.where(ec == best, log_z[a] + log_z[b], -math.inf), 0.0)
                for ec, (a, b) in zip(e, ch)]
        top = logw[0]
        for lw in logw[1:]:
            top = torch.maximum(top, lw)
        norm = top + sum(torch.exp(lw - top) for lw in logw).log()
        own_norm = torch.gather(norm, 0, own)
        pred = sum(torch.exp(torch.gather(lw, 0, own) - own_norm) * pred[g] for lw, g in zip(logw, grow))
        log_z, leaves = norm - log_d, best
    return pred[0].reshape(B, N)


# --- greedy trees (CART) and boosting --------------------------------------------------------------------
def greedy_tree(x, y, max_depth: int | None = 4, chunk: int = 256):
    """CART as in scikit-learn's ``DecisionTreeRegressor(max_depth)`` (squared error, every midpoint between
    sorted values, grown while a node is impure and can be cut) on the pairs before each query; only the
    query's path is grown, which gives the same prediction. ``max_depth=None``: grown until every leaf is
    pure. Ties between equally good cuts go to the lowest coordinate and threshold (scikit-learn breaks them
    at random); 0 before any example."""
    B, N, d = x.shape
    if B > chunk:  # [B, N, N, d] float64 tensors: ~15 of them at a time
        return torch.cat([greedy_tree(x[i:i + chunk], y[i:i + chunk], max_depth, chunk) for i in range(0, B, chunk)])
    if max_depth is None:
        max_depth = N
    x64, y64 = x.double(), y.double()
    order = x64.argsort(1)  # [B, N, d]: sorted per coordinate, shared by every prefix
    xs = torch.gather(x64, 1, order)  # [B, N(sorted), d]
    ys = torch.gather(y64[..., None].expand(-1, -1, d), 1, order)
    active = causal_mask(N, x.device)[None].expand(B, -1, -1)  # [B, Nq, Nj]: in the query's node
    for _ in range(max_depth):
        a = torch.gather(active[..., None].expand(-1, -1, -1, d), 2,
                         order[:, None].expand(-1, N, -1, -1)).double()  # [B, Nq, Ns, d]
        n_tot = a[..., 0].sum(-1)  # [B, Nq]
        s_tot = (a[..., 0] * ys[:, None, :, 0]).sum(-1)
        q_tot = (a[..., 0] * ys[:, None, :, 0] ** 2).sum(-1)
        left_n, left_s = a.cumsum(2), (a * ys[:, None]).cumsum(2)
        right_n, right_s = n_tot[..., None, None] - left_n, s_tot[..., None, None] - left_s
        ahead = torch.where(a > 0, xs[:, None].expand_as(a), torch.full_like(a, math.inf))
        following = ahead.flip(2).cummin(2).values.flip(2)  # smallest active x at or after each position
        following = torch.cat([following[:, :, 1:], torch.full_like(following[:, :, :1], math.inf)], 2)
        valid = (a > 0) & following.isfinite() & (following > xs[:, None])
        gain = left_s ** 2 / left_n.clamp_min(1) + right_s ** 2 / right_n.clamp_min(1)
        gain = torch.where(valid, gain, torch.full_like(gain, -math.inf))
        flat = gain.reshape(B, N, N * d)
        best_gain = flat.max(-1).values
        # ties (every cut of a 2-point node gains the same) go to the lowest coordinate, then threshold,
        # counted among the node's points only: later pairs must not move the choice
        rank = torch.arange(d, device=x.device) * (N + 1) + left_n  # [B, Nq, Ns, d]
        tied = flat >= best_gain[..., None] - 1e-12 * (1 + best_gain.abs()[..., None])
        best = torch.where(tied, rank.reshape(B, N, N * d), torch.full_like(flat, math.inf)).argmin(-1)
        sse = q_tot - s_tot ** 2 / n_tot.clamp_min(1)
        split = best_gain.isfinite() & (sse > 1e-12 * (1 + q_tot))  # impure and cuttable
        if not split.any():
            break
        pos, c = best // d, best % d
        lo = torch.gather(xs, 1, pos[..., None].expand(-1, -1, d)).gather(2, c[..., None])[..., 0]  # [B, Nq]
        hi = torch.gather(following.reshape(B, N, N * d), 2, best[..., None])[..., 0]
        threshold = torch.where(split, (lo + hi) / 2, torch.zeros_like(lo))
        xc = torch.gather(x64, 2, c[:, :, None].expand(-1, -1, N).transpose(1, 2)).transpose(1, 2)  # [B, Nq, Nj]
        q_side = torch.gather(x64, 2, c[..., None])[..., 0] <= threshold  # [B, Nq]
        same = (xc <= threshold[..., None]) == q_side[..., None]
        active = active & (same | ~split[..., None])
    act = active.double()
    n = act.sum(-1)
    return ((act * y64[:, None]).sum(-1) / n.clamp_min(1)).to(x.dtype)


def sign_lookup(x, y):
    """Mean y of the earlier examples in the query's sign cell (the same leaf whatever the tree), else 0:
    memorising cells without inferring the tree."""
    cells = cell_index(x)
    same = (cells[:, :, None] == cells[:, None, :]) & causal_mask(x.shape[1], x.device)
    n = same.sum(-1)
    return (same.to(y) * y[:, None]).sum(-1) / n.clamp_min(1)


def _boosting_rows(xn, yn, params):
    """:func:`sklearn_boosting` on a block of sequences (numpy ``[b, N, d]``, ``[b, N]``) → ``[b, N]``."""
    import numpy as np
    from sklearn.ensemble import GradientBoostingRegressor

    out = np.zeros(yn.shape)
    out[:, 1:2] = yn[:, :1]  # one pair: its y (no fit)
    for b in range(len(xn)):
        for i in range(2, xn.shape[1]):
            model = GradientBoostingRegressor(random_state=0, **params).fit(xn[b, :i], yn[b, :i])
            out[b, i] = model.predict(xn[b, i:i + 1])[0]
    return out


def sklearn_boosting(x, y, jobs: int | None = None, **params):
    """scikit-learn's GradientBoostingRegressor (squared error; 100 stages of depth-3 trees, learning rate
    0.1 unless ``params`` say otherwise) fitted on the pairs before each query, one fit per sequence and
    prefix; the mean of y with a single pair, 0 before any. The sequences are spread over ``jobs`` processes
    (joblib, scikit-learn's own; default: the torch threads this process was given, so a sweep worker with
    ``--cpus-per-run 1`` fits in one process and does not oversubscribe the machine); each fit is seeded, so
    the prediction does not depend on ``jobs``."""
    import numpy as np
    from joblib import Parallel, delayed

    xn, yn = x.detach().cpu().double().numpy(), y.detach().cpu().double().numpy()
    jobs = jobs or torch.get_num_threads()
    blocks = np.array_split(np.arange(len(xn)), max(1, min(jobs * 4, len(xn))))
    rows = Parallel(n_jobs=jobs)(delayed(_boosting_rows)(xn[i], yn[i], params) for i in blocks)
    return torch.from_numpy(np.concatenate(rows)).to(x.dtype).to(x.device)


_NOTED: list = []


def _note_missing_sklearn():
    if not _NOTED:
        _NOTED.append(True)
        warn("decision-tree: task.sklearn is on but scikit-learn is not installed, so there is no "
             "gradient_boosting baseline (pip install 'iclbench[trees]')")


def sklearn_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sklearn") is not None


# --- the task ---------------------------------------------------------------------------------------------
class DecisionTreeRegression(InContextRegression):
    name = "decision-tree"
    description = "depth-4 decision trees on the signs of x (leaves ~ N(0, 1)), Garg et al. 2022; greedy-tree baselines"
    Options = TreeOptions
    rule_latents = ()  # 15 coordinates and 16 leaf values, many unreachable or repeated: no linear rule to probe

    def draw(self, n, generator, device):
        o = self.options
        coords = torch.randint(0, o.d, (n, 2 ** o.depth - 1), generator=generator, device=device)
        leaves = o.w_scale * torch.randn(n, 2 ** o.depth, generator=generator, device=device)
        return {"coords": coords, "leaves": leaves}

    def function(self, params, x):
        return evaluate_tree(params["coords"], params["leaves"], x)

    def signal_variance(self):
        """Each x reaches one leaf, whose value is ``N(0, w_scale^2)`` whatever the tree and the scale of x."""
        return self.options.w_scale ** 2

    def rule_features(self, batch):
        return None

    def baselines(self):
        out = super().baselines()
        o = self.options
        out["greedy_tree"] = on_examples(greedy_tree, max_depth=o.depth)
        out["greedy_tree"].__doc__ = (f"CART of depth {o.depth} (scikit-learn's DecisionTreeRegressor, squared "
                                      "error) on the pairs before each query; ties to the lowest coordinate")
        out["greedy_tree_full"] = on_examples(greedy_tree, max_depth=None)
        out["greedy_tree_full"].__doc__ = "The same CART grown until every leaf is pure (max_depth=None)"
        out["sign_lookup"] = on_examples(sign_lookup)
        if o.sklearn:
            if sklearn_available():
                out["gradient_boosting"] = on_examples(sklearn_boosting)
            else:
                _note_missing_sklearn()
        if o.d <= MAX_BAYES_D:
            out["bayes"] = self.bayes()
        return out

    def bayes(self):
        o = self.options
        doc = (f"Posterior mean, exact: every one of the d^{2 ** o.depth - 1} tree structures summed by a dynamic "
               f"programme over the 3^d sign regions, leaf values integrated in closed form"
               + ("" if o.noise else " (noise-free: the limit noise -> 0)"))
        return mark(on_examples(tree_posterior_mean, depth=o.depth, w_scale=o.w_scale, noise=o.noise),
                    "exact", doc)


@hookimpl
def iclbench_tasks():
    return [DecisionTreeRegression]
