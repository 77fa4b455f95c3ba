"""Reports: a Markdown document and its offline HTML rendering, with PNG figures (matplotlib, Agg backend).

The document is built once as a list of blocks (heading, text, table, figure) and written twice, so the
Markdown and the HTML always say the same thing. Figures are drawn from what runs recorded (metrics.json,
probes/); nothing is recomputed here. This module draws the leaderboard, the summary and each run's error
curves; every probe supplies its own part of a run's section and its section across runs (the presentation
methods of :class:`iclbench.Probe`), so the report names no probe.
"""

from __future__ import annotations

import html
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import store
from .errors import warn


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (figures are written to files, never shown)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    return plt


#: resolution figures are saved at (sharp on high-density screens); the page shows them at
#: ``FIGURE_SCALE`` CSS px per inch of the figure, a little above print size so that 8-point text reads easily
FIGURE_DPI = 150
FIGURE_SCALE = 115
#: the main column's width in CSS px; a wider figure is scaled to the column (class "wide"), its image a link to
#: itself at full size
PAGE_WIDTH = 1060

STYLE = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--head:#f6f8fa;--accent:#0969da;--hover:#fff8c5}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;color:var(--fg);background:#fff;font:16px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,
 "Helvetica Neue",Arial,sans-serif}
main{max-width:1100px;margin:0 auto;padding:1.5em 1.25em 4em}
h1{font-size:1.9em;margin:.2em 0 .6em;border-bottom:1px solid var(--line);padding-bottom:.3em}
h2{font-size:1.4em;margin:2.2em 0 .6em;border-bottom:1px solid var(--line);padding-bottom:.25em}
h3{font-size:1.15em;margin:1.6em 0 .5em}
h2[id],h3[id]{scroll-margin-top:.75em}
:target{background:var(--hover)}
p{margin:.6em 0;overflow-wrap:anywhere;max-width:80ch}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
code{font:.9em ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:var(--head);padding:.1em .3em;
 border-radius:4px}
.summary{background:var(--head);border:1px solid var(--line);border-radius:8px;padding:.6em 1.2em;margin:1em 0}
.summary li{margin:.25em 0}
.table-box{max-width:100%;max-height:75vh;overflow:auto;margin:1em 0;border:1px solid var(--line);
 border-radius:6px}
