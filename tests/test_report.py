"""Reports render every figure from a small real run; the Markdown tables say what metrics.json says."""

import json
import os
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


@pytest.mark.slow
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
    from iclbench.labels import run_labels

    row_label = run_labels(m["config"])[1]  # "gpt3l train.steps=30 ...": the settings it was run with
    assert row_label.startswith("gpt3l ") and "train.steps=30" in row_label
    board = re.search(rf"^\| {re.escape(row_label)}\s+\| ([0-9.]+) \(n=1\)", md, re.M)
    assert board and float(board.group(1)) == round(m["summary"]["model"]["mean"], 4)
    html = (out / "report.html").read_text()
    assert "<table" in html and 'src="figures/' in html and "http" not in html.split("<body>")[1]


@pytest.mark.slow
def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    out = cli("report", str(tmp_path), "--out", str(tmp_path / "r"))
    assert out.returncode == 2 and "is not a complete run directory" in out.stderr


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
#: appended to a copy of report.html: on load, what a reader would see wrong, as JSON in a <pre>
PAGE_CHECK = """<script>window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var r = {scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth, images: imgs.length,
           broken: imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; })
                       .map(function (i) { return i.getAttribute('src'); }),
           links: Array.from(document.querySelectorAll('a[href^="#"]')).filter(function (a) {
                    return !document.getElementById(decodeURIComponent(a.getAttribute('href').slice(1))); })
                    .map(function (a) { return a.getAttribute('href'); }),
           clipped: Array.from(document.querySelectorAll('.table-box, .figure-box')).filter(function (b) {
                      return b.scrollWidth > b.clientWidth + 1; }).map(function (b) {
                      var img = b.querySelector('img'), th = b.querySelector('th');
                      return (img ? img.getAttribute('src') : th && th.textContent) + ': ' + b.scrollWidth + ' > ' +
                             b.clientWidth; }),
           sticky: getComputedStyle(document.querySelector('th')).position,
           numeric: getComputedStyle(document.querySelector('td.num')).textAlign};
  var pre = document.createElement('pre'); pre.id = 'iclbench-check'; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});</script>"""


@pytest.mark.slow  # headless Chromium
def test_report_reads_well_in_headless_chromium(report, tmp_path):
    """Rendered by a real browser: every image loads, every in-page link has its target, the page is no
    wider than the window, even at 700 px, and from 800 to 1280 px nothing is cut off: no table or figure
    needs its box scrolled sideways (a wide table is shown as several, a wide figure scaled to the column;
    issue 26: the specialization table was cut mid-header at 1280 px, the ablation panel at 800 px); a
    screenshot is saved beside the report (report-1280.png) to look at."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium not found (Debian: apt-get install chromium; .ci/run installs it)")
    _, out = report
    page = out / "report.html"
    probe = out / ".browser-check.html"  # beside report.html, so the figures resolve as they do for a reader
    probe.write_text(page.read_text().replace("</body>", PAGE_CHECK + "</body>"))

    def chromium_run(width, height, *args):
        profile = tmp_path / f"profile-{width}-{len(args)}"  # a fresh profile each time
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               f"--window-size={width},{height}", *args], capture_output=True, text=True,
                              timeout=120)

    for width in (1280, 1024, 800, 700):
        done = chromium_run(width, 900, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
        found = re.search(r'<pre id="iclbench-check">(.*?)</pre>', done.stdout, re.S)
        assert found, f"chromium printed no check result: {done.stderr[-1000:]}"
        seen = json.loads(found.group(1))
        assert seen["images"] >= 6 and seen["broken"] == [], seen
        assert seen["links"] == [], seen
        assert seen["scrollWidth"] <= seen["innerWidth"] == width, seen
        assert width < 800 or seen["clipped"] == [], seen
        assert seen["sticky"] == "sticky" and seen["numeric"] == "right", seen
    shot = out / "report-1280.png"
    done = chromium_run(1280, 2400, f"--screenshot={shot}", page.as_uri())
    assert shot.exists() and shot.stat().st_size > 10_000, done.stderr[-1000:]
    probe.unlink()
    if os.environ.get("ICLBENCH_SCREENSHOT_DIR"):  # to look at it after the run
        shutil.copy(shot, os.environ["ICLBENCH_SCREENSHOT_DIR"])


def test_a_wide_table_is_shown_as_parts_that_keep_the_row_names(tmp_path):
    import pandas as pd

    from iclbench.report import MAX_COLUMNS, Document, column_groups

    wide = pd.DataFrame({"task": ["affine"], "model": ["gpt3l"], **{f"c{i}": [float(i)] for i in range(14)}})
    parts = column_groups(wide)
    assert len(parts) == 3 and all(len(p.columns) <= MAX_COLUMNS for p in parts)
    assert all(list(p.columns[:2]) == ["task", "model"] for p in parts)
    assert [c for p in parts for c in p.columns[2:]] == [f"c{i}" for i in range(14)]  # every column, in order
    narrow = wide.iloc[:, :MAX_COLUMNS]
    assert column_groups(narrow)[0] is narrow
    doc = Document(tmp_path, "t")
    doc.table(wide)
    assert doc.html().count("<table>") == 3 and doc.markdown().count("| task ") == 3


def test_probe_legends_hide_no_curve():
    import pandas as pd

    from iclbench.probes.figures import lens_figure, linear_probe_figure

    rows = [{"lens": lens, "reference": ref, "layer": layer, "position": 3, "distance": 0.1 * (layer + 1)}
            for lens in ("logit", "tuned") for ref in ("target", "bayes", "copy_last", "least_squares")
            for layer in range(3)]
    fig = lens_figure(pd.DataFrame(rows), 0, "t")
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert not any(legend.overlaps(ax.get_window_extent()) for ax in fig.axes)
    probe = pd.DataFrame([{"latent": latent, "layer": layer, "position": 3, "r2": 0.2 * layer}
                          for latent in ("a", "b") for layer in range(3)])
    fig = linear_probe_figure(probe, 0, "t")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())
