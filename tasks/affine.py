"""Scalar affine recurrences, the seed paper's task (Bhargav & Gu 2024).

Each sequence draws its own rule and start::

    |a| ~ U[a_low, a_high] with a random sign,   b ~ U[-b_max, b_max],   x_0 ~ U[-x0_max, x0_max]
    x_{t+1} = a * x_t + b,                        observed y_t = x_t + noise * N(0, 1)

At position t the model has seen y_0..y_t and predicts y_{t+1}. With |a| <= 1 every sequence stays bounded:
|x_t| <= x0_max + t * b_max. Two transitions determine (a, b) exactly when noise = 0, so least squares is
exact from position 2 on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iclbench import hookimpl
from iclbench.pool import NOISE_FLOOR, RulePool, mixture, validate_pool
from iclbench.task import uniform

from ._bayes import affine_noisy_quadrature, affine_posterior_mean, affine_segment_mean_a, exact_from, mark
from ._fit import least_squares_recurrence
from ._scalar import Recurrence, copy_last
from ._shifts import standard_shifts


@dataclass
class AffineOptions:
    context_len: int = 16
    a_low: float = 0.0
    a_high: float = 1.0
    b_max: float = 0.25
    x0_max: float = 1.0
    noise: float = 0.0
    #: task diversity: train on a pool of this many rules (a, b), drawn once per training seed; 0: a fresh
    #: rule for every sequence (see iclbench.pool)
    pool: int = 0

    def validate(self):
        validate_pool(self.pool)
        if self.context_len < 2:
            raise ValueError(f"context_len must be >= 2, got {self.context_len}")
        if not 0 <= self.a_low <= self.a_high:
            raise ValueError(f"need 0 <= a_low <= a_high, got a_low={self.a_low}, a_high={self.a_high}")
        for key in ("b_max", "x0_max", "noise"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")


def _abs_moment(m: int, low: float, high: float) -> float:
    """E[a^m] for |a| ~ U[low, high] with a random sign."""
    if m % 2:
        return 0.0
    if high == low:
        return high ** m
    return (high ** (m + 1) - low ** (m + 1)) / ((m + 1) * (high - low))


def unroll_affine(x0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, T: int,
                  closed_form: bool | None = None) -> torch.Tensor:
    """The states ``x [n, T+1]`` of x_{t+1} = a x_t + b from ``x0``. On the CPU the recurrence is stepped
    (16 small ops; the float32 values every reference result was trained on). On an accelerator, where each
    op is a kernel launch, the closed form x_t = a^t x_0 + b * sum_{k<t} a^k in a handful of launches; it
    agrees with the stepped values to float32 rounding (tested), not bitwise. ``closed_form`` forces one."""
    if not (x0.device.type != "cpu" if closed_form is None else closed_form):
        x = torch.empty(x0.shape[0], T + 1, device=x0.device)
        x[:, 0] = x0
        for t in range(T):
            x[:, t + 1] = a * x[:, t] + b
        return x
    powers = a[:, None] ** torch.arange(T + 1, device=a.device)  # a^0 .. a^T
    geometric = torch.cat([torch.zeros_like(a)[:, None], powers[:, :-1].cumsum(1)], 1)  # sum_{k<t} a^k
    return powers * x0[:, None] + b[:, None] * geometric


class AffineTask(RulePool, Recurrence):
    name = "affine"
    description = "scalar affine recurrences x_{t+1} = a*x_t + b, rule drawn per sequence (seed paper)"
    Options = AffineOptions
    rule_latents = ("a", "b")
    transition_features = staticmethod(lambda y: torch.stack([y, torch.ones_like(y)], -1))

    def draw_rules(self, n, generator, device):
        o = self.options
        mag = uniform((n,), o.a_low, o.a_high, generator, device)
        sign = torch.randint(0, 2, (n,), generator=generator, device=device) * 2 - 1
        return {"a": mag * sign, "b": uniform((n,), -o.b_max, o.b_max, generator, device)}

    def sample_with_rules(self, rules, generator, device):
        o = self.options
        a, b = rules["a"], rules["b"]
        x = unroll_affine(uniform((a.shape[0],), -o.x0_max, o.x0_max, generator, device), a, b, o.context_len)
        return self.batch(x, {"a": a, "b": b}, generator)

    def pool_posterior_mean(self, rules, batch):
        """The posterior over the pool's (a, b) (float64). With noise x_0 is integrated in closed form (the
        quadrature of noisy affine, the pool for a grid). Without it x_0 = y_0, so a rule's likelihood is that
        of the transitions seen, y_{s+1} = a y_s + b, a point mass for which a Gaussian of NOISE_FLOOR x
        max(x0_max, b_max) stands in."""
        o = self.options
        a, b = rules["a"].double(), rules["b"].double()
        y = batch.inputs[..., 0].double()
        if o.noise:
            return affine_posterior_mean(y, a, b[:, None], o.x0_max, o.noise,
                                         chunk=max(1, (1 << 16) // a.shape[0]))[..., None]
        var = (NOISE_FLOOR * max(o.x0_max, o.b_max, 1e-9)) ** 2
        B, T = y.shape
        out, step = [], max(1, (1 << 22) // (a.shape[0] * T))  # at most 4M values at a time
        for i in range(0, B, step):
            yc = y[i:i + step]
            pred = yc[..., None] * a + b  # [b, T, K]: each rule's next value
            sq = (yc[:, 1:, None] - pred[:, :-1]) ** 2  # transition s -> s + 1, seen from position s + 1 on
            seen = torch.cat([torch.zeros_like(sq[:, :1]), sq.cumsum(1)], 1)
            out.append(mixture(pred[..., None], -seen / (2 * var))[..., 0])
        return torch.cat(out)[..., None]

    def normalizer(self, device="cpu"):
        """Closed form of Var(y_{t+1}) (the prior mean is 0 by symmetry):
        x_t = a^t x_0 + b * sum_{k<t} a^k with a, b, x_0 independent, so
        Var x_t = E[a^{2t}] x0_max^2/3 + b_max^2/3 * sum_{j,k<t} E[a^{j+k}], plus noise^2."""
        o = self.options
        m = lambda k: _abs_moment(k, o.a_low, o.a_high)  # noqa: E731
        out = []
        for t in range(1, o.context_len + 1):
            geo = sum(m(j + k) for j in range(t) for k in range(t))
            out.append(m(2 * t) * o.x0_max ** 2 / 3 + o.b_max ** 2 / 3 * geo + o.noise ** 2)
        return torch.tensor(out, dtype=torch.float32, device=device).clamp_min(1e-12)

    def bayes(self, batch):
        """The posterior mean of y_{t+1}."""
        o = self.options
        y = batch.inputs[..., 0]
        if o.noise:
            return affine_noisy_quadrature(y, o.a_low, o.a_high, o.b_max, o.x0_max, o.noise).to(y.dtype)[..., None]
        # t = 0: E[a] = E[b] = 0 by symmetry; t = 1: y_2 = y_1 + a (y_1 - y_0) with a's posterior a segment;
        # t >= 2: two transitions determine (a, b), and least squares finds them
        pred = torch.zeros_like(y)
        if y.shape[1] > 1:
            mean_a = affine_segment_mean_a(y[:, 0].double(), y[:, 1].double(), o.a_low, o.a_high, o.b_max)
            pred[:, 1] = (y[:, 1] + mean_a * (y[:, 1] - y[:, 0]).double()).to(y.dtype)
        return exact_from(self._least_squares(batch), pred[..., None], 2)

    def _least_squares(self, batch):
        return least_squares_recurrence(batch.inputs[..., 0], lambda y: torch.stack([y, torch.ones_like(y)], -1)
                                        )[..., None]

    def baselines(self):
        if self.options.noise:
            bayes = mark(self.bayes, "quadrature", "Posterior mean: (a, b) on a 128 x 32 midpoint grid, x_0 "
                         "integrated in closed form (truncated Gaussian)")
        else:
            bayes = mark(self.bayes, "exact", "Posterior mean, exact: 0 at t = 0, a uniform on a segment at "
                         "t = 1, least squares from t = 2")
        return {
            "bayes": bayes,
            "least_squares": self._least_squares,
            "copy_last": copy_last,
            "context_mean": lambda batch: batch.inputs.cumsum(1) / torch.arange(
                1, batch.inputs.shape[1] + 1, device=batch.inputs.device)[None, :, None],
            "oracle": lambda batch: (batch.latents["a"][:, None] * batch.latents["x"][:, :-1]
                                     + batch.latents["b"][:, None])[..., None],
        }

    def ood_variants(self):
        """|a| in (1, 1.1] (growing sequences), values scaled (x0_max and b_max together: the same rule
        family on a scaled sequence), observation noise 0.1, and twice the context."""
        o = self.options
        return {"a_in_(1,1.1]": self.with_options(a_low=1.0, a_high=1.1),
                **standard_shifts(self, lambda s: self.with_options(x0_max=s * o.x0_max, b_max=s * o.b_max),
                                  0.1 * o.x0_max)}


@hookimpl
def iclbench_tasks():
    return [AffineTask]
