"""The engine names no concrete probe: the report, the command line and the loggers get what they show of a
probe from the probe itself (its presentation methods and the ``iclbench_add_commands`` hook)."""

from conftest import ROOT
from iclbench.registry import build_registry


def test_no_engine_file_names_a_built_in_probe():
    probes = build_registry(autoload=False).probes
    assert "specialization" in probes  # the built-ins are registered, so the check below means something
    engine = sorted((ROOT / "iclbench").glob("*.py")) + sorted((ROOT / "iclbench" / "loggers").glob("*.py"))
    texts = {path.relative_to(ROOT): path.read_text() for path in engine}
    named = [(path, name) for path, text in texts.items() for name in probes
             if f'"{name}"' in text or f"'{name}'" in text]  # e.g. outcomes.get("specialization")
    named += [(path, "claim_") for path, text in texts.items() if "claim_" in text]  # a probe's summary keys
    assert named == [], f"engine files name built-in probes: {named}"
