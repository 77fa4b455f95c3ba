"""Option schemas: each task, model and the trainer declares a dataclass whose defaults are its defaults;
the engine's own (:class:`TrainOptions`, :class:`EvalOptions`) live here.

Overrides arrive as YAML scalars or ``--set key=value`` strings; they are checked against the dataclass
field names and coerced to the default's type so that an unknown key or a wrong type fails with one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import ICLBenchError, did_you_mean


def parse_scalar(text: str) -> Any:
    """Parse a ``--set`` value the way YAML would (``0.1`` → float, ``true`` → bool, ``[1, 2]`` → list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(value: Any, default: Any, where: str) -> Any:
    """Coerce ``value`` to the type of ``default``; raise a one-line error naming ``where`` otherwise."""
    if default is None or isinstance(default, (list, dict, tuple)):
        return value
    kind = type(default)
    if isinstance(value, str) and kind in (int, float):
        try:  # YAML 1.1 reads '1e6' as a string
            value = float(value)
        except ValueError:
            pass
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ICLBenchError(f"{where}: expected {kind.__name__}, got {value!r}")


#: the largest value an integer option of these names may take, whichever task or model declares it (and the
#: engine's train and eval options): the sizes that drive memory or time, refused before anything is
#: allocated or trained (a model of 100000 layers took minutes just to be built, 10^10 bootstrap resamples
#: failed only after training). Generous: far above anything that trains on one machine.
SIZE_LIMITS = {
    "n_layers": 256, "n_heads": 1024, "d_model": 65536, "d_mlp": 262144, "d_head": 65536,
    "n_ctx": 65536, "context_len": 65536,
    "steps": 10 ** 9, "max_steps": 10 ** 9, "batch_size": 10 ** 6, "heldout": 10 ** 6,
    "n_sequences": 10 ** 7, "bootstrap": 100000,
}


def check_limits(options, where: str) -> None:
    """One line naming the first integer option of ``options`` above its :data:`SIZE_LIMITS` bound."""
    for f in dataclasses.fields(options):
        value, limit = getattr(options, f.name), SIZE_LIMITS.get(f.name)
        if limit is not None and isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise ICLBenchError(f"{where}.{f.name}={value} is too large: at most {limit:,} (iclbench's bound on "
                                f"{f.name}, which drives memory and time)")


def build_options(cls, overrides: dict[str, Any], where: str):
    """Instantiate the dataclass ``cls`` with ``overrides`` validated against its fields (and, for sizes,
    against :data:`SIZE_LIMITS`)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    values = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ICLBenchError(f"unknown key '{where}.{key}'" + did_you_mean(key, fields))
        values[key] = coerce(value, getattr(defaults, key), f"{where}.{key}")
    try:
        options = dataclasses.replace(defaults, **values)
        check = getattr(options, "validate", None)
        if check is not None:
            check()
    except (ValueError, TypeError) as exc:
        raise ICLBenchError(f"{where}: {exc}") from None
    check_limits(options, where)
    return options


def describe_options(cls) -> dict[str, Any]:
    return dataclasses.asdict(cls())


#: seeds go to torch generators as signed 64-bit integers
MAX_SEED = 2 ** 63


@dataclass
class TrainOptions:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 200
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    #: fp32, or bf16 (autocast); "auto", its former default, is read as fp32
    precision: str = "fp32"
    log_every: int = 100
    checkpoint_every: int = 500  # save the whole training state every N steps (0: never), for --resume
    compile: bool = False  # torch.compile the model for training (--compile)
    #: positions the loss averages: "all" scored positions, or only those from the task's ``score_from`` on
    #: ("scored"), which leaves the first positions untrained
    loss_positions: str = "all"
    #: when training stops: after ``steps`` ("steps"), or when the held-out error is flat ("flat"): scored
    #: every ``eval_every`` steps on ``heldout`` fixed sequences, flat once the mean over the last
    #: ``flat_window`` scorings has improved on the ``flat_window`` before them by less than ``flat_tol`` of the
    #: reducible error (by its 95 % interval); then the learning rate cools down for ``cooldown`` of the steps
    #: so far, and training stops. ``max_steps`` caps it (the cooldown then ends at the cap). ``flat_stat``:
    #: each sequence's error over a window as its "mean" over the window's scorings, or its "median" (one
    #: outlying scoring, a spike at the full learning rate, then cannot make a falling curve look flat). See
    #: :func:`iclbench.trainer.flat_check` and :class:`iclbench.trainer.Schedule`.
    until: str = "steps"
    max_steps: int = 30000
    eval_every: int = 200
    heldout: int = 1024
    flat_window: int = 4
    flat_tol: float = 0.05
    flat_stat: str = "mean"
    cooldown: float = 0.2

    @property
    def cap(self) -> int:
        """The most steps a run can take: ``steps``, or ``max_steps`` when training until flat."""
        return self.max_steps if self.until == "flat" else self.steps

    def validate(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be > 0, got {self.steps}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup, grad_clip and weight_decay must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.precision == "auto":
            self.precision = "fp32"
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.log_every <= 0:
            raise ValueError(f"log_every must be > 0, got {self.log_every}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.loss_positions not in ("all", "scored"):
            raise ValueError(f"loss_positions must be all or scored, got {self.loss_positions!r}")
        if self.until not in ("steps", "flat"):
            raise ValueError(f"until must be steps or flat, got {self.until!r}")
        if self.max_steps <= 0 or self.eval_every <= 0 or self.flat_window <= 0:
            raise ValueError("max_steps, eval_every and flat_window must be > 0")
        if self.heldout < 2:
            raise ValueError(f"heldout must be >= 2 sequences, got {self.heldout}")
        if not self.flat_tol > 0:
            raise ValueError(f"flat_tol must be > 0, got {self.flat_tol}")
        if self.flat_stat not in ("mean", "median"):
            raise ValueError(f"flat_stat must be mean or median, got {self.flat_stat!r}")
        if not 0 <= self.cooldown < 1:
            raise ValueError(f"cooldown must be in [0, 1), got {self.cooldown}")


@dataclass
class EvalOptions:
    n_sequences: int = 4096
    seed: int = 20240601  # the evaluation set depends on this only, not on the run's seed
    bootstrap: int = 1000
    confidence: float = 0.95
    score_from: int = -1  # first position in the summary mean; -1: the task's default
    ood: bool = True  # also evaluate the task's distribution shifts (metrics['ood'])
    probes: bool = True  # run the registered probes after evaluation (probes.json, probes/*.csv)

    def validate(self):
        if self.n_sequences < 2:
            raise ValueError(f"n_sequences must be >= 2, got {self.n_sequences}")
        if self.bootstrap < 1:
            raise ValueError(f"bootstrap must be >= 1, got {self.bootstrap}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not 0 <= self.seed < MAX_SEED - 1:  # probes draw from seed + 1
            raise ValueError(f"seed must be in [0, 2^63 - 1), got {self.seed}")
