"""Bayes-optimal (posterior-mean) baselines: the best any learner can do with the same context.

Each built-in task's ``bayes`` baseline predicts ``E[target | context up to t]`` under the task's own prior
(read from its options, so OOD variants get their own). It reads no latents, so it is a competitor, not an
oracle. How it is computed is recorded on the function as ``fn.bayes`` (see :data:`iclbench.task.BAYES_KINDS`):

- ``exact``: closed form (possibly a finite mixture), up to float rounding;
- ``quadrature``: a deterministic grid over the low-dimensional parameters, the rest integrated in closed form;
- ``best-linear``: the best predictor *linear in the observed values*, i.e. Gaussian-process regression with
  the task's exact prior mean and covariance (from a fixed Monte-Carlo sample where no closed form exists).
  Its error bounds the Bayes error from above;
- ``importance-sampled``: prior draws weighted by the likelihood.

A baseline may be exact at some positions and best-linear at others (noise-free recurrences are determined
once enough transitions are seen); ``fn.bayes`` names the kind that holds at the task's summary positions
(``score_from`` on) and the docstring says the rest.
"""

from __future__ import annotations

import math

import torch

from iclbench.task import on_host

#: prior draws behind a Monte-Carlo prior covariance (relative error of each entry ~ sqrt(2 / 2**18) = 0.3 %)
MC_SEQUENCES = 1 << 18
_MOMENTS: dict = {}


def mark(fn, kind: str, doc: str | None = None):
    """``fn`` as the Bayes baseline of kind ``kind``, with the docstring ``iclbench list`` shows."""
    def bayes(batch):
        return fn(batch)

    bayes.bayes = kind
    bayes.__doc__ = doc if doc is not None else fn.__doc__
    return bayes


