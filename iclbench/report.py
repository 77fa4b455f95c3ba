"""Reports: a Markdown document and its offline HTML rendering, with PNG figures (matplotlib, Agg backend).

The document is built once as a list of blocks (heading, text, table, figure) and written twice, so the
Markdown and the HTML always say the same thing. Figures are drawn from what runs recorded (metrics.json,
probes/); nothing is recomputed here.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import store
from .errors import warn


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    return plt


#: resolution figures are saved at (sharp on high-density screens); the page shows them at
#: ``FIGURE_SCALE`` CSS px per inch of the figure, a little above print size so that 8-point text reads easily
FIGURE_DPI = 150
FIGURE_SCALE = 115
#: the main column's width in CSS px; a wider figure scrolls in its own box instead of shrinking
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
th{position:sticky;top:0;z-index:1;background:var(--head);font-weight:600;white-space:nowrap;
 border-bottom:2px solid var(--line)}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:nth-child(even) td{background:#fafbfc}
tbody tr:hover td{background:var(--hover)}
figure{margin:1.5em 0}
.figure-box{max-width:100%;overflow-x:auto}
.figure-box img{display:block;max-width:100%;height:auto}
figure.wide .figure-box img{max-width:none}
figcaption{font-size:.9em;color:var(--muted);margin-top:.4em;max-width:80ch}
@media print{.table-box{max-height:none;overflow:visible}th{position:static}}
"""

_NUMBER = re.compile(r"^[-+−]?(\d[\d,]*\.?\d*|\.\d+)(e[-+]?\d+)?( |$|%)")


def _inline(text: str) -> str:
    """Escaped text with the little Markdown the report's prose uses: **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


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


def _html_table(df: pd.DataFrame, floatfmt: str, links: dict) -> str:
    """A table in its own scrolling box: sticky header row, numbers right-aligned, every name escaped;
    ``links[(row, column)]`` makes that cell a link to ``#anchor``."""
    columns = list(df.columns)
    rows = [[_cell(v, floatfmt) for v in row] for row in df.itertuples(index=False, name=None)]
    numeric = [bool(rows) and all(r[j][1] or r[j][0] == "—" for r in rows) for j in range(len(columns))]
    head = "".join(f'<th scope="col"{" class=num" if numeric[j] else ""}>{html.escape(str(c))}</th>'
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


@dataclass
class Document:
    out: Path
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)
    #: resolved run directory -> the HTML id of its section
    run_anchors: dict[str, str] = field(default_factory=dict)

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

    def figure(self, fig, name: str, caption: str):
        """Save ``fig`` as figures/<name>.png (atomically) and reference it."""
        import io

        plt = _pyplot()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
        plt.close(fig)
        rel = f"figures/{name}.png"
        data = buf.getvalue()
        store.write_atomic(self.out / rel, data)
        size = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))  # PNG IHDR: width, height
        self.blocks.append(("figure", (rel, caption, size)))

    def markdown(self) -> str:
        from tabulate import tabulate

        lines = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value[:2]
                lines += ["#" * level + " " + text, ""]
            elif kind == "text":
                lines += [value, ""]
            elif kind == "bullets":
                lines += [f"- {item}" for item in value] + [""]
            elif kind == "table":
                df, floatfmt = value[:2]
                lines += [tabulate(df, headers="keys", tablefmt="github", showindex=False, floatfmt=floatfmt), ""]
            elif kind == "figure":
                rel, caption = value[:2]
                lines += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
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
                body.append(f"<p>{_inline(value)}</p>")
            elif kind == "bullets":
                body.append('<ul class="summary">' + "".join(f"<li>{_inline(i)}</li>" for i in value) + "</ul>")
            elif kind == "table":
                df, floatfmt = value[:2]
                links = {k: a for k, a in (value[2] if len(value) > 2 else {}).items() if a in anchors}
                body.append(_html_table(df, floatfmt, links))
            elif kind == "figure":
                from urllib.parse import quote

                rel, caption = value[:2]  # a run directory's name is in the file name: quote it, then escape it
                src = html.escape(quote(rel), quote=True)
                width, height = value[2] if len(value) > 2 else (0, 0)
                # shown at its drawn size (FIGURE_SCALE CSS px per inch) when that fits the page, else in
                # its own scrolling box at that size, so no figure's text shrinks below what it was drawn at
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
    plt = _pyplot()
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
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    return fig


