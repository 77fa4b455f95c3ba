"""Task diversity: train on a finite pool of rules (Raventós et al. 2023, "Pretraining task diversity and the
emergence of non-Bayesian in-context learning for regression").

A task that opts in (:class:`RulePool`) gets an option ``pool: int`` (0, the default: unbounded, a fresh rule
for every sequence, the task as it always was). With ``pool = K > 0``:

- **training**: each training seed draws its own pool of K rules once, on the CPU, from a generator seeded by
  the run seed and a constant (:func:`pool_generator`: the same seed gives the same pool in any process, on any
  device); every training sequence takes one of them, uniformly, from the seed's data generator. The trainer
  asks for it through :meth:`iclbench.task.Task.training_task` (the task itself for every other task), which
  gives a :class:`PooledTask`. Seeds with pools of their own are not stacked (each trains alone).
- **evaluation**: the main evaluation, the probes and every distribution shift stay on *fresh* rules (the
  task's usual evaluation set); one more variant, ``pool_rules`` (:func:`pool_variants`), draws its sequences'
  rules from the run's pool (inputs and start values fresh, from the evaluation seed), scored beside the
  baselines like any distribution shift: metrics.json has it under ``ood``.
- **baselines**: ``dmmse`` (discrete MMSE): the posterior mean with the pool as the prior, each pool rule's
  prediction weighted by its likelihood of the context so far. It is the Bayes predictor of the *training*
  distribution; the task's usual ``bayes`` (ridge for linreg) is the Bayes predictor of fresh rules. On the
  headline (fresh rules) ``bayes`` stays the task's usual one, so that "learned" keeps meaning "learned to
  learn in context", and ``dmmse`` is a baseline beside it (a model that tracks dMMSE there has memorised the
  pool). It is not scored on the other distribution shifts (a shift's pool would be drawn from its own
  options; and it costs K predictions per position). On ``pool_rules`` and on the training distribution (the held-out set and reference of
  ``train.until: flat``) ``bayes`` is dMMSE, the posterior mean of the distribution those sequences come
  from, and the task's own is kept as ``unbounded_bayes``. "bayes" thus always names the posterior mean of the
  sequences it is scored on.
- **normalizer**: always the fresh-rule prior's, so that errors on pool and on fresh rules share one scale
  (1.0: the fresh prior mean's error).

A task plugin opts in by putting :class:`RulePool` before its base class, adding ``pool: int = 0`` to its
options (checked by :func:`validate_pool`), and writing :meth:`RulePool.draw_rules`,
:meth:`RulePool.sample_with_rules` and :meth:`RulePool.pool_posterior_mean` (:func:`mixture` does the
weighting) instead of ``sample``. The pool is drawn with the options of the task that samples; the built-in
curricula change none of the options a rule is drawn from, so every curriculum stage trains on one pool.
"""

from __future__ import annotations

import hashlib

import torch

from .task import Batch, Task

#: mixed with the run seed into the pool's generator, so that the pool is not the first draws of the seed's
#: own data stream
POOL_SALT = "iclbench-pool"
#: name of the distribution shift that evaluates on the run's pool
POOL_VARIANT = "pool_rules"
#: without observation noise the likelihood is a point mass; dMMSE uses a Gaussian of this many times the
#: task's scale instead (float32 data fit their own rule to ~1e-7 relative, a different rule misses by ~1e-1)
NOISE_FLOOR = 1e-4
_POOLS: dict = {}


