"""Function classes learned in context from (x, y) pairs, as in Garg et al. 2022.

Each sequence draws its own function f and ``n_points`` inputs ``x_i ~ N(0, x_scale^2 I_d)``; targets are
``y_i = f(x_i) + noise * N(0, 1)``. The prompt interleaves one token per position (``d_in = d + 1``)::

    position 2i:   [x_i, 0]    the model predicts y_i here, from x_i and the pairs before it (scored)
    position 2i+1: [0.., y_i]  the answer is revealed (not scored)

so after k examples the query sits at position 2k. The families:

- ``linreg``: ``f(x) = w.x`` with ``w ~ N(0, w_scale^2 I_d)``.
- ``sparse-linreg``: the same with only ``nonzero`` entries of w (at random coordinates) non-zero.
- ``relu-nn``: ``f(x) = sum_j v_j relu(u_j.x)`` over ``hidden`` units, ``u_j ~ N(0, I_d)``,
  ``v_j ~ N(0, 2 w_scale^2 / (hidden d))`` so that ``Var f(x) = w_scale^2 x_scale^2``.

Every prior is symmetric, so the prior mean of y is 0 and the normalizer is ``Var y`` in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from iclbench import Task, hookimpl
from iclbench.pool import NOISE_FLOOR, RulePool, mixture, validate_pool
from iclbench.task import Batch

from ._bayes import arccos_relu_kernel, gp_prefix_mean, mark, sparse_linreg_mixture
from ._fit import prefix_least_squares
from ._shifts import standard_shifts

NEIGHBOURS = 3  # k of the k-nearest-neighbours baseline (Garg et al.)
MAX_SUPPORTS = 5000  # sparse-linreg's exact Bayes mixes over every support up to this many


@dataclass
class LinRegOptions:
    d: int = 4
    n_points: int = 12
    w_scale: float = 1.0
    x_scale: float = 1.0
    noise: float = 0.0
    #: train on Garg et al.'s curriculum: the input dimension and the number of points grow during the first
    #: steps of training (see :meth:`InContextRegression.curriculum`); evaluation always uses the full task
    curriculum: bool = False
    #: coordinates of x in use (the rest are 0); 0: all d. What the curriculum changes, with n_points
    active_dims: int = 0
    #: task diversity: train on a pool of this many functions, drawn once per training seed; 0: a fresh
    #: function for every sequence (see iclbench.pool)
    pool: int = 0

    def validate(self):
        validate_pool(self.pool)
        if not 0 <= self.active_dims <= self.d:
            raise ValueError(f"active_dims must be in [0, d={self.d}] (0: all), got {self.active_dims}")
        if self.d < 1:
            raise ValueError(f"d must be >= 1, got {self.d}")
        if self.n_points < 2:
            raise ValueError(f"n_points must be >= 2, got {self.n_points}")
        for key in ("w_scale", "x_scale", "noise"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class SparseLinRegOptions(LinRegOptions):
    d: int = 8  # with 1 of 4 entries non-zero Lasso barely beats least squares (0.129 against 0.135)
    nonzero: int = 2

    def validate(self):
        super().validate()
        if not 1 <= self.nonzero <= self.d:
            raise ValueError(f"nonzero must be in [1, d={self.d}], got {self.nonzero}")


@dataclass
class ReluNNOptions(LinRegOptions):
    hidden: int = 8

    def validate(self):
        super().validate()
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")


# --- prompt layout --------------------------------------------------------------------------------------
def examples(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [B, N, d], y [B, N])`` read back from the interleaved prompt."""
    return batch.inputs[:, 0::2, :-1], batch.inputs[:, 1::2, -1]


def at_queries(pred: torch.Tensor) -> torch.Tensor:
    """Per-example predictions ``[B, N]`` → prompt layout ``[B, 2N, 1]`` (0 at the unscored y tokens)."""
    out = torch.zeros(pred.shape[0], 2 * pred.shape[1], 1, dtype=pred.dtype, device=pred.device)
    out[:, 0::2, 0] = pred
    return out


def on_examples(fn, **kwargs):
    """Lift ``fn(x, y, **kwargs) -> [B, N]`` to a baseline on the prompt layout (keeping its docstring, which
    ``iclbench list baselines`` shows)."""
    def baseline(batch):
        return at_queries(fn(*examples(batch), **kwargs))

    baseline.__doc__ = fn.__doc__
    return baseline