def curve_table(metrics: dict) -> pd.DataFrame:
    """The per-position numbers behind :func:`error_curve_figure`, one column per predictor."""
    curves = metrics["curves"]
    table = {"t": curves["positions"]}
    for name, p in curves["predictors"].items():
        table[metrics["model"] if name == "model" else name] = p["curve"]
    return pd.DataFrame(table)


def _layer_names(layers) -> list[str]:
    return ["embed" if int(layer) < 0 else f"L{int(layer)}" for layer in layers]


def lens_figure(table: pd.DataFrame, score_from: int, title: str):
    """Per-layer read-outs (logit lens through the model's own final norm and read-out; tuned lens fitted
    per layer): distance to the target and to each baseline, averaged over positions >= score_from."""
    plt = _pyplot()
    table = table[table.position >= score_from]
    lenses = sorted(table.lens.unique())
    fig, axes = plt.subplots(1, len(lenses), figsize=(5.2 * len(lenses), 3.8), squeeze=False, sharey=True)
    for ax, lens in zip(axes[0], lenses):
        part = table[table.lens == lens].groupby(["reference", "layer"], as_index=False)["distance"].mean()
        for ref, rows in part.groupby("reference"):
            rows = rows.sort_values("layer")
            ax.plot(rows.layer, rows.distance, marker="o", lw=2.2 if ref == "target" else 1.3,
                    color="black" if ref == "target" else None,
                    label="error (vs target)" if ref == "target" else f"distance to {ref}")
        layers = sorted(part.layer.unique())
        ax.set_xticks(layers, _layer_names(layers))
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("residual stream after layer")
        ax.set_title(f"{lens} lens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"normalized squared distance (t >= {score_from})")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def attention_figure(table: pd.DataFrame, title: str):
    """Mean attention pattern (query position × key position) of every head, one panel per layer × head."""
    plt = _pyplot()
    pat = table[table.stat == "pattern"]
    layers, heads = sorted(pat.layer.unique()), sorted(pat["head"].unique())
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(2.3 * len(heads) + 1, 2.2 * len(layers) + 0.6),
                             squeeze=False)
    image = None
    for i, layer in enumerate(layers):
        for j, head in enumerate(heads):
            grid = pat[(pat.layer == layer) & (pat["head"] == head)].pivot(index="position", columns="key",
                                                                        values="value")
            ax = axes[i][j]
            image = ax.imshow(grid.values, vmin=0, vmax=1, cmap="viridis", origin="upper")
            ax.set_title(f"L{layer}H{head}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel("query position")
            if i == len(layers) - 1:
                ax.set_xlabel("key position")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="mean attention weight")
    fig.suptitle(title)
    return fig