def pool_generator(seed: int) -> torch.Generator:
    """The CPU generator a run seed's pool is drawn from."""
    digest = hashlib.sha256(f"{POOL_SALT}:{int(seed)}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def validate_pool(pool) -> None:
    """Refuse a pool size that is not an integer >= 0."""
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 0:
        raise ValueError(f"pool must be an integer >= 0 (0: a fresh rule for every sequence), got {pool!r}")


def mixture(pred: torch.Tensor, loglik: torch.Tensor) -> torch.Tensor:
    """``sum_k softmax(loglik)_k pred_k``: ``pred [..., K, d]`` weighted by ``loglik [..., K]`` (a uniform
    prior over the K rules)."""
    weight = torch.softmax(loglik.double(), -1)
    return (weight[..., None] * pred.double()).sum(-2)


def _mark(fn, kind: str, doc: str):
    def bayes(batch):
        return fn(batch)

    bayes.bayes = kind
    bayes.__doc__ = doc
    return bayes


class RulePool:
    """Mixin giving a task the ``pool`` option (see the module's docstring): put it before the task's base
    class, and let it provide ``sample`` (a task that opts in writes :meth:`sample_with_rules` instead). The
    engine adds the ``dmmse`` baseline (:func:`pool_baselines`) and the ``pool_rules`` variant
    (:func:`pool_variants`), so that the task's own ``baselines`` and ``ood_variants`` need no change."""

    #: the seed whose pool this task uses (set by :func:`iclbench.build.build` to the run's seed; 0 when unset)
    run_seed: int | None = None
    #: made by ``with_options`` (a distribution shift, a curriculum stage): its pool would be drawn from its
    #: own options, not the run's, so it gets no ``dmmse`` and no ``pool_rules`` (dMMSE costs K evaluations of
    #: every prediction; it is scored on the headline and on ``pool_rules``)
    shifted: bool = False

    # --- what the task provides --------------------------------------------------------------------------
    def draw_rules(self, n: int, generator: torch.Generator, device) -> dict[str, torch.Tensor]:
        """``n`` rules from the task's prior: ``{latent: tensor [n, ...]}``."""
        raise NotImplementedError

    def sample_with_rules(self, rules: dict[str, torch.Tensor], generator: torch.Generator, device) -> Batch:
        """One sequence per rule (``rules[k] [n, ...]`` on ``device``), the rest (inputs, start values,
        noise) drawn from ``generator``. ``sample(n)`` is ``sample_with_rules(draw_rules(n))``."""
        raise NotImplementedError

    def pool_posterior_mean(self, rules: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """``[B, T, d_out]``: the posterior-mean prediction at each position when the rule is one of
        ``rules`` (``[K, ...]``, equally likely), from the context up to that position."""
        raise NotImplementedError

    # --- the mechanism -----------------------------------------------------------------------------------
    def sample(self, n, generator, device="cpu"):
        return self.sample_with_rules(self.draw_rules(n, generator, device), generator, device)

    @property
    def pool_size(self) -> int:
        return getattr(self.options, "pool", 0)

    @property
    def pool_seed(self) -> int:
        return 0 if self.run_seed is None else self.run_seed

    def pool(self, seed: int | None = None) -> dict[str, torch.Tensor]:
        """The K rules of ``seed``'s pool (the run's by default), on the CPU; cached."""
        seed = self.pool_seed if seed is None else seed
        key = (type(self).__qualname__, repr(self.options), seed)
        if key not in _POOLS:
            if len(_POOLS) > 64:
                _POOLS.clear()
            _POOLS[key] = {k: v.cpu() for k, v in self.draw_rules(self.pool_size, pool_generator(seed),
                                                                  "cpu").items()}
        return _POOLS[key]

    def training_task(self, seed: int):
        return PooledTask(self, seed) if self.pool_size else self

    def with_options(self, **changes):
        out = super().with_options(**changes)
        out.run_seed, out.registry, out.shifted = self.run_seed, self.registry, True
        return out

    def dmmse(self, batch: Batch, seed: int | None = None) -> torch.Tensor:
        """Posterior mean over ``seed``'s pool (the run's by default): Raventós et al.'s dMMSE."""
        rules = {k: v.to(batch.inputs.device) for k, v in self.pool(seed).items()}
        return self.pool_posterior_mean(rules, batch).to(batch.targets.dtype)

    def dmmse_baseline(self, seed: int | None = None):
        """dMMSE as a baseline, marked as an exact posterior mean (that of the pool prior)."""
        return _mark(lambda batch: self.dmmse(batch, seed), "exact",
                     f"Posterior mean over the run's pool of {self.pool_size} rules (dMMSE, Raventós et al.): "
                     f"each rule's prediction weighted by its likelihood of the context (without noise a "
                     f"Gaussian of {NOISE_FLOOR:g} x the task's scale)")


class PooledTask(Task):
    """A task with a pool, sampling every sequence's rule from ``seed``'s pool: what the seed trains on, and
    the ``pool_rules`` variant it is evaluated on. Everything else is the task's: its name, shapes,
    curriculum, linear view, normalizer (the fresh-rule prior's) and baselines, with ``bayes`` now dMMSE (the
    posterior mean of these sequences) and the task's own kept as ``unbounded_bayes``."""

    def __init__(self, base: RulePool, seed: int):
        super().__init__(base.options)
        self.base, self.run_seed, self.registry = base, seed, base.registry
        for attr in ("name", "description", "score_from", "rule_latents", "train_defaults"):
            setattr(self, attr, getattr(base, attr))

    @property
    def d_in(self):
        return self.base.d_in

    @property
    def d_out(self):
        return self.base.d_out

    @property
    def context_len(self):
        return self.base.context_len

    @property
    def pool_size(self) -> int:
        return self.base.pool_size

    def pool(self) -> dict[str, torch.Tensor]:
        return self.base.pool(self.run_seed)

    def sample(self, n, generator, device="cpu"):
        index = torch.randint(0, self.pool_size, (n,), generator=generator, device=device)
        rules = {k: v.to(device)[index] for k, v in self.pool().items()}
        return self.base.sample_with_rules(rules, generator, device)

    def baselines(self):
        out = dict(self.base.baselines())
        dmmse = self.base.dmmse_baseline(self.run_seed)
        if "bayes" in out:
            out["unbounded_bayes"] = out["bayes"]
        out["bayes"] = out["dmmse"] = dmmse
        return out

    def normalizer(self, device="cpu"):
        return self.base.normalizer(device)

    def rule_features(self, batch):
        return self.base.rule_features(batch)

    def curriculum(self, step, steps):
        return self.base.curriculum(step, steps)

    def training_task(self, seed):
        return self.base.training_task(seed)

    def with_options(self, **changes):
        return PooledTask(self.base.with_options(**changes), self.run_seed)

    def __repr__(self):
        return f"{self.base!r}[pool of seed {self.run_seed}]"


def pooled(task) -> bool:
    """The task has a pool of rules (``pool > 0``)."""
    return isinstance(task, RulePool) and task.pool_size > 0


def pool_baselines(task) -> dict:
    """What the pool adds to a task's baselines: ``dmmse`` (none for a task without a pool)."""
    return {"dmmse": task.dmmse_baseline()} if pooled(task) and not task.shifted else {}


def pool_variants(task) -> dict:
    """What the pool adds to a task's distribution shifts: ``pool_rules``, the run's pool."""
    return {POOL_VARIANT: task.training_task(task.pool_seed)} if pooled(task) and not task.shifted else {}
