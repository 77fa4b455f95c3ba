"""The second hostile battery (issue 25): nothing written outside a results directory, nothing that hangs, no
internal error on a hostile input. Each test reproduces a case of benchmarks/hostile.py and fails without its
fix; each takes a few seconds at most."""

import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import cli
from iclbench import store
from iclbench.errors import ICLBenchError
from iclbench.report import Document
from iclbench.rundir import RunDir


def one_line_refusal(proc, *words):
    """A non-zero exit with one line on stderr (no traceback) holding each of ``words``."""
    err = proc.stderr.strip()
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


# --- nothing written through a symlinked folder --------------------------------------------------------------

def test_symlinked_probes_folder_is_replaced_never_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    run_dir = tmp_path / "results" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "probes").symlink_to(outside, target_is_directory=True)
    RunDir(run_dir).save_probes({"p": {"summary": {"x": 1.0}, "table": pd.DataFrame({"a": [1, 2]})}})
    assert list(outside.iterdir()) == []
    assert not (run_dir / "probes").is_symlink() and (run_dir / "probes" / "p.csv").is_file()


def test_symlinked_figures_folder_is_replaced_never_written_through(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "report"
    out.mkdir()
    (out / "figures").symlink_to(outside, target_is_directory=True)
    doc = Document(out, "t")
    fig, _ = plt.subplots()
    doc.figure(fig, "f", "a figure")
    assert list(outside.iterdir()) == []
    assert not (out / "figures").is_symlink() and (out / "figures" / "f.png").is_file()


def test_symlinked_folder_deeper_down_and_a_file_in_the_way(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "b").symlink_to(outside, target_is_directory=True)
    store.write_atomic(root / "a" / "b" / "c" / "f.txt", "x", root=root)
    assert list(outside.iterdir()) == [] and (root / "a" / "b" / "c" / "f.txt").read_text() == "x"
    (root / "file").write_text("keep")
    with pytest.raises(ICLBenchError, match="not a directory"):
        store.write_atomic(root / "file" / "f.txt", "x", root=root)
    assert (root / "file").read_text() == "keep"