def ablation_figure(table: pd.DataFrame, title: str):
    """Change in normalized error per position when each head / attention layer / MLP is zero- or
    mean-ablated (red: the prediction gets worse without it)."""
    import numpy as np
    from matplotlib.colors import SymLogNorm

    plt = _pyplot()
    methods = sorted(table.method.unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 0.28 * table.component.nunique() + 1.8),
                             squeeze=False)
    order = list(dict.fromkeys(table.component))
    for ax, method in zip(axes[0], methods):
        grid = table[table.method == method].pivot(index="component", columns="position", values="delta")
        grid = grid.reindex(order)
        limit = float(np.nanmax(np.abs(grid.values))) or 1.0
        # symmetric log colour scale: one dominant component must not hide the small ones
        norm = SymLogNorm(linthresh=min(1e-3, limit), vmin=-limit, vmax=limit)
        image = ax.imshow(grid.values, cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_yticks(range(len(order)), order, fontsize=7)
        ax.set_xlabel("context position t")
        ax.set_title(f"{method}-ablation: Δ error")
        fig.colorbar(image, ax=ax, shrink=0.8, label="Δ normalized error")
    fig.suptitle(title)
    return fig


def linear_probe_figure(table: pd.DataFrame, score_from: int, title: str):
    """Held-out R² of ridge probes from each layer's residual stream to the task's latent parameters."""
    plt = _pyplot()
    part = table[table.position >= score_from].groupby(["latent", "layer"], as_index=False)["r2"].mean()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for latent, rows in part.groupby("latent"):
        rows = rows.sort_values("layer")
        ax.plot(rows.layer, rows.r2, marker="o", label=str(latent))
    layers = sorted(part.layer.unique())
    ax.set_xticks(layers, _layer_names(layers))
    ax.set_ylim(min(0.0, float(part.r2.min()) - 0.05), 1.02)
    ax.set_xlabel("residual stream after layer")
    ax.set_ylabel(f"held-out R² (mean over t >= {score_from})")
    ax.set_title(title)
    ax.legend(title="latent")
    ax.grid(alpha=0.3)
    return fig


PATTERN_COLOURS = {"holds": "#9bd39b", "inconclusive": "#f3dc8a", "fails": "#ee9b9b"}


def specialization_figure(table: pd.DataFrame):
    """Tasks × models matrix: each cell lists the nearest algorithm of every layer (most common over seeds)
    and the verdicts, and is coloured by the seed paper's pattern (both claims) where the task can test it,
    else by "refines with depth": holds (green), inconclusive (yellow), fails (red), by the most common label
    over seeds."""
    plt = _pyplot()
    # rows by model (name + model options); training settings a task chose for itself do not split a row
    table = table.assign(model=[" ".join(t for t in m.split() if not t.startswith("train.")) for m in table.model])
    tasks, models = sorted(table.task.unique()), sorted(table.model.unique())
    layer_cols = [c for c in table.columns if c.startswith("layer ")]
    fig, ax = plt.subplots(figsize=(2.6 * len(tasks) + 1.5, 0.34 * (len(layer_cols) + 2) * len(models) + 1.2))
    for i, model in enumerate(models):
        for j, task in enumerate(tasks):
            row = table[(table.model == model) & (table.task == task)]
            if row.empty:
                text, colour = "—", "#eeeeee"
            else:
                r = row.iloc[0]
                roles = [f"L{c.split()[1]}: {r[c]}" for c in layer_cols if isinstance(r[c], str) and r[c] != "—"]
                pattern, refines = str(r.get("paper's pattern", "n/a")), str(r.get("refines with depth", "n/a"))
                text = "\n".join(roles + [f"paper: {pattern}", f"refines: {refines}"])
                deciding = pattern if pattern != "n/a" else refines
                colour = PATTERN_COLOURS.get(deciding.split()[0], "#dddddd")
            ax.add_patch(plt.Rectangle((j, i), 1, 1, facecolor=colour, edgecolor="white", lw=2))
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=9)
    ax.set_xlim(0, len(tasks))
    ax.set_ylim(len(models), 0)
    ax.set_xticks([j + 0.5 for j in range(len(tasks))], tasks, rotation=20)
    ax.set_yticks([i + 0.5 for i in range(len(models))], models)
    ax.set_xlabel("task")
    ax.set_ylabel("model")
    ax.set_title("Nearest algorithm per layer across tasks × models;\ncolour: the seed paper's pattern (else "
                 "refinement with depth)\nholds / inconclusive / fails in most seeds", fontsize=9)
    return fig


