"""The built-in probes, registered through the ``iclbench_probes`` hook exactly as a third party's would be
(entry point ``probes = "iclbench.probes.builtin"`` in pyproject.toml), with the command the specialization
probe adds (``iclbench specialization``)."""

from iclbench import hookimpl

from .ablation import Ablation
from .attention import AttentionStats
from .attribution import DirectAttribution
from .circuit import Circuit
from .ladder import AlgorithmLadder
from .lens import LayerLens
from .linear_probe import LinearProbes
from .patching import ActivationPatching
from .similarity import SimilarityHeads
from .specialization_view import Specialization, iclbench_add_commands  # noqa: F401 (a hookimpl)


@hookimpl
def iclbench_probes():
    return [LayerLens, AlgorithmLadder, Ablation, DirectAttribution, AttentionStats, SimilarityHeads, LinearProbes,
            ActivationPatching, Specialization, Circuit]
