"""iclbench: a plugin-based benchmark suite for in-context learning.

Public API: :func:`run` trains and evaluates one task × model, :func:`load` opens a finished run;
:class:`Task`, :class:`Model`, :class:`Probe`, :class:`Baseline` and :data:`hookimpl` are what plugins build on.
"""

from importlib import metadata as _metadata

from .hookspecs import hookimpl
from .model import HookPoint, Model
from .probe import Probe, ProbeFigure, ProbeResult
from .task import Baseline, Batch, Task

try:
    __version__ = _metadata.version("iclbench")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0+unknown"


def run(*args, **kwargs):
    """Train, evaluate and record one run; returns a :class:`~iclbench.runner.RunResult`; see
    :func:`iclbench.runner.run`."""
    from .runner import run as _run

    return _run(*args, **kwargs)


def load(run_dir, *, device: str = "cpu", registry=None):
    """Open a finished run (or an exported model, ``iclbench export``) without training: a
    :class:`~iclbench.runner.RunResult` with its ``config``, ``task``, ``model`` (trained weights, eval mode),
    ``metrics`` and ``probes`` (an export: ``manifest``); see :func:`iclbench.runner.load`."""
    from .runner import load as _load

    return _load(run_dir, device=device, registry=registry)


__all__ = ["Baseline", "Batch", "HookPoint", "Model", "Probe", "ProbeFigure", "ProbeResult", "Task", "hookimpl",
           "load", "run", "__version__"]
