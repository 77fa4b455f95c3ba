"""Sequences continued in context: vector and higher-order linear recurrences, nonlinear recurrences and
polynomial sequences — the seed paper's "higher-dimensional recurrences" and "polynomial sequences".

As in ``affine``, each sequence draws its own rule, the model sees y_0..y_t at position t and predicts
y_{t+1}, and observations may carry Gaussian noise ``noise``. Every rule family is kept bounded (see each
task's docstring), and every task's baselines include least squares on the features that match the rule
(exact once enough transitions are seen, without noise), copy-last and the oracle that knows the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iclbench import Task, hookimpl
from iclbench.task import Batch, uniform

from ._bayes import logistic_bayes, recurrence_bayes
from ._fit import least_squares_recurrence, prefix_least_squares
from ._scalar import Recurrence, copy_last, observe
from ._shifts import standard_shifts

OOD_NOISE = 0.1  # relative to the state scale


def affine_least_squares(batch: Batch) -> torch.Tensor:
    """Least squares on [y_t, 1] — the affine rule the seed paper studies; shows what a linear fit misses."""
    return least_squares_recurrence(batch.inputs[..., 0], _affine_features)[..., None]


def _affine_features(y):
    return torch.stack([y, torch.ones_like(y)], -1)


def _validate_common(o):
    if o.context_len < 2:
        raise ValueError(f"context_len must be >= 2, got {o.context_len}")
    for key in ("noise", "x0_max"):
        if getattr(o, key, 0) < 0:
            raise ValueError(f"{key} must be >= 0, got {getattr(o, key)}")


# --- affine-vec -------------------------------------------------------------------------------------------
@dataclass
class AffineVecOptions:
    d: int = 2
    context_len: int = 16
    rho_low: float = 0.0
    rho_high: float = 1.0
    b_max: float = 0.25
    x0_max: float = 1.0
    noise: float = 0.0

    def validate(self):
        _validate_common(self)
        if self.d < 1:
            raise ValueError(f"d must be >= 1, got {self.d}")
        if not 0 <= self.rho_low <= self.rho_high:
            raise ValueError(f"need 0 <= rho_low <= rho_high, got {self.rho_low}, {self.rho_high}")
        if self.b_max < 0:
            raise ValueError(f"b_max must be >= 0, got {self.b_max}")


class AffineVecTask(Task):
    """x_{t+1} = A x_t + b in d dimensions.

    ``A = rho * G / |G|_2`` with ``G`` standard Gaussian and ``rho ~ U[rho_low, rho_high]``: the spectral
    norm is rho, so the spectral radius is at most rho < 1 and — unlike scaling the spectral radius alone —
    there is no transient growth: ``|x_t|_2 <= |x_0|_2 + t |b|_2``. ``b ~ U[-b_max, b_max]^d``,
    ``x_0 ~ U[-x0_max, x0_max]^d``. Least squares on [y_t, 1] is exact after d + 1 transitions.
    """

    name = "affine-vec"
    description = "vector affine recurrences x_{t+1} = A x_t + b, |A|_2 < 1 (higher-dimensional recurrences)"
    Options = AffineVecOptions
    score_from = 3
    rule_latents = ("A", "b")

    @property
    def d_in(self):
        return self.options.d

    @property
    def d_out(self):
        return self.options.d

    @property
    def context_len(self):
        return self.options.context_len

    def sample(self, n, generator, device="cpu"):
        o = self.options
        g = torch.randn(n, o.d, o.d, generator=generator, device=device)
        rho = uniform((n,), o.rho_low, o.rho_high, generator, device)
        A = g * (rho / torch.linalg.matrix_norm(g, ord=2))[:, None, None]
        b = uniform((n, o.d), -o.b_max, o.b_max, generator, device)
        x = torch.empty(n, o.context_len + 1, o.d, device=device)
        x[:, 0] = uniform((n, o.d), -o.x0_max, o.x0_max, generator, device)
        for t in range(o.context_len):
            x[:, t + 1] = (A @ x[:, t, :, None])[..., 0] + b
        y = observe(x, o.noise, generator)
        return Batch(inputs=y[:, :-1], targets=y[:, 1:], mask=torch.ones(o.context_len, dtype=torch.bool,
                     device=device), latents={"A": A, "b": b, "x": x})

    def baselines(self):
        out = {
            "least_squares": lambda batch: least_squares_recurrence(
                batch.inputs, lambda y: torch.cat([y, torch.ones_like(y[..., :1])], -1)),
            "copy_last": copy_last,
            "oracle": lambda batch: (batch.latents["A"][:, None] @ batch.latents["x"][:, :-1, :, None])[..., 0]
            + batch.latents["b"][:, None],
        }
        out["bayes"] = recurrence_bayes(self, out["least_squares"], self.options.d + 1, what="(A, b)")
        return out

    def rule_features(self, batch):
        return torch.cat([batch.inputs, torch.ones_like(batch.inputs[..., :1])], -1), batch.mask

    def ood_variants(self):
        o = self.options
        return {"rho_in_(1,1.1]": self.with_options(rho_low=1.0, rho_high=1.1),
                **standard_shifts(self, lambda s: self.with_options(x0_max=s * o.x0_max, b_max=s * o.b_max),
                                  OOD_NOISE * o.x0_max)}


# --- linrec -----------------------------------------------------------------------------------------------
@dataclass
class LinRecOptions:
    order: int = 2
    context_len: int = 16
    rho_low: float = 0.0
    rho_high: float = 1.0
    c_max: float = 0.25
    x0_max: float = 1.0
    noise: float = 0.0

    def validate(self):
        _validate_common(self)
        if not 1 <= self.order < self.context_len:
            raise ValueError(f"order must be in [1, context_len), got {self.order}")
        if not 0 <= self.rho_low <= self.rho_high:
            raise ValueError(f"need 0 <= rho_low <= rho_high, got {self.rho_low}, {self.rho_high}")
        if self.c_max < 0:
            raise ValueError(f"c_max must be >= 0, got {self.c_max}")


def lagged(y: torch.Tensor, order: int) -> torch.Tensor:
    """``[y_t, y_{t-1}, ..., y_{t-order+1}, 1]`` at every t (zeros before the sequence starts)."""
    lags = [torch.nn.functional.pad(y, (k, 0))[..., : y.shape[-1]] for k in range(order)]
    return torch.stack([*lags, torch.ones_like(y)], -1)


class LinRecTask(Recurrence):
    """Order-p linear recurrences x_{t+1} = sum_i a_i x_{t+1-i} + c (Fibonacci-like, kept bounded).

    ``a = rho * u / |u|_1`` with ``u ~ U[-1, 1]^p`` and ``rho ~ U[rho_low, rho_high]``; ``c ~ U[-c_max,
    c_max]``; the first p values ``~ U[-x0_max, x0_max]``. With ``|a|_1 <= 1``, ``|x_t| <= x0_max + t c_max``.
    The first p - 1 targets are initial values, not the rule, so they are not scored. Least squares on the
    p lags and a constant is exact after p + 1 rule transitions.
    """

    name = "linrec"
    description = "order-p linear recurrences x_{t+1} = sum_i a_i x_{t+1-i} + c, |a|_1 < 1"
    Options = LinRecOptions
    rule_latents = ("a", "c")

    def rule_features(self, batch):
        return lagged(batch.inputs[..., 0], self.options.order), self.rule_positions(batch.inputs.device)

    def sample(self, n, generator, device="cpu"):
        o = self.options
        u = uniform((n, o.order), -1, 1, generator, device)
        rho = uniform((n, 1), o.rho_low, o.rho_high, generator, device)
        a = rho * u / u.abs().sum(-1, keepdim=True).clamp_min(1e-12)
        c = uniform((n,), -o.c_max, o.c_max, generator, device)
        x = torch.empty(n, o.context_len + 1, device=device)
        x[:, : o.order] = uniform((n, o.order), -o.x0_max, o.x0_max, generator, device)
        for t in range(o.order - 1, o.context_len):
            x[:, t + 1] = (a * x[:, t + 1 - o.order: t + 1].flip(-1)).sum(-1) + c
        return self.batch(x, {"a": a, "c": c}, generator, mask=self.rule_positions(device))

    def rule_positions(self, device="cpu") -> torch.Tensor:
        """Positions whose target follows the rule (t >= order - 1)."""
        return torch.arange(self.options.context_len, device=device) >= self.options.order - 1

    def baselines(self):
        order = self.options.order

        def least_squares(batch):
            """Least squares on the p lags and a constant, over the rule's transitions seen so far."""
            weights = self.rule_positions(batch.inputs.device)[:-1]
            return least_squares_recurrence(batch.inputs[..., 0], lambda y: lagged(y, order), weights)[..., None]

        def oracle(batch):
            a, x = batch.latents["a"], batch.latents["x"][:, :-1]
            return ((lagged(x, order)[..., :-1] * a[:, None]).sum(-1) + batch.latents["c"][:, None])[..., None]

        return {"least_squares": least_squares, "copy_last": copy_last, "oracle": oracle,
                "bayes": recurrence_bayes(self, least_squares, 2 * order, what="(a, c)")}

    def ood_variants(self):
        o = self.options
        return {"rho_in_(1,1.1]": self.with_options(rho_low=1.0, rho_high=1.1),
                **standard_shifts(self, lambda s: self.with_options(x0_max=s * o.x0_max, c_max=s * o.c_max),
                                  OOD_NOISE * o.x0_max)}