# --- best linear predictor of a sequence from its prefix ------------------------------------------------
def sequence_moments(task, key=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prior mean ``[T+1, d]`` and covariance ``[(T+1) d, (T+1) d]`` (float64) of the *clean* states
    ``latents["x"]`` of a recurrence task, from :data:`MC_SEQUENCES` draws with a fixed seed, cached per
    task options (noise excluded: observation noise adds ``noise^2 I``)."""
    clean = task.with_options(noise=0.0)
    key = (task.name, repr(clean.options)) if key is None else key
    if key not in _MOMENTS:
        gen = torch.Generator("cpu").manual_seed(0xBA7E5)
        s1 = s2 = 0.0
        n = 0
        chunk = 1 << 14
        for _ in range(MC_SEQUENCES // chunk):
            x = clean.sample(chunk, gen, "cpu").latents["x"].double()
            x = x.reshape(chunk, -1)  # [n, (T+1) d], time-major
            s1 = s1 + x.sum(0)
            s2 = s2 + x.T @ x
            n += chunk
        mean = s1 / n
        cov = s2 / n - mean[:, None] * mean[None, :]
        _MOMENTS[key] = (mean, cov)
    return _MOMENTS[key]


def linear_predictor(mean: torch.Tensor, cov: torch.Tensor, d: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H [T d, T d], offset [T d])`` such that ``offset + H @ y_in`` is the best linear prediction of
    ``y_{t+1}`` from ``y_0..y_t`` at every t (``y_in`` = y_0..y_{T-1} flattened time-major): block row t is
    ``Cov(y_{t+1}, y_{<=t}) Cov(y_{<=t})^+``. Data-free, so computed once and shared by the batch."""
    H = torch.zeros(T * d, T * d, dtype=torch.float64)
    for t in range(T):
        past = slice(0, (t + 1) * d)
        nxt = slice((t + 1) * d, (t + 2) * d)
        H[t * d:(t + 1) * d, past] = cov[nxt, past] @ torch.linalg.pinv(cov[past, past], hermitian=True,
                                                                          rtol=1e-10)
    offset = mean[d:(T + 1) * d] - H @ mean[: T * d]
    return H, offset


def apply_linear(H: torch.Tensor, offset: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``inputs [B, T, d]`` → best linear predictions ``[B, T, d]``."""
    B, T, d = inputs.shape
    y = inputs.double().reshape(B, T * d)
    pred = y @ H.to(y.device).T + offset.to(y.device)
    return pred.reshape(B, T, d).to(inputs.dtype)


def best_linear_recurrence(task, inputs: torch.Tensor, mean=None, cov=None) -> torch.Tensor:
    """Best linear predictor of a recurrence task's observations (prior moments of the clean states plus
    ``noise^2`` on the diagonal)."""
    if mean is None:
        mean, cov = sequence_moments(task)
    B, T, d = inputs.shape
    noise = getattr(task.options, "noise", 0.0)
    cov = cov[: (T + 1) * d, : (T + 1) * d] + noise ** 2 * torch.eye((T + 1) * d, dtype=cov.dtype)
    H, offset = linear_predictor(mean.reshape(-1)[: (T + 1) * d], cov, d, T)
    return apply_linear(H, offset, inputs)


def exact_from(exact: torch.Tensor, fallback: torch.Tensor, start: int) -> torch.Tensor:
    """``exact`` at positions ``t >= start``, ``fallback`` before ([B, T, d] both)."""
    t = torch.arange(exact.shape[1], device=exact.device)[None, :, None]
    return torch.where(t >= start, exact, fallback)


# --- Gaussian-process regression on (x, y) pairs --------------------------------------------------------
def gp_prefix_mean(K: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Posterior mean of ``y_i`` from ``y_j, j < i`` for every i, given the prior covariance ``K [B, N, N]``
    of ``y`` (noise on the diagonal) and prior mean 0.

    The Cholesky factor of every prefix is the leading block of the full factor ``L``, and
    ``L[i, :i] = (L_{<i}^{-1} K[:i, i])^T``, so with ``e = L^{-1} y`` the prediction is ``L[i, :i] @ e[:i]``:
    one factorisation per sequence serves every query."""
    def predict(K, y):
        L = torch.linalg.cholesky(K)
        e = torch.linalg.solve_triangular(L, y[..., None], upper=False)[..., 0]
        return (L.tril(-1) * e[:, None, :]).sum(-1)

    return on_host(predict, K, y)  # one small factorisation per sequence: CPU (see iclbench.task.on_host)


def arccos_relu_kernel(x: torch.Tensor, variance_per_dim: float) -> torch.Tensor:
    """``E_u[relu(u.x) relu(u.x')]`` for ``u ~ N(0, I)`` (Cho & Saul's degree-1 arc-cosine kernel),
    ``|x||x'| (sin θ + (π - θ) cos θ) / 2π``, times ``variance_per_dim``. ``x [B, N, d]`` → ``[B, N, N]``."""
    norm = x.norm(dim=-1)
    outer = norm[:, :, None] * norm[:, None, :]
    cos = ((x @ x.transpose(1, 2)) / outer.clamp_min(1e-300)).clamp(-1, 1)
    theta = torch.arccos(cos)
    return variance_per_dim * outer * (torch.sin(theta) + (math.pi - theta) * cos) / (2 * math.pi)


# --- truncated Gaussian helpers -------------------------------------------------------------------------
def truncated_normal_mean(m: torch.Tensor, sd: torch.Tensor, low: float, high: float):
    """Mean of ``N(m, sd^2)`` restricted to ``[low, high]`` and ``log P(low <= X <= high)``.

    Through ``erfc`` (much cheaper than ``log_ndtr``), with both bounds moved to the lower tail where
    ``Φ`` keeps its relative precision; a mass below 1e-37 (an interval > 13 sd away) counts as 1e-37."""
    alpha, beta = (low - m) / sd, (high - m) / sd
    upper = alpha > 0  # Φ(β) - Φ(α) = Φ(-α) - Φ(-β)
    lo, hi = torch.where(upper, -beta, alpha), torch.where(upper, -alpha, beta)
    mass = (0.5 * (torch.special.erfc(hi * -_SQRT_HALF) - torch.special.erfc(lo * -_SQRT_HALF))).clamp_min(1e-37)
    density = torch.exp(-0.5 * alpha * alpha) - torch.exp(-0.5 * beta * beta)
    shift = density * _INV_SQRT_2PI / mass
    return (m + sd * shift).clamp(low, high), mass.log()


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


# --- scalar affine recurrences --------------------------------------------------------------------------
def affine_segment_mean_a(y0, y1, a_low, a_high, b_max):
    """``E[a | y0, y1]`` without noise: ``b = y1 - a y0`` must lie in ``[-b_max, b_max]``, so the posterior
    of a is its uniform prior (on ``±[a_low, a_high]``) cut to the segment ``|y1 - a y0| <= b_max``."""
    safe = y0.abs() > 1e-12
    q = torch.where(safe, y0, torch.ones_like(y0))
    lo = torch.where(safe, torch.minimum((y1 - b_max) / q, (y1 + b_max) / q), torch.full_like(y0, -math.inf))
    hi = torch.where(safe, torch.maximum((y1 - b_max) / q, (y1 + b_max) / q), torch.full_like(y0, math.inf))
    if b_max == 0:  # b = 0: a = y1 / y0 (0 if y0 = 0: the prior mean)
        return torch.where(safe, y1 / q, torch.zeros_like(y0))
    num = torch.zeros_like(y0)
    den = torch.zeros_like(y0)
    for s_lo, s_hi in ((a_low, a_high), (-a_high, -a_low)):
        left, right = lo.clamp(min=s_lo), hi.clamp(max=s_hi)
        if a_high > a_low:
            w = (right - left).clamp_min(0)
        else:  # |a| fixed: a point mass on each sign, kept if the segment reaches it
            w = ((lo <= s_lo) & (s_lo <= hi)).to(y0)
        num = num + w * torch.where(w > 0, (left + right) / 2, torch.zeros_like(y0))
        den = den + w
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(y0))


