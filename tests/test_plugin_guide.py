"""docs/plugins.md: every example in the guide is a file of an installed package, and each one works."""

import json
import os
import re
from pathlib import Path

import pytest

from conftest import EXAMPLE_PACKAGES, PLUGINS, ROOT, cli, sets, tiny_run

GUIDE = ROOT / "docs" / "plugins.md"
SMALL = ["--steps", "20", "--quiet", *sets(tiny_run(cheap=True, sizes=False, eval__n_sequences=256,
                                                   eval__bootstrap=20))]


@pytest.mark.parametrize("path", [p for pkg in EXAMPLE_PACKAGES for p in sorted((PLUGINS / pkg).glob("*"))
                                  if p.suffix in (".py", ".toml")], ids=lambda p: p.name)
def test_guide_shows_each_example_file_as_tested(path):
    assert path.read_text().strip() in GUIDE.read_text(), f"docs/plugins.md differs from {path}"


def test_readme_links_the_guide():
    assert "docs/plugins.md" in (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_every_example_passes_iclbench_check(installed_plugins):
    out = cli("check", "sine", "window_mlp", "extrapolate", "resid_norm", "jsonl_log", env=installed_plugins)
    assert out.returncode == 0, out.stdout + out.stderr
    for line in ("ok task 'sine'", "ok model 'window_mlp'", "ok baselines of task 'sine'", "ok probe 'resid_norm'",
                 "ok plugin 'jsonl_log'"):
        assert line in out.stdout


@pytest.mark.slow
def test_examples_run_together(installed_plugins, tmp_path):
    """The task, model, baseline and logger in one run; then the probe on it, and a probe that does not
    apply says which hook points are missing."""
    done = cli("run", "--task", "sine", "--model", "window_mlp", "--out", str(tmp_path), *SMALL, env=installed_plugins)
    assert done.returncode == 0, done.stderr
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "extrapolate" in metrics["summary"] and metrics["summary"]["extrapolate"]["mean"] < 0.5
    assert metrics["extra"]["jsonl_log"]["events"].endswith("events.jsonl")
    plugins = metrics["provenance"]["plugins"]
    assert plugins["window_mlp"]["distribution"] == "iclbench-examples" and plugins["window_mlp"]["version"] == "0.1.0"
    assert re.fullmatch(r"[0-9a-f]{12}", plugins["window_mlp"]["source_sha256"])
    events = [json.loads(l)["event"] for l in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[0] == "started" and events[-1] == "finished" and "train" in events
    probed = cli("probe", str(run_dir), "--probe", "resid_norm", env=installed_plugins)
    assert probed.returncode == 0, probed.stderr
    summary = json.loads((run_dir / "probes.json").read_text())["probes"]["resid_norm"]["summary"]
    assert len(summary["rms_by_layer"]) == 2
    refused = cli("probe", str(run_dir), "--probe", "attention", env=installed_plugins)
    assert refused.returncode == 2
    assert "has no hook point blocks.0.attn.hook_pattern" in refused.stderr and "n_heads = 0" in refused.stderr


@pytest.mark.slow
def test_a_third_party_probe_presents_itself(installed_plugins, tmp_path):
    """The example probe's figure and section in the report, its numbers for a tracker and its command:
    the engine names no probe, so a third party's gets what the built-in ones get."""
    import subprocess
    import sys

    import matplotlib.image as mpimg

    done = cli("run", "--task", "sine", "--model", "window_mlp", "--out", str(tmp_path / "results"), *SMALL,
               env=installed_plugins)
    assert done.returncode == 0, done.stderr
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    assert cli("probe", str(run_dir), "--probe", "resid_norm", env=installed_plugins).returncode == 0
    rms = json.loads((run_dir / "probes.json").read_text())["probes"]["resid_norm"]["summary"]["rms_by_layer"]

    report = cli("report", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "report"),
                 env=installed_plugins)
    assert report.returncode == 0, report.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert "### resid_norm: RMS of the residual stream after each layer, per position" in md
    assert "## resid_norm across runs" in md and f" {rms[-1]:.4f} |" in md  # the cross-run table
    figure = tmp_path / "report" / "figures" / f"{run_dir.name}-resid_norm.png"
    assert f"(figures/{figure.name})" in md and float(mpimg.imread(figure)[..., :3].std()) > 0.05

    tracked = subprocess.run([sys.executable, "-c", "import json, sys; from iclbench.loggers.common import "
                              "probe_scalars; print(json.dumps(probe_scalars(sys.argv[1])))", str(run_dir)],
                             capture_output=True, text=True, env={**os.environ, **installed_plugins})
    assert json.loads(tracked.stdout) == {"probe/resid_norm.last_layer_rms": rms[-1]}, tracked.stderr

    command = cli("resid-norm", "--results", str(tmp_path / "results"), env=installed_plugins)
    assert command.returncode == 0 and str(rms[-1]) in command.stdout, command.stderr
    assert "resid-norm" in cli("--help", env=installed_plugins).stdout
    assert "resid-norm" not in cli("--help").stdout  # the command comes with the plugin
