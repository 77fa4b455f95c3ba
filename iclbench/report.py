"""Reports: a Markdown document and its offline HTML rendering, with PNG figures (matplotlib, Agg backend).

The document is built once as a list of blocks (heading, text, table, figure) and written twice, so the
Markdown and the HTML always say the same thing. Figures are drawn from what runs recorded (metrics.json,
probes/); nothing is recomputed here.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import store


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Document:
    out: Path
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2):
        self.blocks.append(("heading", (level, text)))

    def text(self, text: str):
        self.blocks.append(("text", text))

    def table(self, df: pd.DataFrame, floatfmt: str = ".4f"):
        self.blocks.append(("table", (df, floatfmt)))

    def figure(self, fig, name: str, caption: str):
        """Save ``fig`` as figures/<name>.png (atomically) and reference it."""
        import io

        plt = _pyplot()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        rel = f"figures/{name}.png"
        store.write_atomic(self.out / rel, buf.getvalue())
        self.blocks.append(("figure", (rel, caption)))

    def markdown(self) -> str:
        from tabulate import tabulate

        lines = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                lines += ["#" * level + " " + text, ""]
            elif kind == "text":
                lines += [value, ""]
            elif kind == "table":
                df, floatfmt = value
                lines += [tabulate(df, headers="keys", tablefmt="github", showindex=False, floatfmt=floatfmt), ""]
            elif kind == "figure":
                rel, caption = value
                lines += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
        return "\n".join(lines)

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                body.append(f"<h{level}>{html.escape(text)}</h{level}>")
            elif kind == "text":
                body.append(f"<p>{html.escape(value)}</p>")
            elif kind == "table":
                df, floatfmt = value
                body.append(df.to_html(index=False, float_format=lambda v: format(v, floatfmt), border=0))
            elif kind == "figure":
                rel, caption = value
                body.append(f'<figure><img src="{rel}" alt="{html.escape(caption)}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{padding:3px 8px;border-bottom:1px solid #ddd;"
                 "text-align:right}img{max-width:100%}figcaption{font-style:italic;color:#555}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

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


def run_section(doc: Document, run_dir: Path):
    metrics = store.read_run(run_dir)
    slug = run_dir.name
    doc.heading(f"{metrics['task']} × {metrics['model']}, seed {metrics['seed']} ({slug})")
    t = metrics["train"]
    doc.text(f"{t['steps']} training steps on {metrics['provenance']['device']} in {t['train_time_s']:.1f} s "
             f"({t['tokens_per_s']:,.0f} tokens/s). Headline: mean normalized error over positions "
             f"t ≥ {metrics['curves']['score_from']}.")
    summary = pd.DataFrame([{"predictor": metrics["model"] if n == "model" else n, "error": s["mean"],
                             "ci_low": s["ci"][0], "ci_high": s["ci"][1]}
                            for n, s in metrics["summary"].items()])
    doc.table(summary)
    doc.figure(error_curve_figure(metrics), f"{slug}-error",
               f"Normalized squared error per context position for {metrics['model']} and every baseline on "
               f"{metrics['task']}; shaded: bootstrap CI.")
    doc.table(curve_table(metrics))
    return metrics


def build_report(run_dirs: list[Path], out: Path, results: Path | None = None) -> tuple[Path, Path]:
    """Write report.md, report.html and figures/ under ``out`` for the given runs (and a leaderboard over
    ``results`` or over the runs' parent directories)."""
    from .leaderboard import aggregate, collect, wide

    out = Path(out)
    doc = Document(out, "iclbench report")
    roots = [results] if results is not None else sorted({Path(d).parent for d in run_dirs})
    frames = [collect(r) for r in roots]
    board = aggregate(pd.concat(frames)) if frames else pd.DataFrame()
    if not board.empty:
        doc.heading("Leaderboard")
        doc.text("Normalized squared error averaged over positions t ≥ each task's score_from (1.0 = predicting "
                 "the prior mean); mean ± sd over seeds, n = seeds.")
        table = wide(board).reset_index().rename(columns={"row": "model"})
        doc.table(table)
    for run_dir in run_dirs:
        run_section(doc, Path(run_dir))
    doc.text("Generated by `iclbench report`; the numbers come from each run's metrics.json "
             + json.dumps(sorted(str(d) for d in run_dirs)))
    return doc.write()