def affine_noisy_quadrature(y, a_low, a_high, b_max, x0_max, noise, n_a=32, n_b=16, chunk=64,
                            dtype=torch.float32):
    """Posterior-mean predictions ``[B, T]`` for noisy affine sequences ``y [B, T]`` (y_0..y_{T-1}).

    Given (a, b) the clean states are ``x_s = a^s x_0 + b S_s`` (``S_s = sum_{k<s} a^k``), linear in x_0, so
    x_0 (uniform prior) is integrated in closed form (a truncated Gaussian); (a, b) are integrated on a
    midpoint grid of ``2 n_a`` values of a (both signs) times ``n_b`` values of b. At noise 0.1 the default
    64 x 16 grid is within 6e-4 (normalized, max over positions) of a 512 x 64 grid; float32 suffices since
    only differences of log-weights near the maximum matter."""
    dev = y.device
    if a_high > a_low:
        half = a_low + (torch.arange(n_a, dtype=dtype, device=dev) + 0.5) / n_a * (a_high - a_low)
    else:
        half = torch.tensor([a_high], dtype=dtype, device=dev)
    a = torch.cat([-half.flip(0), half])  # [Ga]
    b = (torch.arange(n_b, dtype=dtype, device=dev) + 0.5) / n_b * 2 * b_max - b_max if b_max > 0 \
        else torch.zeros(1, dtype=dtype, device=dev)
    return affine_posterior_mean(y, a, b[None, :], x0_max, noise, chunk)


