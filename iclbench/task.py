"""The task contract: what a task plugin provides and what every part of the engine may rely on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch


@dataclass
class Batch:
    """A batch of sequences.

    ``inputs[b, t]`` is what the model sees at position ``t``; ``targets[b, t]`` what it must predict there,
    using ``inputs[b, :t+1]`` only. ``mask[t]`` marks the positions that are scored. ``latents`` holds the
    sequence's hidden parameters (a, b, w, clean states, ...) for oracles and probes.
    """

    inputs: torch.Tensor  # [B, T, d_in]
    targets: torch.Tensor  # [B, T, d_out]
    mask: torch.Tensor  # [T] bool
    latents: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def to(self, device) -> "Batch":
        return Batch(self.inputs.to(device), self.targets.to(device), self.mask.to(device),
                     {k: v.to(device) for k, v in self.latents.items()})

    def slice(self, index) -> "Batch":
        return Batch(self.inputs[index], self.targets[index], self.mask,
                     {k: v[index] for k, v in self.latents.items()})


@dataclass(frozen=True)
class Baseline:
    """A classical predictor: ``fn(batch) -> predictions [B, T, d_out]`` using only the context up to each
    position (never ``targets`` at or after it). ``task`` names the task it applies to.

    A name starting with ``oracle`` reads the latents: a reference, not a competitor. The baseline named
    ``bayes`` is the posterior mean under the task's prior (the limit of in-context learning); its function
    carries ``fn.bayes``, one of :data:`BAYES_KINDS`, saying how exactly it is computed (see
    :func:`bayes_kind`)."""

    task: str
    name: str
    fn: Callable[[Batch], torch.Tensor]
    description: str = ""


#: how a ``bayes`` baseline is computed: closed form; a grid over low-dimensional parameters; the best
#: predictor linear in the observations (GP with the prior's covariance: its error bounds Bayes' from above);
#: prior draws weighted by the likelihood
BAYES_KINDS = ("exact", "quadrature", "best-linear", "importance-sampled")


def bayes_kind(fn) -> str | None:
    """The kind of a Bayes baseline (``fn.bayes``), or None for any other predictor."""
    kind = getattr(fn, "bayes", None)
    return kind if kind in BAYES_KINDS else None


@dataclass
class NoOptions:
    pass


class Task:
    """Base class of a task plugin.

    Subclasses set ``name``, ``description``, an ``Options`` dataclass, and implement :meth:`sample`,
    :meth:`baselines` and the ``d_in``/``d_out``/``context_len`` properties. ``normalizer`` defaults to a
    Monte-Carlo estimate of the prior-mean error; override it where a closed form exists.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: first position that enters the headline summary (earlier ones are shown but not averaged)
    score_from: ClassVar[int] = 0
    #: training options this task needs to be learned in a default run (e.g. ``{"steps": 6000}``); applied
    #: before the config file, ``--steps`` and ``--set``, so users still override them
    train_defaults: ClassVar[dict] = {}
    #: the latents that *are* the sequence's rule (a, b; w; A, b; ...), which the linear probe reads back
    #: from the residual stream. Per-example quantities (answers, clean states) are not rule latents: their
    #: R² only says the model sees its own inputs. ``None`` (a plugin that does not say): every ``[B]`` or
    #: ``[B, k]`` latent that is not per position; ``()``: the task has no identifiable rule to probe.
    rule_latents: ClassVar[tuple[str, ...] | None] = None
    #: the registry this task was built from (set by :func:`iclbench.build.build`), whose baselines for it
    #: are the run's, the probes' included; None: the process-wide registry
    registry = None
    #: the run's seed (set by :func:`iclbench.build.build`), for a task whose distributions depend on it (a
    #: pool of rules drawn per training seed, :mod:`iclbench.pool`); None: built outside a run
    run_seed: int | None = None

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()
        self._normalizer_cache: dict[str, torch.Tensor] = {}

    # --- shape -----------------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        raise NotImplementedError

    @property
    def d_out(self) -> int:
        raise NotImplementedError

    @property
    def context_len(self) -> int:
        """Number of positions T in one sequence."""
        raise NotImplementedError

    # --- data ------------------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Batch:
        """Draw ``n`` fresh sequences on ``device`` using only ``generator`` for randomness."""
        raise NotImplementedError

    def baselines(self) -> dict[str, Callable[[Batch], torch.Tensor]]:
        """Classical predictors by name; see :class:`Baseline` for the no-peeking contract."""
        return {}

    def rule_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The task seen as in-context linear regression, for probes that compare a layer with gradient
        descent on the context (Akyürek et al. 2022, von Oswald et al. 2023): ``(phi [B, T, k], examples [T]
        bool)`` such that the rule maps ``phi[:, t]`` to ``targets[:, t]`` (exactly, or as its best linear
        description), and at position ``t`` the examples ``s < t`` with ``examples[s]`` are known. ``None`` (the default): no
        linear view; such probes then compare with the task's baselines only."""
        return None

    def curriculum(self, step: int, steps: int) -> dict:
        """Option changes in force at training step ``step`` of ``steps``, for a task that is learned more
        easily by growing its context length or dimension during training (Garg et al.). The trainer samples
        from ``self.with_options(**changes)``; evaluation always uses the task as configured. ``{}`` (the
        default): train on the task as configured throughout."""
        return {}

    def training_task(self, seed: int) -> "Task":
        """The task training seed ``seed`` samples its batches from: the task itself (the default), or, for a
        task trained on a finite pool of rules (:mod:`iclbench.pool`), the same task drawing its rules from
        that seed's pool. Evaluation always uses the task itself."""
        return self

    def ood_variants(self) -> dict[str, "Task"]:
        """Named distribution shifts, evaluated on the trained model after the main evaluation: parameters
        outside the training range, scaled inputs, added noise, longer contexts (none by default). A
        variant is the same task with other options, so it keeps its name, baselines and normalizer."""
        return {}

    def normalizer(self, device="cpu") -> torch.Tensor:
        """Per-position squared error ``[T]`` of predicting the prior mean, so that 1.0 means
        'learned nothing' on every task. Estimated once from 2**17 sequences with a fixed seed."""
        key = str(device)
        if key not in self._normalizer_cache:
            gen = torch.Generator("cpu").manual_seed(0x1C1B)
            targets = torch.cat([self.sample(1 << 14, gen, "cpu").targets.double() for _ in range(8)])
            var = targets.var(dim=0, unbiased=True).mean(dim=-1)
            self._normalizer_cache[key] = var.clamp_min(1e-12).float().to(device)
        return self._normalizer_cache[key]

    def with_options(self, **changes) -> "Task":
        return type(self)(dataclasses.replace(self.options, **changes))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


def uniform(shape, low: float, high: float, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def on_host(fn: Callable, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(*tensors)`` computed on the CPU, the result returned on the inputs' device.

    Tasks' baselines and the probes solve batches of k×k systems with k of a few units, one per sequence and
    prefix. On CUDA they go to cuSOLVER's batched routines, and ``pinv(hermitian=True)`` (batched eigh) fails
    with CUSOLVER_STATUS_INTERNAL_ERROR past about 32k matrices (an evaluation batch of 4096 affine sequences
    holds 65,536).
    Matrices this small gain nothing from a GPU, so they are always solved where CI tests them. Used by the
    built-in tasks' least-squares and Bayes baselines and by the probes' ridge fits; plugins may call it too."""
    device = tensors[0].device
    if device.type == "cpu":
        return fn(*tensors)
    return fn(*(t.cpu() for t in tensors)).to(device)

