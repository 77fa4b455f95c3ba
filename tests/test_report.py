"""Reports render every figure from a small real run; the Markdown tables say what metrics.json says."""

import json
import re

import pytest

import iclbench
from conftest import TINY, cli


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    run = iclbench.run("affine", "gpt3l", steps=30, out=str(results), overrides=TINY)
    out = tmp_path_factory.mktemp("report")
    done = cli("report", "--results", str(results), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return run, out


def test_every_figure_is_a_real_image(report):
    import matplotlib.image as mpimg

    run, out = report
    figures = sorted((out / "figures").glob("*.png"))
    stem = run.run_dir.name
    expected = [f"{stem}-{kind}.png" for kind in ("error", "layer_lens", "attention", "ablation", "linear_probe")]
    assert set(expected + ["specialization.png"]) <= {p.name for p in figures}
    for path in figures:
        image = mpimg.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300, path
        assert float(image[..., :3].std()) > 0.05, f"{path} looks blank"


def test_markdown_tables_match_the_metrics(report):
    run, out = report
    md = (out / "report.md").read_text()
    m = json.loads((run.run_dir / "metrics.json").read_text())
    for name, s in m["summary"].items():
        label = m["model"] if name == "model" else name
        row = re.search(rf"^\| {re.escape(label)}\s+\|\s+([0-9.]+) \|\s+([0-9.]+) \|\s+([0-9.]+) \|", md, re.M)
        assert row, f"no summary row for {label}"
        assert [float(v) for v in row.groups()] == [round(s["mean"], 4), round(s["ci"][0], 4), round(s["ci"][1], 4)]
    board = re.search(r"^\| gpt3l\s+\| ([0-9.]+) \(n=1\)", md, re.M)
    assert board and float(board.group(1)) == round(m["summary"]["model"]["mean"], 4)
    html = (out / "report.html").read_text()
    assert "<table" in html and 'src="figures/' in html and "http" not in html.split("<body>")[1]


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    out = cli("report", str(tmp_path), "--out", str(tmp_path / "r"))
    assert out.returncode == 2 and "is not a complete run directory" in out.stderr