def affine_posterior_mean(y, a, b, x0_max, noise, chunk=64):
    """Posterior-mean predictions ``[B, T]`` for noisy affine sequences ``y [B, T]`` when the rule is one of
    the pairs ``(a[g], b[g', j])``, all equally likely a priori (``a [Ga]``, ``b [Ga or 1, Gb]``: a grid when
    ``b`` has one row, a list of pairs when it has a column), and ``x_0 ~ U[-x0_max, x0_max]`` (integrated
    in closed form). Computed in ``a``'s dtype. The grid of :func:`affine_noisy_quadrature`; the pool of
    rules of :mod:`iclbench.pool` (dMMSE)."""
    dtype, dev = a.dtype, y.device
    y = y.to(dtype)
    B, T = y.shape
    s = torch.arange(T + 1, dtype=dtype, device=dev)
    pw = a[None, :] ** s[:, None]  # [T+1, Ga]: a^s
    S = torch.cat([torch.zeros_like(pw[:1]), pw[:-1].cumsum(0)])  # [T+1, Ga]: sum_{k<s} a^k
    P, A2, C2 = (pw * pw).cumsum(0), (pw * S).cumsum(0), (S * S).cumsum(0)  # [T+1, Ga], data-free
    X = max(x0_max, 1e-9)
    out = torch.empty(B, T, dtype=dtype, device=dev)
    bb = b[None]  # [1, Ga or 1, Gb]
    for i in range(0, B, chunk):
        yc = y[i:i + chunk]
        A1 = (yc[:, :, None] * pw[None, :T]).cumsum(1)  # [b, T, Ga]
        C1 = (yc[:, :, None] * S[None, :T]).cumsum(1)
        Y2 = (yc * yc).cumsum(1)
        for t in range(T):
            M = A1[:, t, :, None] - bb * A2[t, :, None]  # [b, Ga, Gb]
            Q = Y2[:, t, None, None] - 2 * bb * C1[:, t, :, None] + bb * bb * C2[t, :, None]
            Pt = P[t, :, None]
            m = M / Pt
            x0, log_mass = truncated_normal_mean(m, noise / Pt.sqrt(), -X, X)
            logw = -(Q - M * m) / (2 * noise ** 2) - 0.5 * Pt.log() + log_mass
            w = torch.softmax(logw.flatten(1), -1).view_as(logw)
            pred = pw[t + 1, :, None] * x0 + bb * S[t + 1, :, None]
            out[i:i + chunk, t] = (w * pred).sum((1, 2))
    return out


# --- sparse linear regression ---------------------------------------------------------------------------
def sparse_linreg_mixture(x, y, nonzero: int, w_scale: float, noise: float, jitter: float = 1e-5):
    """Posterior mean of ``y_i`` from the pairs ``j < i`` when ``w`` has ``nonzero`` entries ~ N(0, w_scale^2)
    on a support drawn uniformly: a mixture over the ``C(d, nonzero)`` supports, each a Gaussian posterior,
    weighted by its marginal likelihood. ``x [B, N, d]``, ``y [B, N]`` → ``[B, N]``. Without noise a noise of
    ``jitter * w_scale`` stands in (the data are float32, so not exactly consistent anyway)."""
    import itertools

    B, N, d = x.shape
    supports = torch.tensor(list(itertools.combinations(range(d), nonzero)), device=x.device)  # [M, s]
    var = max(noise, jitter * w_scale) ** 2
    x64, y64 = x.double(), y.double()
    gram = torch.einsum("bni,bnj->bnij", x64, x64).cumsum(1)
    corr = (x64 * y64[..., None]).cumsum(1)
    gram = torch.cat([torch.zeros_like(gram[:, :1]), gram[:, :-1]], 1)  # pairs j < i
    corr = torch.cat([torch.zeros_like(corr[:, :1]), corr[:, :-1]], 1)
    G = gram[:, :, supports[:, :, None], supports[:, None, :]]  # [B, N, M, s, s]
    c = corr[:, :, supports]  # [B, N, M, s]
    A = G / var + torch.eye(nonzero, dtype=G.dtype, device=G.device) / w_scale ** 2
    def posterior(A, b):  # [B, N, M] factorisations of s×s: on the CPU (see iclbench.task.on_host)
        L = torch.linalg.cholesky(A)
        return torch.cat([torch.cholesky_solve(b, L), torch.diagonal(L, dim1=-2, dim2=-1)[..., None]], -1)

    mean, diag = on_host(posterior, A, c[..., None] / var).unbind(-1)  # [B, N, M, s] each
    log_det = 2 * torch.log(diag).sum(-1) + nonzero * math.log(w_scale ** 2)
    log_evidence = 0.5 * (c * mean).sum(-1) / var - 0.5 * log_det
    weight = torch.softmax(log_evidence, -1)  # [B, N, M]
    pred = (mean * x64[:, :, supports]).sum(-1)  # [B, N, M]
    return (weight * pred).sum(-1).to(x.dtype)