table{border-collapse:separate;border-spacing:0;font-size:.875em;min-width:100%}
th,td{padding:.35em .75em;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
td{max-width:30em;overflow-wrap:break-word}
th{position:sticky;top:0;z-index:1;background:var(--head);font-weight:600;overflow-wrap:normal;
 border-bottom:2px solid var(--line)}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.num{overflow-wrap:normal}
tbody tr:nth-child(even) td{background:#fafbfc}
tbody tr:hover td{background:var(--hover)}
figure{margin:1.5em 0}
.figure-box{max-width:100%}
.figure-box img{display:block;max-width:100%;height:auto}
figcaption{font-size:.9em;color:var(--muted);margin-top:.4em;max-width:80ch}
@media print{.table-box{max-height:none;overflow:visible}th{position:static}}
"""

_NUMBER = re.compile(r"^[-+−]?(\d[\d,]*\.?\d*|\.\d+)(e[-+]?\d+)?( |$|%)")


def _inline(text: str) -> str:
    """Escaped text with the little Markdown the report's prose uses: **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


#: a Markdown code span the way a renderer finds it: one backtick (not escaped, not part of a longer run),
#: text without backticks, one backtick; its text is shown literally, never taken for HTML
_CODE_SPAN = re.compile(r"(?<![`\\])`[^`]+`(?!`)")


def md_escape(text: str, cell: bool = False) -> str:
    """``text`` (which may carry names from user data: directories, tasks, options, probe labels) made safe for
    report.md: ``<``, ``>`` and ``&`` outside code spans written as entities, so a Markdown viewer shows
    ``<script>`` or ``<img onerror=...>`` as text instead of rendering it; the report's own ``**bold**`` and
    ```code``` stay. ``cell``: also ``|``, which would end a table cell."""
    text = str(text)
    out, last = [], 0
    for span in _CODE_SPAN.finditer(text):
        out += [html.escape(text[last:span.start()], quote=False), span.group(0)]
        last = span.end()
    out.append(html.escape(text[last:], quote=False))
    text = "".join(out)
    return text.replace("|", "\\|") if cell else text


def _cell(value, floatfmt: str) -> tuple[str, bool]:
    """A cell's text and whether it is a number (right-aligned)."""
    import math
    import numbers

    if isinstance(value, bool) or value is None:
        return ("—" if value is None else str(value)), False
    if isinstance(value, numbers.Integral):
        return str(value), True
    if isinstance(value, numbers.Real):
        return ("—" if math.isnan(value) else format(value, floatfmt)), True
    text = str(value)
    return text, bool(_NUMBER.match(text))


_NEGATIVE_ZERO = re.compile(r"(?<![\w.])-(0(?:\.0+)?)(?![\d.])")


def no_negative_zero(text: str) -> str:
    """'-0.0000 [-0.0000, -0.0000]' as '0.0000 [0.0000, 0.0000]': a value that rounds to zero has no sign."""
    return _NEGATIVE_ZERO.sub(r"\1", text) if isinstance(text, str) else text


def _without_negative_zeros(df: pd.DataFrame, floatfmt: str) -> pd.DataFrame:
    """``df`` with each float that ``floatfmt`` would write as -0.000… made 0.0, and each text cleaned by
    :func:`no_negative_zero` (the tables stored with the document are left as they are)."""
    import numbers

    def clean(v):
        if isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral)):
            try:
                text = format(v, floatfmt)
            except (TypeError, ValueError):
                return v
            return 0.0 if text.startswith("-") and float(text) == 0 else v
        return no_negative_zero(v)

    return df.map(clean) if hasattr(df, "map") else df.applymap(clean)


#: the most columns one table of the report shows; a wider one is shown as several, each repeating the
#: columns that name its rows (:func:`column_groups`), so that it fits a page 800 px wide instead of being cut
MAX_COLUMNS = 8
#: the columns that name a row (repeated in each part of a table split by :func:`column_groups`)
ROW_NAMES = ("task", "model", "layer", "predictor", "run", "seed", "shift", "row", "name")