def causal_mask(n: int, device) -> torch.Tensor:
    """``[N, N]`` bool: query i may use example j iff j < i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(-1)


# --- baselines (each: x [B, N, d], y [B, N] -> prediction for y_i from pairs j < i, [B, N]) -------------
def least_squares(x, y, ridge=0.0):
    """Ordinary (minimum-norm while k < d) or ridge least squares on the pairs before each query."""
    coef = prefix_least_squares(x, y[..., None], ridge=ridge)[:, :-1, :, 0]  # [B, N, d]
    return (coef * x.double()).sum(-1).to(x.dtype)


def averaging(x, y, x_var=1.0):
    """w_hat = mean of y_j x_j / Var x over the pairs before the query (Garg et al.'s 'averaging': unbiased
    for w because E[x x^T] = Var x * I)."""
    s = (y[..., None] * x).cumsum(1)
    s = torch.cat([torch.zeros_like(s[:, :1]), s[:, :-1]], 1)
    k = torch.arange(x.shape[1], device=x.device).clamp_min(1)[None, :, None]
    return (s / (k * x_var) * x).sum(-1)


def nearest_neighbours(x, y, k=NEIGHBOURS):
    """Mean y of the k nearest earlier x (fewer while fewer exist; 0 before any)."""
    n = x.shape[1]
    allowed = causal_mask(n, x.device)
    dist = torch.cdist(x, x).masked_fill(~allowed, float("inf"))  # [B, N(query), N(example)]
    k = min(k, n)
    near = dist.topk(k, dim=-1, largest=False)
    valid = near.values.isfinite()
    picked = torch.gather(y[:, None, :].expand(-1, n, -1), 2, near.indices) * valid
    return picked.sum(-1) / valid.sum(-1).clamp_min(1)


def lasso(x, y, penalty, iters=400):
    """Lasso ``1/2 |y - Xw|^2 + penalty_k |w|_1`` on the pairs before each query, solved for every prefix at
    once by FISTA on the prefix Gram matrices. ``penalty [N]``: the weight at each prefix size."""
    x64, y64 = x.double(), y.double()
    gram = torch.einsum("bni,bnj->bnij", x64, x64).cumsum(1)
    corr = (x64 * y64[..., None]).cumsum(1)
    gram = torch.cat([torch.zeros_like(gram[:, :1]), gram[:, :-1]], 1)  # pairs j < i
    corr = torch.cat([torch.zeros_like(corr[:, :1]), corr[:, :-1]], 1)
    step = 1 / torch.linalg.eigvalsh(gram)[..., -1:].clamp_min(1e-12)  # [B, N, 1]: 1 / Lipschitz
    thresh = step * penalty.to(x64)[None, :, None]
    w = z = torch.zeros_like(corr)
    momentum = 1.0
    for _ in range(iters):
        grad = (gram * z[..., None, :]).sum(-1) - corr  # elementwise: faster than tiny batched matmuls
        u = z - step * grad
        w_next = u.sign() * (u.abs() - thresh).clamp_min(0)
        m_next = (1 + math.sqrt(1 + 4 * momentum ** 2)) / 2
        z = w_next + (momentum - 1) / m_next * (w_next - w)
        w, momentum = w_next, m_next
    return (w * x64).sum(-1).to(x.dtype)


def relu_net_gd(x, y, hidden, steps=100, lr=0.05):
    """A 2-layer ReLU network (the target's class) fitted by Adam to the pairs before each query.

    Every (sequence, query) pair gets its own network, trained at once: the loss of query i weighs example
    j by ``j < i``, so later pairs contribute exactly zero gradient. All networks start from one fixed
    initialisation, so a sequence gets the same prediction alone or in a batch.
    """
    B, n, d = x.shape
    gen = torch.Generator().manual_seed(0)
    u0 = torch.randn(hidden, d, generator=gen) / math.sqrt(d)
    v0 = torch.randn(hidden, generator=gen) / math.sqrt(hidden)
    weight = causal_mask(n, x.device).to(x.dtype)  # [N(query), N(example)]
    count = weight.sum(-1)
    with torch.enable_grad():
        u = u0.to(x).expand(B, n, hidden, d).clone().requires_grad_(True)
        v = v0.to(x).expand(B, n, hidden).clone().requires_grad_(True)
        opt = torch.optim.Adam([u, v], lr=lr)
        for _ in range(steps):
            h = torch.relu(torch.einsum("bqhd,bjd->bqjh", u, x))  # [B, Nq, Nj, H]
            fit = (h * v[:, :, None]).sum(-1)  # [B, Nq, Nj]
            loss = (((fit - y[:, None]) ** 2) * weight).sum(-1) / count.clamp_min(1)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
    with torch.no_grad():
        h = torch.relu(torch.einsum("bqhd,bqd->bqh", u, x))
        return (h * v).sum(-1) * (count > 0)  # no example: predict the prior mean 0


def zero(batch):
    """The prior mean, 0."""
    return torch.zeros_like(batch.targets)


def oracle(batch):
    """The true function's value f(x_i) (noise-free)."""
    return at_queries(batch.latents["f"])


# --- tasks ----------------------------------------------------------------------------------------------
class InContextRegression(RulePool, Task):
    """Shared layout, sampling and baselines; subclasses draw the function and give its variance."""

    Options = LinRegOptions
    score_from = 2  # from the second query on (k >= 1 example seen)
    # experiments/recipes.yaml (BENCHMARKS.md, "Training until flat"), gpt3l on linreg until flat: batch 64
    # plateaus at lr 2e-3 (0.55) and 1e-3 (0.63); at 5e-4 it is flat at 0.235 (Bayes 0.136); batch 256 at lr 1e-3
    # with a 500-step warmup is learned by step 4000 and at 0.178, still falling, at the 9000-step cap.
    # `--steps N` still trains N steps.
    train_defaults = {"lr": 1e-3, "batch_size": 256, "warmup": 500, "until": "flat", "max_steps": 20000}

    @property
    def d_in(self):
        return self.options.d + 1

    @property
    def d_out(self):
        return 1

    @property
    def context_len(self):
        return 2 * self.options.n_points

    def draw(self, n, generator, device) -> dict[str, torch.Tensor]:
        """The function's parameters for ``n`` sequences."""
        raise NotImplementedError

    def function(self, params, x) -> torch.Tensor:
        """``f(x)``: ``[B, N, d] -> [B, N]``."""
        raise NotImplementedError

    def signal_variance(self) -> float:
        """``Var f(x)`` under the prior (closed form)."""
        raise NotImplementedError

    #: the curriculum's stages (after the first) and the steps over which they come: at most this many, and
    #: at most a third of training, so that most of it is on the full task
    CURRICULUM_STAGES, CURRICULUM_STEPS = 4, 2000

    def curriculum(self, step, steps):
        """Garg et al.'s schedule, scaled to this task: the dimension grows from a quarter of ``d`` and the
        number of points from a third of ``n_points`` to the full task in equal stages over the first
        ``min(2000, steps / 3)`` steps; unused coordinates of x are 0 (the model's input width never changes).
        Off unless the task's ``curriculum`` option is on."""
        o = self.options
        ramp = min(self.CURRICULUM_STEPS, steps // 3)
        if not o.curriculum or step >= ramp:
            return {}
        k, stages = step * (self.CURRICULUM_STAGES + 1) // ramp, self.CURRICULUM_STAGES
        d0, n0 = max(1, math.ceil(o.d / 4)), max(2, math.ceil(o.n_points / 3))
        dims, points = d0 + round((o.d - d0) * k / stages), n0 + round((o.n_points - n0) * k / stages)
        changes = {"active_dims": 0 if dims >= o.d else dims}
        if points < o.n_points:
            changes["n_points"] = points
        return {key: v for key, v in changes.items() if getattr(o, key) != v}

    def active_fraction(self) -> float:
        """The share of x's coordinates in use."""
        o = self.options
        return (o.active_dims or o.d) / o.d

    def draw_rules(self, n, generator, device):
        return self.draw(n, generator, device)

    def pool_posterior_mean(self, rules, batch):
        """Each pool function's value at the query, weighted by its Gaussian likelihood of the pairs before
        it (float64); without noise a Gaussian of NOISE_FLOOR x sqrt(Var f) stands in for the point mass."""
        o = self.options
        var = max(o.noise, NOISE_FLOOR * math.sqrt(max(self.signal_variance(), 1e-12))) ** 2
        x, y = examples(batch)
        B, N, d = x.shape
        K = next(iter(rules.values())).shape[0]
        out, step = [], max(1, (1 << 22) // (K * N * d))  # at most 4M values at a time
        for i in range(0, B, step):
            xc = x[i:i + step]
            b = xc.shape[0]
            f = self.pool_values(rules, xc)  # [b, N, K]: each rule's value at each x
            sq = (y[i:i + b, :, None].double() - f) ** 2
            seen = torch.cat([torch.zeros_like(sq[:, :1]), sq[:, :-1].cumsum(1)], 1)  # pairs j < i
            out.append(mixture(f[..., None], -seen / (2 * var))[..., 0])
        return at_queries(torch.cat(out))

    def pool_values(self, rules, x):
        """``f_k(x)`` for each of the K rules ``rules [K, ...]`` at each ``x [b, N, d]``: ``[b, N, K]``, float64."""
        b, N, d = x.shape
        K = next(iter(rules.values())).shape[0]
        f = self.function(rules, x.reshape(1, b * N, d).expand(K, b * N, d)).double()
        return f.reshape(K, b, N).permute(1, 2, 0)

    def sample_with_rules(self, params, generator, device="cpu"):
        o = self.options
        n = next(iter(params.values())).shape[0]
        x = o.x_scale * torch.randn(n, o.n_points, o.d, generator=generator, device=device)
        if o.active_dims:
            x[..., o.active_dims:] = 0
        f = self.function(params, x)
        y = f + o.noise * torch.randn(f.shape, generator=generator, device=device) if o.noise else f
        tokens = torch.zeros(n, 2 * o.n_points, o.d + 1, device=device)
        tokens[:, 0::2, :-1] = x
        tokens[:, 1::2, -1] = y
        mask = torch.arange(2 * o.n_points, device=device) % 2 == 0
        return Batch(inputs=tokens, targets=at_queries(y), mask=mask, latents={**params, "x": x, "f": f})

    def normalizer(self, device="cpu"):
        """``Var y = Var f + noise^2`` at the queries (prior mean 0); 1 at the unscored answer tokens."""
        out = torch.ones(self.context_len, device=device)
        out[0::2] = self.signal_variance() + self.options.noise ** 2
        return out

    def baselines(self):
        return {"nearest_neighbours": on_examples(nearest_neighbours), "zero": zero, "oracle": oracle}

    def rule_features(self, batch):
        """x at the query tokens (zeros at the answer tokens, which are not examples)."""
        return batch.inputs[..., :-1], batch.mask

    def ood_variants(self):
        o = self.options
        noise = round(0.3 * math.sqrt(self.signal_variance()), 3)  # noise floor ~0.08 of the prior error
        return {
            "w_scale_x2": self.with_options(w_scale=2 * o.w_scale),
            **standard_shifts(self, lambda s: self.with_options(x_scale=s * o.x_scale), noise,
                              longer=self.with_options(n_points=2 * o.n_points)),
        }


class LinearRegression(InContextRegression):
    name = "linreg"
    description = "linear regression in context, y = w.x (+ noise), Garg et al. 2022"
    rule_latents = ("w",)

    def draw(self, n, generator, device):
        o = self.options
        return {"w": o.w_scale * torch.randn(n, o.d, generator=generator, device=device)}

    def function(self, params, x):
        return (x * params["w"][:, None]).sum(-1)

    def pool_values(self, rules, x):
        return x.double() @ rules["w"].double().T  # one product instead of K broadcasts

    def signal_variance(self):
        o = self.options
        return o.d * (o.w_scale * o.x_scale) ** 2 * self.active_fraction()

    def baselines(self):
        out = super().baselines()
        o = self.options
        out["least_squares"] = on_examples(least_squares)
        out["averaging"] = on_examples(averaging, x_var=max(o.x_scale, 1e-12) ** 2)
        if o.noise and o.w_scale:  # posterior mean under the Gaussian prior: the Bayes-optimal predictor
            out["ridge"] = on_examples(least_squares, ridge=(o.noise / o.w_scale) ** 2)
        out["bayes"] = self.bayes()
        return out

    def bayes(self):
        o = self.options
        if not o.w_scale:
            return mark(zero, "exact", "Posterior mean: w = 0 a priori, so 0")
        # ridge at the prior's lambda is the posterior mean; without noise its limit, the minimum-norm fit
        return mark(on_examples(least_squares, ridge=(o.noise / o.w_scale) ** 2), "exact",
                    "Posterior mean, exact: ridge at lambda = (noise / w_scale)^2 (minimum-norm fit without noise)")


class SparseLinearRegression(LinearRegression):
    name = "sparse-linreg"
    description = "linear regression with a sparse w (nonzero of d entries), Lasso baseline"
    Options = SparseLinRegOptions
    # a slow learner: gpt3l seed 0 under linreg's recipe fell by less than 5 % of its remaining excess per
    # held-out window from step 3000 on and stopped flat at 3600 (0.469); with flat_tol 0.01 it ran on to the
    # 12000-step cap, still falling, at 0.381 (Bayes 0.132, least squares 0.318). At lr 1e-3 seed 1 sat on a
    # plateau to the 20000-step cap (0.583); at 3e-4 seeds 0-3 are all partly learned by step 2000 (0.43-0.56,
    # against 0.43-0.72 at 1e-3, seed 1 not learned). results/reference/README.md has the paired trial
    train_defaults = {**InContextRegression.train_defaults, "flat_tol": 0.01, "lr": 3e-4}

    def draw(self, n, generator, device):
        o = self.options
        w = o.w_scale * torch.randn(n, o.d, generator=generator, device=device)
        keep = torch.rand(n, o.d, generator=generator, device=device).argsort(-1) < o.nonzero
        return {"w": w * keep}

    def signal_variance(self):
        o = self.options
        return o.nonzero * (o.w_scale * o.x_scale) ** 2 * self.active_fraction()

    def baselines(self):
        out = super().baselines()
        o = self.options

        def lasso_baseline(batch):
            """Lasso on the pairs before the query: near-zero penalty without noise (basis pursuit), the
            universal threshold noise * sqrt(2 k log d) with it."""
            x, y = examples(batch)
            k = torch.arange(x.shape[1], device=x.device)
            penalty = o.x_scale * (1e-3 + o.noise * torch.sqrt(2 * k * math.log(max(o.d, 2))))
            return at_queries(lasso(x, y, penalty))

        out["lasso"] = lasso_baseline
        return out

    def bayes(self):
        o = self.options
        if not o.w_scale:
            return super().bayes()
        if math.comb(o.d, o.nonzero) > MAX_SUPPORTS:  # best linear: ridge with the prior's covariance
            return mark(on_examples(least_squares, ridge=o.d * (o.noise / o.w_scale) ** 2 / o.nonzero),
                        "best-linear", f"Best linear predictor (ridge at the prior's covariance); more than "
                        f"{MAX_SUPPORTS} supports")
        return mark(on_examples(sparse_linreg_mixture, nonzero=o.nonzero, w_scale=o.w_scale, noise=o.noise),
                    "exact", f"Posterior mean, exact: mixture over the C(d, nonzero) = "
                    f"{math.comb(o.d, o.nonzero)} supports, a Gaussian posterior on each")


class ReluNetworkRegression(InContextRegression):
    name = "relu-nn"
    description = "targets from random 2-layer ReLU networks; fitted-network and kNN baselines"
    Options = ReluNNOptions
    # u and v are not identifiable (hidden units permute, u scales against v); the network's best linear
    # description is: for x ~ N(0, s^2 I), E[x relu(u.x)] = s^2 u / 2 (Stein), so the least-squares slope of
    # f on x is sum_j v_j u_j / 2 whatever s
    rule_latents = ("linear_part",)

    def draw(self, n, generator, device):
        o = self.options
        u = torch.randn(n, o.hidden, o.d, generator=generator, device=device)
        v = torch.randn(n, o.hidden, generator=generator, device=device) * o.w_scale * math.sqrt(
            2 / (o.hidden * o.d))
        return {"u": u, "v": v, "linear_part": 0.5 * torch.einsum("bh,bhd->bd", v, u)}

    def function(self, params, x):
        return (torch.relu(torch.einsum("bhd,bnd->bnh", params["u"], x)) * params["v"][:, None]).sum(-1)

    def signal_variance(self):
        """Var f = hidden * Var v * E relu(u.x)^2 = hidden * 2 w^2/(hidden d) * (d x_scale^2 / 2)."""
        o = self.options
        return (o.w_scale * o.x_scale) ** 2 * self.active_fraction()

    def baselines(self):
        out = super().baselines()
        hidden = self.options.hidden
        out["relu_net_gd"] = on_examples(relu_net_gd, hidden=hidden)
        out["bayes"] = mark(on_examples(self.gaussian_process), "best-linear",
                            "Best linear predictor: GP regression with the prior's exact covariance (arc-cosine "
                            "kernel); its error bounds the Bayes error from above")
        return out

    def gaussian_process(self, x, y):
        """``Cov(f(x), f(x')) = hidden Var(v) E_u[relu(u.x) relu(u.x')] = 2 w^2 / d * arccos_1(x, x')``,
        whatever the width; noise on the diagonal (and a 1e-4 relative jitter without noise)."""
        o = self.options
        K = arccos_relu_kernel(x.double(), 2 * o.w_scale ** 2 / o.d)
        var = o.noise ** 2 + (1e-4 * o.w_scale * o.x_scale) ** 2
        K = K + var * torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
        return gp_prefix_mean(K, y.double()).to(x.dtype)


@hookimpl
def iclbench_tasks():
    return [LinearRegression, SparseLinearRegression, ReluNetworkRegression]