# --- quadratic --------------------------------------------------------------------------------------------
@dataclass
class QuadraticOptions:
    context_len: int = 16
    coef_max: float = 2.0
    scale: float = 1.0  # observed values are scale * x_t (the rule acts on x in [-1, 1])
    noise: float = 0.0

    def validate(self):
        _validate_common(self)
        if not self.coef_max > 0 or not self.scale > 0:
            raise ValueError(f"coef_max and scale must be > 0, got {self.coef_max}, {self.scale}")


PROPOSALS = 128  # rejection-sampling proposals per sequence (all fail with probability ~5e-4 at coef_max 2)


def maps_into_unit_interval(a, b, c) -> torch.Tensor:
    """Whether x -> a x^2 + b x + c maps [-1, 1] into itself (its extremes: the ends and the vertex)."""
    vertex = (-b / (2 * a)).nan_to_num(0.0).clamp(-1, 1)
    ends = torch.stack([a - b + c, a + b + c, (a * vertex + b) * vertex + c], -1)
    return (ends.abs() <= 1).all(-1)


def _quadratic_features(y):
    return torch.stack([y * y, y, torch.ones_like(y)], -1)


class QuadraticTask(Recurrence):
    """x_{t+1} = a x_t^2 + b x_t + c, observed as scale * x_t.

    ``(a, b, c) ~ U[-coef_max, coef_max]^3`` conditioned on mapping [-1, 1] into itself (rejection: the first
    of 128 proposals that does; if none does, the first pulled into the unit l1 ball), ``x_0 ~ U[-1, 1]``, so
    ``|x_t| <= 1`` — the family includes chaotic maps such as 1 - 2x^2. Scaling keeps the family (scale * x
    follows a quadratic rule too), so least squares on [y^2, y, 1] stays exact from 3 transitions. No
    parameter shift is declared: a map that leaves [-1, 1] can send orbits to infinity.
    """

    name = "quadratic"
    description = "quadratic recurrences x_{t+1} = a x_t^2 + b x_t + c, kept in [-1, 1]"
    Options = QuadraticOptions
    rule_latents = ("a", "b", "c")
    transition_features = staticmethod(_quadratic_features)

    def sample(self, n, generator, device="cpu"):
        o = self.options
        u = uniform((n, PROPOSALS, 3), -o.coef_max, o.coef_max, generator, device)
        valid = maps_into_unit_interval(*u.unbind(-1))
        first = u[torch.arange(n, device=device), valid.int().argmax(1)]
        fallback = u[:, 0] / u[:, 0].abs().sum(-1, keepdim=True).clamp_min(1)
        a, b, c = torch.where(valid.any(1, keepdim=True), first, fallback).unbind(-1)
        x = torch.empty(n, o.context_len + 1, device=device)
        x[:, 0] = uniform((n,), -1, 1, generator, device)
        for t in range(o.context_len):
            x[:, t + 1] = (a * x[:, t] + b) * x[:, t] + c
        return self.batch(o.scale * x, {"a": a, "b": b, "c": c}, generator)

    def baselines(self):
        scale = self.options.scale

        def oracle(batch):
            lat = batch.latents
            x = lat["x"][:, :-1] / scale
            return (scale * ((lat["a"][:, None] * x + lat["b"][:, None]) * x + lat["c"][:, None]))[..., None]

        out = {
            "least_squares": lambda batch: least_squares_recurrence(batch.inputs[..., 0],
                                                                    _quadratic_features)[..., None],
            "affine_least_squares": affine_least_squares,
            "copy_last": copy_last,
            "oracle": oracle,
        }
        out["bayes"] = recurrence_bayes(self, out["least_squares"], 3, what="(a, b, c)")
        return out

    def ood_variants(self):
        o = self.options
        return standard_shifts(self, lambda s: self.with_options(scale=s * o.scale), OOD_NOISE * o.scale)