def ladder_figure(table: pd.DataFrame, title: str):
    """Layers × algorithms (crude → refined): distance between each layer's tuned-lens read-out and each
    algorithm's prediction (log colour scale); the nearest algorithm of each layer is outlined."""
    import numpy as np

    plt = _pyplot()
    algos = table.sort_values("rank").drop_duplicates("algorithm").algorithm.tolist()
    layers = sorted(table.layer.unique())
    grid = table.pivot_table(index="layer", columns="algorithm", values="distance").reindex(index=layers, columns=algos)
    values = np.log10(grid.to_numpy(dtype=float).clip(1e-6))
    fig, ax = plt.subplots(figsize=(1.0 * len(algos) + 2.5, 0.45 * len(layers) + 1.6))
    im = ax.imshow(values, cmap="viridis_r", aspect="auto")
    for i, layer in enumerate(layers):
        row = grid.loc[layer]
        best = int(np.nanargmin(row.to_numpy(dtype=float)))
        ax.add_patch(plt.Rectangle((best - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="white" if values[i, j] > -2 else "black")
    ax.set_xticks(range(len(algos)), algos, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), ["embed" if l < 0 else f"after L{l}" for l in layers])
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 distance (1 = prior variance)")
    return fig


def verdict_table(summary: dict) -> pd.DataFrame:
    """The specialization probe's claims: verdict, the statistic behind it with its interval, the criterion,
    and the verdict at other criteria (how a label moves when its cut moves)."""
    def ci(e):
        return f"{e['mean']:.3g} [{e['ci'][0]:.3g}, {e['ci'][1]:.3g}]" if e and None not in (e["mean"], *e["ci"]) else "—"

    def moves(sweep):
        return ", ".join(f"{k}: {v}" for k, v in sweep.items())

    rows = []
    refine = summary["refines_with_depth"]
    rows.append({"claim": "refines with depth (lens error, first → last block, relative drop)",
                 "verdict": refine["verdict"], "statistic": ci(refine["relative_gain"]),
                 "criterion": f"> {refine['criterion']}", "at other criteria": moves(refine.get("sweep", {}))})
    c1 = summary["claim_1"]
    rows.append({"claim": "1: layer 0 copies (copy coefficient over the largest other, in its write)", "verdict": c1["verdict"],
                 "statistic": ci(c1.get("copy_dominance")), "criterion": f"> {c1['criterion']}",
                 "at other criteria": moves(c1.get("sweep", {}))})
    last = summary["layers"][-1] if summary["layers"] else {}
    rows.append({"claim": "2: last layer refines via negative-similarity heads", "verdict": summary["claim_2"]["verdict"],
                 "statistic": f"heads {' '.join(last.get('negative_heads', [])) or 'none'}; ablation cost "
                              f"{ci(last.get('ablation_cost'))}",
                 "criterion": f"refines > {summary['criteria']['refine_margin']}, cost > "
                              f"{summary['criteria']['ablation_margin']}",
                 "at other criteria": moves(last.get("ablation_sweep", {}))})
    return pd.DataFrame(rows)


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


def probe_section(doc: Document, run_dir: Path, metrics: dict):
    """Figures from the probes stored with the run (skipped quietly where a probe did not run)."""
    slug, k = run_dir.name, metrics["curves"]["score_from"]
    what = f"{metrics['model']} on {metrics['task']}, seed {metrics['seed']}"
    figures = [
        ("layer_lens", lambda t: lens_figure(t, k, f"Layer lens: {what}"),
         "Prediction read from the residual stream after each layer (logit lens and tuned lens): error and "
         "distance to each baseline's prediction."),
        ("attention", lambda t: attention_figure(t, f"Mean attention patterns: {what}"),
         "Mean attention pattern of every head (rows: query position, columns: key position)."),
        ("ablation", lambda t: ablation_figure(t, f"Ablations: {what}"),
         "Change in normalized error per position when a component is ablated."),
        ("linear_probe", lambda t: linear_probe_figure(t, k, f"Linear probes: {what}"),
         "Held-out R² of ridge probes for the task's latent parameters, per layer."),
        ("ladder", lambda t: ladder_figure(t, f"Algorithm ladder: {what}"),
         "Distance between each layer's read-out (tuned lens) and each algorithm, crude → refined; outlined: "
         "the nearest algorithm."),
    ]
    for name, draw, caption in figures:
        table = _probe_table(run_dir, name)
        if table is not None and not table.empty:
            try:
                fig = draw(table)
            except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:  # columns missing
                warn(f"skipping damaged probe table {run_dir / 'probes' / (name + '.csv')}: "
                     f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
                continue
            doc.figure(fig, f"{slug}-{name}", caption)
    spec = _probe_table(run_dir, "specialization")
    if spec is not None and not spec.empty:
        doc.text("Per layer: the nearest algorithm, the tuned-lens error, the refinement across the layer (with "
                 "its interval) and the copy regression of the layer's direct write (iclbench/probes/"
                 "specialization.py):")
        doc.table(spec)
    try:
        summary = json.loads(store.read_regular(run_dir / "probes.json"))["probes"]["specialization"]["summary"]
        doc.text("The claims, each read from an interval against its criterion, and how the verdict moves when "
                 "the criterion moves:")
        doc.table(verdict_table(summary))
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, store.DamagedRun):
        pass  # no specialization summary stored (or an older one): the table above is all there is


def run_section(doc: Document, run_dir: Path):
    metrics = store.read_run(run_dir)
    slug = run_dir.name
    doc.heading(f"{metrics['task']} × {metrics['model']}, seed {metrics['seed']} ({slug})",
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
    doc.table(summary)
    doc.figure(error_curve_figure(metrics), f"{slug}-error",
               f"Normalized squared error per context position for {metrics['model']} and every baseline on "
               f"{metrics['task']}; shaded: bootstrap CI.")
    doc.table(curve_table(metrics))
    probe_section(doc, run_dir, metrics)
    return metrics


def specialization_section(doc: Document, roots: list[Path]):
    """The cross-run answer to the seed paper's question, where the specialization probe is registered and
    has run."""
    from .probing import collect_probe
    from .registry import get_registry

    registry = get_registry()
    if "specialization" not in registry.probes:
        return
    runs = pd.concat([collect_probe(r, "specialization") for r in roots]) if roots else pd.DataFrame()
    if runs.empty:
        return
    table = registry.probe("specialization").cross_run_table(runs)
    doc.heading("Does early-copy / late-refine generalize?")
    doc.text("Per task × model: each layer's most common nearest algorithm over seeds; each claim's labels "
             "over seeds (holds / fails / inconclusive, each from an interval over probe sequences; n/a: the "
             "task cannot test it, never a failure); and key numbers as the mean over training seeds with a "
             "95% bootstrap interval over seeds, labelled against the probe's criterion.")
    doc.figure(specialization_figure(table), "specialization", "Specialization matrix across tasks × models.")
    doc.table(table)
    return table


def build_report(run_dirs: list[Path], out: Path, results: Path | None = None) -> tuple[Path, Path]:
    """Write report.md, report.html and figures/ under ``out`` for the given runs (and a leaderboard over
    ``results`` or over the runs' parent directories)."""
    from .leaderboard import aggregate, collect, wide

    out = Path(out)
    blocker = next((p for p in [out, *out.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():  # before any work: one line, not a traceback at the end
        from .errors import ICLBenchError

        raise ICLBenchError(f"report output {str(out)!r}: {str(blocker)!r} exists and is not a directory")
    doc = Document(out, "iclbench report", run_anchors=run_anchors(run_dirs))
    roots = [results] if results is not None else sorted({Path(d).parent for d in run_dirs})
    frames = [collect(r) for r in roots]
    tidy = pd.concat(frames) if frames else pd.DataFrame()
    board = aggregate(tidy) if frames else pd.DataFrame()
    if not board.empty:
        doc.heading("Leaderboard", anchor="leaderboard")
        doc.text("Normalized squared error averaged over positions t ≥ each task's score_from (1.0 = predicting "
                 "the prior mean); mean ± sd over seeds, n = seeds. Each cell links to its run's section.")
        table = wide(board).reset_index().rename(columns={"row": "model"})
        doc.table(table, links=leaderboard_links(table, tidy, doc.run_anchors))
    spec = None
    try:
        spec = specialization_section(doc, roots)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        warn(f"skipping the specialization section: damaged probe summaries ({type(exc).__name__}: {exc})")
    spec_runs = _link_specialization(doc, spec, roots)
    doc.blocks[0:0] = [("heading", (2, "Summary", "summary")),
                       ("bullets", summary_lines(board, spec, spec_runs, tidy))]
    for run_dir in run_dirs:
        kept = len(doc.blocks)
        try:
            run_section(doc, Path(run_dir))
        except (store.DamagedRun, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            del doc.blocks[kept:]  # nothing half-written about it
            warn(f"skipping damaged run directory {run_dir} in the report: {type(exc).__name__}: "
                 f"{' '.join(str(exc).split())[:200]}")
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
            mine = tidy[(tidy.kind == "model") & ((tidy.name == row) | (tidy.name + "@" + tidy.config == row))]
        links[(i, "model")] = _first_anchor(mine, anchors)
        for task in tasks:
            cell = mine[(mine.task == task) | (mine.task + "@" + mine.task_config == task)]
            links[(i, task)] = _first_anchor(cell, anchors)
    return {k: v for k, v in links.items() if v}


def _link_specialization(doc: Document, spec: pd.DataFrame | None, roots) -> pd.DataFrame:
    """Link the specialization table's task and model cells to the run sections; returns the probe's runs
    (run, task, model, seed) behind the table."""
    if spec is None or spec.empty:
        return pd.DataFrame()
    from .probing import collect_probe

    runs = pd.concat([collect_probe(r, "specialization", warn=lambda m: None) for r in roots])
    if runs.empty:
        return runs
    links = {}
    for i, (task, model) in enumerate(zip(spec["task"], spec["model"])):
        anchor = _first_anchor(runs[(runs.task == task) & (runs.model == model)], doc.run_anchors)
        if anchor:
            links[(i, "task")] = links[(i, "model")] = anchor
    for k, (kind, value) in enumerate(doc.blocks):
        if kind == "table" and value[0] is spec:
            doc.blocks[k] = ("table", (value[0], value[1], links))
    return runs


PATTERN = "paper's pattern"  # the specialization table's column for both claims together


def _label(cell) -> str:
    """'holds 3/4 (fails 1)' -> 'holds'."""
    return str(cell).split()[0] if isinstance(cell, str) and cell.strip() else "n/a"


def summary_lines(board: pd.DataFrame, spec: pd.DataFrame | None, spec_runs: pd.DataFrame,
                  tidy: pd.DataFrame) -> list[str]:
    """A few lines a reader needs first: the specialization answer (read from learned cells only where the
    runs say which learned), each task's leaderboard headline, and what was not learned."""
    from .leaderboard import is_oracle

    lines = []
    learned_runs = {}
    if not tidy.empty and "learned" in tidy:
        models = tidy[tidy.kind == "model"]
        learned_runs = {str(Path(r).resolve()): v for r, v in zip(models.run, models.learned)}
    if spec is not None and not spec.empty and PATTERN in spec:
        def counts(labels):
            c = pd.Series([_label(v) for v in labels]).value_counts()
            return ", ".join(f"{k} in {v}" for k, v in c.items())

        cells = f"{len(spec)} task × model cell" + ("s" if len(spec) != 1 else "")
        lines.append(f"**The answer** (specialization probe, most common label over seeds, {cells}): the seed "
                     f"paper's early-copy / late-refine pattern {counts(spec[PATTERN])}; refinement with depth "
                     f"{counts(spec['refines with depth'])}.")
        if learned_runs and not spec_runs.empty:
            keep = []
            for task, model in zip(spec["task"], spec["model"]):
                runs = spec_runs[(spec_runs.task == task) & (spec_runs.model == model)].run
                keep.append(bool(len(runs)) and all(learned_runs.get(str(Path(r).resolve())) == "learned"
                                                    for r in runs))
            learned_spec = spec[keep]
            lines.append(f"Only learned cells are evidence: {len(learned_spec)} of {cells} had every seed "
                         "learn its task" + (f"; among them the pattern {counts(learned_spec[PATTERN])}."
                                           if len(learned_spec) else "; none says how a model solves its task."))
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
    return lines or ["No complete runs to summarize."]