def column_groups(df: pd.DataFrame, limit: int = MAX_COLUMNS) -> list[pd.DataFrame]:
    """``df`` as tables of at most ``limit`` columns: its leading row-naming columns (:data:`ROW_NAMES`, at
    least the first) in each, the others in order, shared out evenly. A table that fits is itself."""
    columns = list(df.columns)
    if len(columns) <= limit:
        return [df]
    keep = 1
    while keep < len(columns) - 1 and keep < limit // 2 and str(columns[keep]) in ROW_NAMES:
        keep += 1
    rest = columns[keep:]
    parts = -(-len(rest) // (limit - keep))
    size = -(-len(rest) // parts)
    return [df[columns[:keep] + rest[i:i + size]] for i in range(0, len(rest), size)]


def _html_table(df: pd.DataFrame, floatfmt: str, links: dict) -> str:
    """A table in its own scrolling box: sticky header row, numbers right-aligned, every name escaped;
    ``links[(row, column)]`` makes that cell a link to ``#anchor``."""
    columns = list(df.columns)
    rows = [[_cell(v, floatfmt) for v in row] for row in df.itertuples(index=False, name=None)]
    numeric = [bool(rows) and all(r[j][1] or r[j][0] == "—" for r in rows) for j in range(len(columns))]
    head = "".join(f'<th scope="col"{" class=num" if numeric[j] else ""}>'
                   f'{html.escape(str(c)).replace("_", "_<wbr>")}</th>'  # lens_error may wrap after the _
                   for j, c in enumerate(columns))
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, (text, is_num) in enumerate(row):
            inner = html.escape(text)
            anchor = links.get((i, columns[j]))
            if anchor:
                inner = f'<a href="#{html.escape(anchor, quote=True)}">{inner}</a>'
            cells.append(f"<td{' class=num' if is_num else ''}>{inner}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="table-box"><table><thead><tr>{head}</tr></thead><tbody>' + "".join(body)
            + "</tbody></table></div>")


def _md_cell(value):
    """A table cell for report.md: text escaped (:func:`md_escape`), numbers left for tabulate to format."""
    return md_escape(value, cell=True) if isinstance(value, str) else value


@dataclass
class Document:
    out: Path
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)
    #: resolved run directory -> the HTML id of its section
    run_anchors: dict[str, str] = field(default_factory=dict)
    #: put before every figure's file name (:meth:`figures_named`)
    prefix: str = ""

    def bullets(self, items: list[str]):
        self.blocks.append(("bullets", list(items)))

    def heading(self, text: str, level: int = 2, anchor: str | None = None):
        """``anchor``: the HTML id table cells link to (``#anchor``)."""
        self.blocks.append(("heading", (level, text, anchor)))

    def text(self, text: str):
        self.blocks.append(("text", text))

    def table(self, df: pd.DataFrame, floatfmt: str = ".4f", links: dict | None = None):
        """``links``: ``{(row position, column): anchor}``, cells that link to a heading's anchor in HTML."""
        self.blocks.append(("table", (df, floatfmt, links or {})))

    @contextmanager
    def figures_named(self, prefix: str):
        """Within the block, :meth:`figure` names files ``<prefix><name>``: a run's figures carry its
        directory's name (a probe's ``report_section`` gives only its own part)."""
        before, self.prefix = self.prefix, prefix
        try:
            yield
        finally:
            self.prefix = before

    def figure(self, fig, name: str, caption: str):
        """Save ``fig`` as figures/<prefix><name>.png (atomically) and reference it."""
        import io

        plt = pyplot()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
        plt.close(fig)
        rel = f"figures/{self.prefix}{name}.png"
        data = buf.getvalue()
        store.write_atomic(self.out / rel, data, root=self.out)
        size = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))  # PNG IHDR: width, height
        self.blocks.append(("figure", (rel, caption, size)))

    def markdown(self) -> str:
        from tabulate import tabulate

        from urllib.parse import quote

        # every text taken from user data escaped (md_escape): Markdown viewers render raw HTML
        lines = [f"# {md_escape(self.title)}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value[:2]
                lines += ["#" * level + " " + md_escape(text), ""]
            elif kind == "text":
                lines += [md_escape(no_negative_zero(value)), ""]
            elif kind == "bullets":
                lines += [f"- {md_escape(no_negative_zero(item))}" for item in value] + [""]
            elif kind == "table":
                df, floatfmt = value[:2]
                df = _without_negative_zeros(df, floatfmt)
                df = df.rename(columns=lambda c: md_escape(c, cell=True))
                df = df.map(_md_cell) if hasattr(df, "map") else df.applymap(_md_cell)
                for part in column_groups(df):
                    lines += [tabulate(part, headers="keys", tablefmt="github", showindex=False, floatfmt=floatfmt),
                              ""]
            elif kind == "figure":
                rel, caption = value[:2]  # a run directory's name is in the file name: quoted, as in HTML
                alt = md_escape(caption).replace("[", "\\[").replace("]", "\\]")
                lines += [f"![{alt}]({quote(rel)})", "", f"*{md_escape(caption)}*", ""]
        return "\n".join(lines)

    def html(self) -> str:
        anchors = {v[2] for k, v in self.blocks if k == "heading" and len(v) > 2 and v[2]}
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value[:2]
                anchor = value[2] if len(value) > 2 else None
                ident = f' id="{html.escape(anchor, quote=True)}"' if anchor else ""
                body.append(f"<h{level}{ident}>{html.escape(text)}</h{level}>")
            elif kind == "text":
                body.append(f"<p>{_inline(no_negative_zero(value))}</p>")
            elif kind == "bullets":
                body.append('<ul class="summary">' + "".join(f"<li>{_inline(no_negative_zero(i))}</li>"
                                                             for i in value) + "</ul>")
            elif kind == "table":
                df, floatfmt = value[:2]
                links = {k: a for k, a in (value[2] if len(value) > 2 else {}).items() if a in anchors}
                body += [_html_table(part, floatfmt, links)
                         for part in column_groups(_without_negative_zeros(df, floatfmt))]
            elif kind == "figure":
                from urllib.parse import quote

                rel, caption = value[:2]  # a run directory's name is in the file name: quote it, then escape it
                src = html.escape(quote(rel), quote=True)
                width, height = value[2] if len(value) > 2 else (0, 0)
                # shown at its drawn size (FIGURE_SCALE CSS px per inch) where that fits the column, else
                # scaled to the column's width: no panel is cut off at the window's edge (a scrolling box
                # hid the right-hand panels at 800-1280 px); the image links to itself at full size
                css_w, css_h = round(width * FIGURE_SCALE / FIGURE_DPI), round(height * FIGURE_SCALE / FIGURE_DPI)
                size = f' width="{css_w}" height="{css_h}"' if width and height else ""
                wide = " wide" if css_w > PAGE_WIDTH else ""
                body.append(f'<figure class="figure{wide}"><div class="figure-box"><a href="{src}">'
                            f'<img src="{src}"{size} alt="{html.escape(caption, quote=True)}" loading="eager">'
                            f"</a></div><figcaption>{html.escape(caption)}</figcaption></figure>")
        return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
                f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
                f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body><main>\n"
                + "\n".join(body) + "\n</main></body></html>\n")

    def write(self) -> tuple[Path, Path]:
        md, page = self.out / "report.md", self.out / "report.html"
        store.write_atomic(md, self.markdown())
        store.write_atomic(page, self.html())
        return md, page