# --- logistic ---------------------------------------------------------------------------------------------
@dataclass
class LogisticOptions:
    context_len: int = 16
    r_low: float = 2.5
    r_high: float = 4.0
    scale: float = 1.0  # observed values are scale * x_t (the rule acts on x in [0, 1])
    noise: float = 0.0

    def validate(self):
        _validate_common(self)
        if not 0 <= self.r_low <= self.r_high <= 4:
            raise ValueError(f"need 0 <= r_low <= r_high <= 4 (beyond 4 orbits leave [0, 1]), got "
                             f"{self.r_low}, {self.r_high}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


def _logistic_features(y):
    return torch.stack([y, y * y], -1)


class LogisticTask(Recurrence):
    """The logistic map x_{t+1} = r x_t (1 - x_t), observed as scale * x_t.

    ``r ~ U[r_low, r_high] = U[2.5, 4]`` spans fixed points (r < 3), period doubling and chaos (r > 3.57);
    ``x_0 ~ U[0, 1]``; ``x_t`` stays in [0, 1]. Least squares on [y, y^2] (the map's features; unlike
    r * y (1 - y) it survives scaling) is exact after 2 transitions. The parameter shift takes r below the
    trained range, into [1, 2.5] (where orbits settle on a fixed point).
    """

    name = "logistic"
    description = "logistic map x_{t+1} = r x_t (1 - x_t), r in periodic and chaotic regimes"
    Options = LogisticOptions
    rule_latents = ("r",)
    transition_features = staticmethod(_logistic_features)

    def sample(self, n, generator, device="cpu"):
        o = self.options
        r = uniform((n,), o.r_low, o.r_high, generator, device)
        x = torch.empty(n, o.context_len + 1, device=device)
        x[:, 0] = torch.rand(n, generator=generator, device=device)
        for t in range(o.context_len):
            x[:, t + 1] = r * x[:, t] * (1 - x[:, t])
        return self.batch(o.scale * x, {"r": r}, generator)

    def baselines(self):
        scale = self.options.scale

        def oracle(batch):
            x = batch.latents["x"][:, :-1] / scale
            return (scale * batch.latents["r"][:, None] * x * (1 - x))[..., None]

        out = {
            "least_squares": lambda batch: least_squares_recurrence(batch.inputs[..., 0],
                                                                    _logistic_features)[..., None],
            "affine_least_squares": affine_least_squares,
            "copy_last": copy_last,
            "oracle": oracle,
        }
        out["bayes"] = logistic_bayes(self) if not self.options.noise else recurrence_bayes(
            self, out["least_squares"], 2, what="r")
        return out

    def ood_variants(self):
        o = self.options
        return {"r_in_[1,2.5]": self.with_options(r_low=1.0, r_high=2.5),
                **standard_shifts(self, lambda s: self.with_options(scale=s * o.scale), OOD_NOISE * o.scale)}


# --- poly -------------------------------------------------------------------------------------------------
@dataclass
class PolyOptions:
    context_len: int = 16
    degree: int = 3
    coef_max: float = 1.0
    origin: int = 8  # s_t = (t - origin) / horizon: time centred in the context, so the curve bends
    horizon: int = 4  # within it (with s in [0, 1] copy-last scores ~0.01); a longer context extends it
    noise: float = 0.0

    def validate(self):
        _validate_common(self)
        if self.degree < 0:
            raise ValueError(f"degree must be >= 0, got {self.degree}")
        if self.coef_max < 0:
            raise ValueError(f"coef_max must be >= 0, got {self.coef_max}")
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")


class PolyTask(Recurrence):
    """Polynomial sequences x_t = p(s_t) = sum_{k <= degree} c_k s_t^k with s_t = (t - origin) / horizon.

    ``c_k ~ U[-coef_max, coef_max]`` independently, so ``|x_t| <= coef_max sum_k |s_t|^k`` (<= 15 coef_max
    over the default 17 values, s in [-2, 2.25]), and the prior variance has the closed form ``coef_max^2 / 3 * sum_k s^{2k}`` (mean 0). Least squares on
    the monomials of time fits the points y_0..y_t and is exact from degree + 1 points. The parameter shift
    raises the degree by one.
    """

    name = "poly"
    description = "polynomial sequences x_t = p(t), random polynomials of degree <= 3"
    Options = PolyOptions
    rule_latents = ("c",)

    def rule_features(self, batch):
        """Position t predicts the point at time t + 1 from the monomials of that time."""
        B, T = batch.inputs.shape[:2]
        return self.monomials(batch.inputs.device)[None, 1:T + 1].expand(B, -1, -1).float(), batch.mask

    def times(self, device="cpu") -> torch.Tensor:
        """``s_t`` for t = 0..context_len, float64."""
        o = self.options
        return (torch.arange(o.context_len + 1, device=device, dtype=torch.float64) - o.origin) / o.horizon

    def monomials(self, device="cpu") -> torch.Tensor:
        """``[T+1, degree+1]``: 1, s_t, ..., s_t^degree."""
        return self.times(device)[:, None] ** torch.arange(self.options.degree + 1, device=device)

    def sample(self, n, generator, device="cpu"):
        o = self.options
        c = uniform((n, o.degree + 1), -o.coef_max, o.coef_max, generator, device)
        x = (c.double() @ self.monomials(device).T).float()
        return self.batch(x, {"c": c}, generator)

    def normalizer(self, device="cpu"):
        o = self.options
        s = self.times()[1:]
        var = o.coef_max ** 2 / 3 * (s[:, None] ** (2 * torch.arange(o.degree + 1))).sum(-1) + o.noise ** 2
        return var.float().to(device).clamp_min(1e-12)

    def baselines(self):
        def least_squares(batch):
            """Least squares of the points y_0..y_t on the monomials of time, evaluated at t + 1."""
            B, T = batch.inputs.shape[:2]
            phi = self.monomials(batch.inputs.device)
            coef = prefix_least_squares(phi[None, :T].expand(B, -1, -1), batch.inputs)[:, 1:]  # points <= t
            return (coef * phi[None, 1:, :, None]).sum(-2).to(batch.inputs.dtype)

        def oracle(batch):
            return (batch.latents["c"].double() @ self.monomials(batch.inputs.device)[1:].T).float()[..., None]

        o = self.options
        phi = self.monomials()
        moments = (torch.zeros(len(phi), 1, dtype=phi.dtype), o.coef_max ** 2 / 3 * phi @ phi.T)  # c uniform
        return {"least_squares": least_squares, "affine_least_squares": affine_least_squares,
                "copy_last": copy_last, "oracle": oracle,
                "bayes": recurrence_bayes(self, least_squares, o.degree, moments, what="p")}

    def ood_variants(self):
        o = self.options
        return {"degree_+1": self.with_options(degree=o.degree + 1),
                **standard_shifts(self, lambda s: self.with_options(coef_max=s * o.coef_max),
                                  OOD_NOISE * o.coef_max)}


@hookimpl
def iclbench_tasks():
    return [AffineVecTask, LinRecTask, QuadraticTask, LogisticTask, PolyTask]
