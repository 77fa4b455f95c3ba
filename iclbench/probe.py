"""The probe contract: read a trained model on a task through its hook points; never train it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import pandas as pd

from .model import Model
from .task import Task


@dataclass
class ProbeResult:
    """A tidy table (one row per layer/head/position/... measurement) and a small JSON-able summary."""

    table: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


class ProbeFigure(NamedTuple):
    """One figure of a probe's result: ``name`` (the PNG is ``figures/<run directory>-<name>.png``), a
    matplotlib figure and its caption."""

    name: str
    figure: Any
    caption: str


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

    # --- presentation: what the report, the terminal and experiment trackers show of a stored result ------
    # Each reads what a run stored (the table of probes/<name>.csv and the summary of probes.json), never the
    # model; ``run`` is the run's metrics.json (``task``, ``model``, ``seed``, ``curves["score_from"]``, ...).
    # The engine calls them for every registered probe and names none (iclbench/report.py, loggers/).

    @classmethod
    def figures(cls, table: pd.DataFrame, summary: dict, run: dict) -> list[ProbeFigure]:
        """The figures of one run's result (default: none)."""
        return []

    @classmethod
    def report_section(cls, doc, table: pd.DataFrame, summary: dict, run: dict) -> None:
        """This probe's part of a run's section in ``iclbench report``: ``doc`` is an
        :class:`iclbench.report.Document` (``heading``, ``text``, ``table``, ``figure``). By default a heading
        with the probe's name and description, then its :meth:`figures`; nothing when it has no figures."""
        figures = cls.figures(table, summary, run)
        if figures:
            doc.heading(f"{cls.name}: {cls.description}" if cls.description else cls.name, level=3)
            for name, figure, caption in figures:
                doc.figure(figure, name, caption)

    @classmethod
    def cross_run_table(cls, runs: pd.DataFrame) -> pd.DataFrame | None:
        """Combine this probe's summaries over many runs into one table, or ``None`` if it has no such
        table. ``runs`` has one row per run: ``run``, ``task``, ``model``, ``seed``, ``summary`` (a dict),
        ``learned``, ``excess_bayes``, ``evidence`` (whether the run learned its task well enough to count,
        :func:`iclbench.evaluate.is_evidence`) and ``error`` (the run's headline error, the leaderboard's number;
        :func:`iclbench.probing.collect_probe`). A table with ``task`` and ``model`` columns gets those cells
        linked to the runs' sections in the report."""
        return None

    @classmethod
    def cross_run_section(cls, doc, table: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
        """The report's section on :meth:`cross_run_table` (``table``, computed from ``runs``); returns lines
        for the summary at the top of the report. By default a heading, the description and the table."""
        doc.heading(f"{cls.name} across runs")
        if cls.description:
            doc.text(cls.description)
        doc.table(table)
        return []

    @classmethod
    def tracker_summary(cls, summary: dict) -> dict[str, float | str]:
        """What an experiment tracker (MLflow, TensorBoard) records of one run's summary: numbers as metrics,
        strings as tags / a text panel; each key is shown as ``<probe name>.<key>``. Default: nothing."""
        return {}

    @classmethod
    def terminal_lines(cls, summary: dict) -> list[str]:
        """Lines ``iclbench probe`` prints after the probes' timings (default: none)."""
        return []


def has_cross_run_table(cls: type[Probe]) -> bool:
    """Whether ``cls`` overrides :meth:`Probe.cross_run_table` (so reading every run for it is worth it)."""
    return getattr(cls.cross_run_table, "__func__", None) is not Probe.cross_run_table.__func__


def _has_path(obj, path: str) -> bool:
    """``blocks.0.attn.out`` resolved through attributes and integer indices (ModuleList)."""
    for part in path.split("."):
        try:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            return False
    return True
