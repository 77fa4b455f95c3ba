"""Discovery through entry points, exactly as a user installs a plugin."""

import re
import types
from pathlib import Path

import pytest

from conftest import ROOT, TINY, cli
from iclbench import hookimpl
from iclbench.errors import ICLBenchError
from iclbench.registry import build_registry
from iclbench.tasks.affine import AffineTask

EXAMPLE = ROOT / "tests" / "plugins" / "iclbench-sine"


@pytest.fixture(scope="module")
def installed_example(installed_plugins):
    """The example packages (the sine task among them), pip-installed once per session (conftest)."""
    return installed_plugins


@pytest.mark.slow
def test_installed_plugin_is_listed_and_runs(installed_example, tmp_path):
    listed = cli("list", "tasks", env=installed_example)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^sine\s+continue a sinusoid.*\biclbench_sine$|^sine\s+.*sine$", listed.stdout, re.M), \
        listed.stdout
    assert re.search(r"^affine\s", listed.stdout, re.M)
    sets = [a for s in TINY for a in ("--set", s)]
    done = cli("run", "--task", "sine", "--model", "gpt3l", "--steps", "30", "--out", str(tmp_path), "--quiet",
               *sets, env=installed_example)
    assert done.returncode == 0, done.stderr
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    assert (run_dir / "metrics.json").exists() and run_dir.name.startswith("sine-gpt3l-")
    board = cli("leaderboard", "--results", str(tmp_path), env=installed_example)
    assert "sine" in board.stdout and "baseline: copy_last" in board.stdout


@pytest.mark.slow
def test_autoload_can_be_disabled_but_builtins_stay(installed_example):
    out = cli("list", "tasks", env={**installed_example, "ICLBENCH_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert out.returncode == 0
    assert "affine" in out.stdout and "sine" not in out.stdout


@pytest.mark.slow
def test_broken_plugin_is_reported_and_the_rest_work(tmp_path):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[iclbench]\nbroken = broken_mod\n")
    (tmp_path / "broken_mod.py").write_text("raise ImportError('needs a library that is not installed')\n")
    out = cli("list", env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0
    assert "plugin 'broken' (broken_mod, from broken-plugin) failed to load: ImportError: needs a library" \
        in out.stderr
    assert "affine" in out.stdout and "gpt3l" in out.stdout
    unknown = cli("run", "--task", "brokentask", "--model", "gpt3l", env={"PYTHONPATH": str(tmp_path)})
    assert unknown.returncode == 2 and "plugins that failed to load: broken" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_a_name_two_plugins_claim_is_disabled_alone():
    class Impostor(AffineTask):
        pass

    impostor = types.ModuleType("impostor_plugin")
    impostor.iclbench_tasks = hookimpl(lambda: [Impostor])
    reg = build_registry(extra_plugins=[impostor])
    with pytest.raises(ICLBenchError, match=r"task name 'affine' is claimed by two plugins: 'affine' and "
                                            r"'impostor_plugin'"):
        reg.task("affine")
    assert "gpt3l" in reg.models and "linreg" in reg.tasks  # every other name still works
    assert "task:affine" in reg.clashes


def test_readme_example_is_the_tested_plugin():
    readme = (ROOT / "README.md").read_text()
    for path in (EXAMPLE / "iclbench_sine.py", EXAMPLE / "pyproject.toml"):
        assert path.read_text().strip() in readme, f"README's plugin example differs from {path}"
