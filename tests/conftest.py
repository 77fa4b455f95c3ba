import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the one tiny run the tests start from: small enough to train in seconds on 2 cores, big enough to learn
#: affine clearly (model sizes apply to the built-in GPTs)
TINY_RUN = {"model.d_model": 32, "model.d_mlp": 64, "eval.n_sequences": 512, "eval.bootstrap": 100}
#: what a test that needs only a run's files, not a learned model, changes: the cheapest run that still writes
#: every file kind (a small model and evaluation set, no OOD shifts, no probes)
CHEAP = {"model.d_model": 16, "model.d_mlp": 32, "eval.n_sequences": 64, "eval.bootstrap": 10, "eval.ood": False,
         "eval.probes": False}


def tiny_run(cheap: bool = False, sizes: bool = True, **changes) -> dict:
    """The tiny run's overrides (``{"section.key": value}``): :data:`TINY_RUN`, with ``cheap`` :data:`CHEAP` on
    top, without the model sizes where ``sizes`` is false (a model that has no ``d_model``), then what the
    test needs, written ``eval__ood=False`` for ``eval.ood``."""
    out = {**TINY_RUN, **(CHEAP if cheap else {}), **{k.replace("__", "."): v for k, v in changes.items()}}
    return {k: v for k, v in out.items() if sizes or k not in ("model.d_model", "model.d_mlp")}


def overrides(run: dict) -> list[str]:
    """``{"eval.ood": False}`` -> ``["eval.ood=false"]`` (``--set`` items)."""
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in run.items()]


def sets(run: dict) -> list[str]:
    """``{"eval.ood": False}`` -> ``["--set", "eval.ood=false"]`` (command-line arguments)."""
    return [a for item in overrides(run) for a in ("--set", item)]


TINY = overrides(tiny_run())


def cli(*args, env=None, cwd=None, timeout=300):
    """Run the installed console script the way a user would; returns CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "iclbench.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def pytest_collection_modifyitems(items):
    """A test that pip-installs the example plugins (the ``installed_plugins`` fixture) is ``slow``, like the
    Ray, Chromium, kill -9 and Hugging Face tests marked where they are defined."""
    for item in items:
        if "installed_plugins" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


PLUGINS = ROOT / "tests" / "plugins"
#: the example plugin packages the README and docs/plugins.md show, installed together once per session
EXAMPLE_PACKAGES = ("iclbench-sine", "iclbench-examples")


@pytest.fixture(scope="session")
def installed_plugins(tmp_path_factory):
    """pip-install the example third-party packages into one directory (no network, no deps, one pip call);
    returns the environment that puts them on the path."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), *(str(PLUGINS / p) for p in EXAMPLE_PACKAGES)],
                   check=True, cwd=build, capture_output=True)
    return {"PYTHONPATH": str(target)}

# The models' CPU GEMM path (iclbench.gemm): MKL, torch's default, for the whole suite, so numbers do not depend
# on a timing made on the test machine (tests/test_lifecycle.py compares with a reference recorded on MKL) and
# no test writes the user's cache directory; tests/test_gemm.py sets the other paths itself.
os.environ.setdefault("ICLBENCH_GEMM", "mkl")


@pytest.fixture
def seed_1_diverges_at_step_7(monkeypatch):
    """Of three stacked seeds, seed 1's loss turns NaN at the 7th step (the others' stay as they are)."""
    import torch

    from iclbench import stacked

    real, calls = stacked.StackedSeeds.step, {"n": 0}

    def poisoned(self, *args, **kwargs):
        losses = real(self, *args, **kwargs)
        calls["n"] += 1
        return torch.where(torch.arange(3) == 1, float("nan"), losses) if calls["n"] == 7 else losses

    monkeypatch.setattr(stacked.StackedSeeds, "step", poisoned)


def read_pty(master: int, expected: str, timeout: float = 10.0) -> str:
    """What was written to a pty's other end, read until ``expected`` is in it or ``timeout`` passes: the
    kernel hands pty output to the reader asynchronously, so one read after a flush may see only part of it
    (a loaded machine showed it)."""
    import select
    import time

    seen, deadline = b"", time.monotonic() + timeout
    while expected not in seen.decode(errors="replace") and time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            seen += os.read(master, 65536)
    return seen.decode(errors="replace")