# --- figures ------------------------------------------------------------------------------------------

def error_curve_figure(metrics: dict):
    """Normalized error vs context position for the model and every baseline, with CI bands."""
    plt = pyplot()
    curves = metrics["curves"]
    pos = curves["positions"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = ["model"] + sorted(n for n in curves["predictors"] if n != "model")
    for name in names:
        p = curves["predictors"][name]
        label = f"{metrics['model']} (model)" if name == "model" else name
        style = {"lw": 2.4, "color": "black", "zorder": 5} if name == "model" else {"lw": 1.4, "ls": "--"}
        if name == "bayes":  # the limit: drawn solid, so the model's gap to it reads at a glance
            label, style = "bayes (posterior mean: the limit)", {"lw": 2.0, "color": "tab:red", "zorder": 4}
        line, = ax.plot(pos, p["curve"], marker="o", ms=3, label=label, **style)
        ax.fill_between(pos, p["curve_lo"], p["curve_hi"], color=line.get_color(), alpha=0.15, lw=0)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="prior mean (1.0)")
    ax.axvline(curves["score_from"], color="grey", lw=0.8, ls="-.", alpha=0.6)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context position t (values seen: 0..t)")
    ax.set_ylabel("normalized squared error (1 = prior mean)")
    ax.set_title(f"In-context error on {metrics['task']}: {metrics['model']}, seed {metrics['seed']} "
                 f"({int(100 * curves.get('confidence', 0.95))}% bootstrap CI)")
    # under the axes, not over them: a legend inside hides whichever curves run beneath it
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    ax.grid(alpha=0.3)
    return fig


def training_log(run_dir: Path) -> list[dict]:
    """The training curve points of ``train.log`` (a damaged line ends the reading)."""
    import json

    points = []
    try:
        with open(Path(run_dir) / store.LOG) as fh:
            for line in fh:
                entry = json.loads(line)
                if isinstance(entry, dict) and "step" in entry and "loss" in entry:
                    points.append(entry)
    except (OSError, ValueError):
        pass
    return points


def stop_text(t: dict) -> str:
    """How training ended, in words (``train.until: flat`` records it; a fixed step count says so)."""
    stop = t.get("stop")
    if not stop:
        return f"Trained for a fixed {t['steps']} steps (`train.until: steps`)."
    if stop["reason"] == "flat":
        return (f"Stopped at step {stop['steps']}: the held-out error was flat at step {stop['decay_from']} "
                f"(improvement over the window below the tolerance by its 95% interval), then cooled down.")
    return (f"Stopped at the cap, step {stop['steps']}: the held-out error was still falling (or the run was not "
            "learned) when the cooldown had to begin.")