# --- recurrences ----------------------------------------------------------------------------------------
def recurrence_bayes(task, least_squares, exact_start: int, moments=None, what: str = "the rule"):
    """The ``bayes`` baseline of a recurrence task whose rule is linear in features of the state.

    Without noise ``exact_start`` transitions determine the rule, so from then on least squares on the
    matching features *is* the posterior mean. Before that (and at every position with noise) it is the
    best linear predictor, or least squares at positions where that has the lower error on a fixed sample of
    the prior (a choice made once, from the prior, not from the data): an upper bound on the Bayes error,
    never above either. ``moments``: the prior ``(mean, cov)`` of the clean states where a closed form
    exists (else Monte Carlo, :func:`sequence_moments`). The kind names what holds from ``task.score_from``
    on."""
    noise = getattr(task.options, "noise", 0.0)

    def candidates(batch):
        mean, cov = moments if moments is not None else sequence_moments(task)
        linear = best_linear_recurrence(task, batch.inputs, mean, cov)
        return linear, least_squares(batch)

    def use_least_squares(T: int, device) -> torch.Tensor:
        key = ("choice", task.name, repr(task.options), T)
        if key not in _MOMENTS:
            sample = task.sample(4096, torch.Generator("cpu").manual_seed(0xC401CE), "cpu")
            linear, ls = candidates(sample)
            err = lambda p: (p.double() - sample.targets).pow(2).mean((0, 2)).nan_to_num(math.inf)  # noqa: E731
            _MOMENTS[key] = err(ls) < err(linear)
        return _MOMENTS[key].to(device)

    def bayes(batch):
        linear, ls = candidates(batch)
        T = batch.inputs.shape[1]
        pick = use_least_squares(T, batch.inputs.device) if T == task.context_len else torch.zeros(
            T, dtype=torch.bool, device=batch.inputs.device)
        pred = torch.where(pick[None, :, None], ls, linear)
        return pred if noise else exact_from(ls, pred, exact_start)

    source = "exact prior covariance" if moments is not None else f"prior covariance from {MC_SEQUENCES} draws"
    if noise:
        return mark(bayes, "best-linear", f"Best linear predictor ({source}), or least squares where that is "
                    "better on the prior; with noise the exact posterior is not computed")
    kind = "exact" if task.score_from >= exact_start else "best-linear"
    return mark(bayes, kind, f"Posterior mean, exact from t = {exact_start} ({what} is determined: least "
                f"squares); before, the better of the best linear predictor ({source}) and least squares")


def logistic_bayes(task):
    """Posterior mean for the logistic map without noise: one transition gives r = x_1 / (x_0 (1 - x_0));
    before it, ``E[r]`` (x_0 says nothing about r)."""
    o = task.options

    def bayes(batch):
        x = batch.inputs[..., 0].double() / o.scale
        g = x * (1 - x)
        num = (g[:, :-1] * x[:, 1:]).cumsum(1)  # transitions s -> s+1 seen by position t = s + 1
        den = (g[:, :-1] ** 2).cumsum(1)
        r = torch.full_like(x, (o.r_low + o.r_high) / 2)
        r[:, 1:] = torch.where(den > 1e-24, num / den.clamp_min(1e-300), r[:, 1:])
        return (o.scale * r * g).to(batch.inputs.dtype)[..., None]

    return mark(bayes, "exact", "Posterior mean, exact: E[r] x_t (1 - x_t) at t = 0, then r from the "
                "transitions seen")
