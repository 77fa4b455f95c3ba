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


class Probe:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def applies_to(self, task: Task, model: Model) -> bool:
        """Whether this probe can run on ``model`` trained on ``task`` (e.g. needs attention heads)."""
        return True

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
