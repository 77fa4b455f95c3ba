import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: small enough to train in seconds on 2 cores, big enough to learn affine clearly
TINY = ["model.d_model=32", "model.d_mlp=64", "eval.n_sequences=512", "eval.bootstrap=100"]


def cli(*args, env=None, cwd=None, timeout=300):
    """Run the installed console script the way a user would; returns CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "iclbench.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


@pytest.fixture
def tiny():
    return list(TINY)


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