def learning_curve_figure(run_dir: Path, metrics: dict):
    """Training loss (``train.log``) and, under ``train.until: flat``, the held-out error and its excess over
    Bayes against the step, the cooldown's start and the stop marked; None when there is nothing to draw."""
    log, stop = training_log(run_dir), metrics["train"].get("stop") or {}
    held = stop.get("heldout") or []
    if not log and not held:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if log:
        ax.plot([p["step"] for p in log], [p["loss"] for p in log], lw=1.2, color="tab:grey",
                label="training loss (normalized)")
    if held:
        ax.plot([h["step"] for h in held], [h["error"] for h in held], lw=2.0, color="black", marker="o", ms=2,
                label="held-out error")
        if held[0].get("excess") is not None:
            ax.plot([h["step"] for h in held], [max(h["excess"], 1e-6) for h in held], lw=1.4, color="tab:red",
                    label="held-out excess over Bayes")
    if stop.get("decay_from"):
        ax.axvline(stop["decay_from"], color="tab:blue", lw=0.9, ls="--", label=f"cooldown from {stop['decay_from']}")
    if stop:
        ax.axvline(stop["steps"], color="tab:green", lw=0.9, ls="-.", label=f"stopped ({stop['reason']})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("normalized squared error (1 = prior mean)")
    ax.set_title(f"Learning curve: {metrics['model']} on {metrics['task']}, seed {metrics['seed']}")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    ax.grid(alpha=0.3)
    return fig


def curve_table(metrics: dict) -> pd.DataFrame:
    """The per-position numbers behind :func:`error_curve_figure`, one column per predictor."""
    curves = metrics["curves"]
    table = {"t": curves["positions"]}
    for name, p in curves["predictors"].items():
        table[metrics["model"] if name == "model" else name] = p["curve"]
    return pd.DataFrame(table)




def _probe_table(run_dir: Path, name: str) -> pd.DataFrame | None:
    """A stored probe table, or None where the probe did not run or its file is damaged (with a warning)."""
    import io

    path = Path(run_dir) / "probes" / f"{name}.csv"
    if not path.exists():
        return None
    try:
        return pd.read_csv(io.BytesIO(store.read_regular(path)))
    except (store.DamagedRun, ValueError, UnicodeDecodeError) as exc:  # empty or truncated CSV, a FIFO
        warn(f"skipping damaged probe table {path}: {' '.join(str(exc).split())[:200]}")
        return None


def _probe_summaries(run_dir: Path) -> dict:
    """Each stored probe's summary from probes.json (empty where it is missing or damaged: the tables are
    still shown)."""
    try:
        entries = json.loads(store.read_regular(Path(run_dir) / "probes.json"))["probes"]
        return {name: e["summary"] for name, e in entries.items() if isinstance(e, dict)
                and isinstance(e.get("summary"), dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, store.DamagedRun):
        return {}


def probe_section(doc: Document, run_dir: Path, metrics: dict):
    """Each registered probe's part of a run's section (:meth:`iclbench.Probe.report_section`), in registry
    order, from what the run stored; a probe that did not run is skipped quietly, one whose presentation fails
    on its stored table with a warning."""
    from .registry import get_registry

    summaries = _probe_summaries(run_dir)
    for name, entry in get_registry().probes.items():
        table = _probe_table(run_dir, name)
        if table is None or table.empty:
            continue
        kept = len(doc.blocks)
        try:
            with doc.figures_named(f"{run_dir.name}-"):
                entry.obj.report_section(doc, table, summaries.get(name, {}), metrics)
        except Exception as exc:  # a damaged table (columns missing) or a broken plugin: not the whole report
            del doc.blocks[kept:]
            warn(f"skipping probe '{name}' in the report of {run_dir}: {type(exc).__name__}: "
                 f"{' '.join(str(exc).split())[:200]}")


def section_title(metrics: dict) -> str:
    """'affine noise=0.1 × gpt2l train.steps=600': task and model by the settings that distinguish them
    (:func:`iclbench.labels.run_labels`, as the leaderboard labels them); the bare names for a run that
    recorded no configuration."""
    from .labels import run_labels

    try:
        task, model = run_labels(metrics["config"])
    except (KeyError, TypeError, AttributeError):
        task, model = metrics["task"], metrics["model"]
    return f"{task} × {model}"


def run_section(doc: Document, run_dir: Path):
    metrics = store.read_run(run_dir)
    slug = run_dir.name
    doc.heading(f"{section_title(metrics)}, seed {metrics['seed']} ({slug})",
                anchor=doc.run_anchors.get(str(Path(run_dir).resolve())))
    t = metrics["train"]
    doc.text(f"{t['steps']} training steps on {metrics['provenance']['device']} in {t['train_time_s']:.1f} s "
             f"({t['tokens_per_s']:,.0f} tokens/s). Headline: mean normalized error over positions "
             f"t ≥ {metrics['curves']['score_from']}.")
    summary = pd.DataFrame([{"predictor": metrics["model"] if n == "model" else n, "error": s["mean"],
                             "ci_low": s["ci"][0], "ci_high": s["ci"][1]}
                            for n, s in metrics["summary"].items()])
    vs_bayes = {n: p.get("excess_bayes") for n, p in metrics["curves"]["predictors"].items()}
    if vs_bayes.get("model"):  # paired with Bayes on the same sequences (iclbench.evaluate.error_curves)
        summary["excess_bayes"] = [vs_bayes[n]["mean"] for n in metrics["summary"]]
        summary["excess_ci"] = [f"[{vs_bayes[n]['ci'][0]:.4f}, {vs_bayes[n]['ci'][1]:.4f}]" for n in metrics["summary"]]
        m = vs_bayes["model"]
        doc.text(f"**{m['learned']}**: relative excess over Bayes (error − Bayes) / (zero − Bayes) = "
                 f"{m['relative']:.3f}, 95% CI [{m['relative_ci'][0]:.3f}, {m['relative_ci'][1]:.3f}] "
                 "(learned below 0.1, partly within [0.1, 0.5], not learned above 0.5, else inconclusive).")
    doc.text(f"This run's errors, each with its {int(100 * metrics['curves'].get('confidence', 0.95))}% bootstrap "
             "interval over the evaluation sequences (ci_low, ci_high; excess_ci paired with Bayes on the same "
             "sequences): the spread of one trained model's score, not of training seeds (the leaderboard's).")
    doc.table(summary)
    with doc.figures_named(f"{slug}-"):
        doc.figure(error_curve_figure(metrics), "error",
                   f"Normalized squared error per context position for {metrics['model']} and every baseline "
                   f"on {metrics['task']}; shaded: bootstrap CI.")
    doc.table(curve_table(metrics))
    doc.text(stop_text(t))
    with doc.figures_named(f"{slug}-"):
        figure = learning_curve_figure(run_dir, metrics)
        if figure is not None:
            doc.figure(figure, "learning", "Training loss and, when training ran until flat, the held-out error "
                       "scored every train.eval_every steps (its excess over Bayes in red).")
    probe_section(doc, run_dir, metrics)
    return metrics


class OncePerRun:
    """A warning callback (messages already prefixed ``iclbench: warning:``) that says what is wrong with a
    run once: the leaderboard, each probe's section across runs and the run's own section all read a damaged
    run, and each would warn about it. A warning naming no run is shown once too."""

    ABOUT_RUN = re.compile(r"(?:skipping (?:damaged )?run directory|leaving out unstable run|leaving out) (.+?)"
                           r"(?: in the report)?: ")

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, message: str) -> None:
        import sys

        about = self.ABOUT_RUN.search(message)
        key = str(Path(about.group(1)).resolve()) if about else message
        if key not in self.seen:
            self.seen.add(key)
            print(message, file=sys.stderr)


def cross_run_sections(doc: Document, roots: list[Path], warn_run=None) -> list[str]:
    """Each registered probe's section across runs (:meth:`iclbench.Probe.cross_run_table` and
    :meth:`~iclbench.Probe.cross_run_section`), where it has one and has run; a table's task and model cells
    link to the runs' sections. Returns the lines the probes add to the summary at the top."""
    from .probe import has_cross_run_table
    from .probing import collect_probe
    from .registry import get_registry

    lines = []
    for name, entry in get_registry().probes.items():
        cls = entry.obj
        if not has_cross_run_table(cls) or not roots:
            continue
        kept = len(doc.blocks)
        try:
            runs = pd.concat([collect_probe(r, name, **({"warn": warn_run} if warn_run else {}))
                              for r in roots])
            if runs.empty:
                continue
            table = cls.cross_run_table(runs)
            if table is None or table.empty:
                continue
            lines += cls.cross_run_section(doc, table, runs) or []
        except Exception as exc:  # damaged summaries or a broken plugin: the rest of the report goes on
            del doc.blocks[kept:]
            warn(f"skipping the {name} section: damaged probe summaries ({type(exc).__name__}: {exc})")
            continue
        _link_cells(doc, table, runs)
    return lines


def build_report(run_dirs: list[Path], out: Path, results: Path | None = None) -> tuple[Path, Path]:
    """Write report.md, report.html and figures/ under ``out`` for the given runs (and a leaderboard over
    ``results`` or over the runs' parent directories)."""
    from .leaderboard import INTERVALS, aggregate, collect, wide

    out = Path(out)
    blocker = next((p for p in [out, *out.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():  # before any work: one line, not a traceback at the end
        from .errors import ICLBenchError

        raise ICLBenchError(f"report output {str(out)!r}: {str(blocker)!r} exists and is not a directory")
    from .rundir import distinct_runs

    run_dirs = distinct_runs(run_dirs)  # a copy of a run is not another seed: one section
    doc = Document(out, "iclbench report", run_anchors=run_anchors(run_dirs))
    roots = [results] if results is not None else sorted({Path(d).parent for d in run_dirs})
    once = OncePerRun()  # a damaged run is read by every section: one warning about it
    frames = [collect(r, warn=once) for r in roots]
    tidy = pd.concat(frames) if frames else pd.DataFrame()
    board = aggregate(tidy) if frames else pd.DataFrame()
    if not board.empty:
        doc.heading("Leaderboard", anchor="leaderboard")
        doc.text("Normalized squared error averaged over positions t ≥ each task's score_from (1.0 = predicting "
                 f"the prior mean); {INTERVALS}. Each cell links to its run's section.")
        table = wide(board).reset_index().rename(columns={"row": "model"})
        doc.table(table, links=leaderboard_links(table, tidy, doc.run_anchors))
    probe_lines = cross_run_sections(doc, roots, once)
    doc.blocks[0:0] = [("heading", (2, "Summary", "summary")),
                       ("bullets", probe_lines + summary_lines(board) or ["No complete runs to summarize."])]
    for run_dir in run_dirs:
        kept = len(doc.blocks)
        try:
            run_section(doc, Path(run_dir))
        except (store.DamagedRun, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            del doc.blocks[kept:]  # nothing half-written about it
            once(f"iclbench: warning: skipping damaged run directory {run_dir} in the report: "
                 f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
    doc.text("Generated by `iclbench report`; the numbers come from each run's metrics.json "
             + json.dumps(sorted(str(d) for d in run_dirs)))
    return doc.write()


# --- the summary at the top and the links from tables to run sections ---------------------------------------

def run_anchors(run_dirs) -> dict[str, str]:
    """Resolved run directory -> a unique HTML id (``run-<directory name>``, other characters as ``-``)."""
    out, used = {}, set()
    for d in run_dirs:
        base = "run-" + re.sub(r"[^A-Za-z0-9_.-]", "-", Path(d).name)
        anchor, k = base, 2
        while anchor in used:
            anchor, k = f"{base}-{k}", k + 1
        used.add(anchor)
        out[str(Path(d).resolve())] = anchor
    return out


def _first_anchor(runs: pd.DataFrame, anchors: dict[str, str]) -> str | None:
    for run in runs.sort_values("seed")["run"] if not runs.empty else ():
        anchor = anchors.get(str(Path(run).resolve()))
        if anchor:
            return anchor
    return None


def _labelled(tidy: pd.DataFrame, name: str, cfg: str, readable: str, label) -> pd.Series:
    """The rows of ``tidy`` that :func:`iclbench.leaderboard.aggregate` may have labelled ``label``: by name,
    by readable label, either with '@hash'."""
    readable_col = tidy[readable] if readable in tidy else tidy[name]
    return ((tidy[name] == label) | (readable_col == label) | (tidy[name] + "@" + tidy[cfg] == label)
            | (readable_col + "@" + tidy[cfg] == label))


def leaderboard_links(table: pd.DataFrame, tidy: pd.DataFrame, anchors: dict[str, str]) -> dict:
    """Each leaderboard cell -> the section of its (lowest-seed) run; a model's name -> its first run."""
    links = {}
    if tidy.empty:
        return links
    tasks = [c for c in table.columns if c != "model"]
    for i, row in enumerate(table["model"]):
        if str(row).startswith("baseline: "):
            mine = tidy[(tidy.kind == "baseline") & (tidy.name == str(row)[len("baseline: "):])]
        else:
            mine = tidy[(tidy.kind == "model") & _labelled(tidy, "name", "config", "config_label", row)]
        links[(i, "model")] = _first_anchor(mine, anchors)
        for task in tasks:
            cell = mine[_labelled(mine, "task", "task_config", "task_config_label", task)]
            links[(i, task)] = _first_anchor(cell, anchors)
    return {k: v for k, v in links.items() if v}


def _link_cells(doc: Document, table: pd.DataFrame, runs: pd.DataFrame) -> None:
    """Link a cross-run table's task and model cells (where it has those columns) to the first run's section
    of that task × model."""
    if not {"task", "model"} <= set(table.columns):
        return
    links = {}
    for i, (task, model) in enumerate(zip(table["task"], table["model"])):
        anchor = _first_anchor(runs[(runs.task == task) & (runs.model == model)], doc.run_anchors)
        if anchor:
            links[(i, "task")] = links[(i, "model")] = anchor
    for k, (kind, value) in enumerate(doc.blocks):
        if kind == "table" and value[0] is table:
            doc.blocks[k] = ("table", (value[0], value[1], links))


def summary_lines(board: pd.DataFrame) -> list[str]:
    """Lines a reader needs first (after what the probes add): each task's leaderboard headline, and what
    was not learned."""
    from .leaderboard import is_oracle

    lines = []
    if not board.empty:
        for task in sorted(board.task.unique()):
            rows = board[board.task == task]
            models = rows[rows.kind == "model"].sort_values("mean")
            if models.empty:
                continue
            best = models.iloc[0]
            label = f" ({best['learned']})" if best.get("learned") else ""
            text = f"**{task}**: best model {best['row']} {best['mean']:.4f}{label}"
            base = rows[rows.kind == "baseline"]
            bayes = base[base.row == "baseline: bayes"]
            if not bayes.empty:
                text += f"; Bayes limit {bayes.iloc[0]['mean']:.4f}"
            others = base[[r != "baseline: bayes" and not is_oracle(r[len("baseline: "):]) for r in base.row]]
            if not others.empty:
                b = others.sort_values("mean").iloc[0]
                text += f"; best baseline {b['row'][len('baseline: '):]} {b['mean']:.4f}"
            lines.append(text + ".")
        models = board[board.kind == "model"]
        if "learned" in models and models.learned.astype(bool).any():
            missed = models[models.learned.astype(str).str.contains("not learned|partly|inconclusive")]
            lines.append("**Not learned** (or only partly): " + ", ".join(
                f"{r['row']} on {r['task']} ({r['learned']})" for _, r in missed.iterrows()) + "."
                if not missed.empty else "Every model learned its task (relative excess over Bayes below 0.1).")
        else:
            lines.append("Whether the models learned their tasks is not recorded (no Bayes baseline in these runs).")
    return lines
