"""The probe contract: read a trained model on a task through its hook points; never train it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd

from .model import Model
from .task import Task


@dataclass
class ProbeResult:
    """A tidy table (one row per layer/head/position/... measurement) and a small JSON-able summary."""

    table: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


#: what :meth:`Model` read-out accessor a probe may need, and the attributes its default implementation reads
ACCESSORS = {"readout": ("ln_final", "unembed"), "direct_readout": ("ln_final", "unembed"),
             "head_write_weights": ("blocks.{layer}.attn.out",)}


class Probe:
    """Base class of a probe plugin: reads a trained model on a task through its hook points and returns a
    :class:`ProbeResult`; never trains the model it inspects.

    Subclasses set ``name``, ``description``, implement :meth:`run`, and declare what they need from a
    model in ``requires_hooks`` / ``requires_attributes`` so that a model lacking it is skipped with the
    reason ("model 'lstm' has no hook point blocks.0.hook_resid_pre") rather than failing mid-run.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: hook points the probe reads; ``{layer}`` is expanded over ``range(model.n_layers)``
    requires_hooks: ClassVar[tuple[str, ...]] = ()
    #: model attributes or read-out accessors (``readout``, ``direct_readout``, ``head_write_weights``: met by
    #: overriding the accessor, or by the attributes its default reads: ``ln_final`` and ``unembed``;
    #: ``blocks.{layer}.attn.out``); ``n_heads`` means "at least one attention head"
    requires_attributes: ClassVar[tuple[str, ...]] = ()

    def missing(self, task: Task, model: Model) -> list[str]:
        """What ``model`` lacks of ``requires_hooks`` / ``requires_attributes`` (empty: nothing)."""
        layers = range(max(1, int(getattr(model, "n_layers", 0) or 0)))
        expand = lambda names: list(dict.fromkeys(n.format(layer=l) for n in names for l in layers))  # noqa: E731
        points = model.hook_points() if hasattr(model, "hook_points") else {}
        out = [f"hook point {n}" for n in expand(self.requires_hooks) if n not in points]
        for attr in self.requires_attributes:
            if attr == "n_heads":
                if not getattr(model, "n_heads", 0):
                    out.append("attention heads (n_heads = 0)")
            elif attr in ACCESSORS:
                if getattr(type(model), attr, None) is getattr(Model, attr):  # not overridden
                    out += [f"attribute {a} (for Model.{attr}; or override {attr})"
                            for a in expand(ACCESSORS[attr]) if not _has_path(model, a)]
            elif not _has_path(model, attr):
                out.append(f"attribute {attr}")
        return out

    def applies_to(self, task: Task, model: Model) -> bool:
        """Whether this probe can run on ``model`` trained on ``task``; by default: nothing in
        :meth:`missing`. Override for other conditions and say why in :meth:`why_not`."""
        return not self.missing(task, model)

    def why_not(self, task: Task, model: Model) -> str | None:
        """``None`` if the probe applies, else why not (shown as "skipped: ..." in the run's probes)."""
        lacks = self.missing(task, model)
        if lacks:
            return f"model '{model.name}' has no " + ", no ".join(lacks)
        if not self.applies_to(task, model):
            return (f"{type(self).__name__}.applies_to returned False for model '{model.name}' on task "
                    f"'{task.name}' (it gives no reason)")
        return None

    #: sequences a probe draws by default (class attribute, so a user can change it before running)
    n_sequences: ClassVar[int] = 512

    def run(self, model: Model, task: Task, generator, device) -> ProbeResult:
        """Measure ``model`` on fresh sequences of ``task`` drawn with ``generator``; ``device`` is where the
        model lives."""
        raise NotImplementedError

    @classmethod
    def cross_run_table(cls, runs: pd.DataFrame) -> pd.DataFrame | None:
        """Combine this probe's summaries over many runs into one table, or ``None`` if it has no such
        table. ``runs`` has one row per run: ``run``, ``task``, ``model``, ``seed``, ``summary`` (a dict)."""
        return None


def _has_path(obj, path: str) -> bool:
    """``blocks.0.attn.out`` resolved through attributes and integer indices (ModuleList)."""
    for part in path.split("."):
        try:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            return False
    return True
