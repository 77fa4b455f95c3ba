"""The built-in probes' figures, drawn from a run's stored probe tables (probes/<name>.csv); each probe's
``figures`` method returns them (:meth:`iclbench.Probe.figures`) and ``iclbench report`` places them."""

from __future__ import annotations

import pandas as pd

from iclbench.report import pyplot


def run_title(run: dict) -> str:
    """'gpt3l on affine, seed 0': the run a figure belongs to, for its title."""
    return f"{run['model']} on {run['task']}, seed {run['seed']}"


def layer_names(layers) -> list[str]:
    return ["embed" if int(layer) < 0 else f"L{int(layer)}" for layer in layers]


def lens_figure(table: pd.DataFrame, score_from: int, title: str):
    """Per-layer read-outs (logit lens through the model's own final norm and read-out; tuned lens fitted
    per layer): distance to the target and to each baseline, averaged over positions >= score_from."""
    plt = pyplot()
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
        ax.set_xticks(layers, layer_names(layers))
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("residual stream after layer")
        ax.set_title(f"{lens} lens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"normalized squared distance (t >= {score_from})")
    # under the panels, not over a curve (the best place inside an axes can still cover one)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(4, len(labels)), frameon=False)
    fig.suptitle(title)
    return fig


def attention_figure(table: pd.DataFrame, title: str):
    """Mean attention pattern (query position × key position) of every head, one panel per layer × head."""
    plt = pyplot()
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

    plt = pyplot()
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
    plt = pyplot()
    part = table[table.position >= score_from].groupby(["latent", "layer"], as_index=False)["r2"].mean()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for latent, rows in part.groupby("latent"):
        rows = rows.sort_values("layer")
        ax.plot(rows.layer, rows.r2, marker="o", label=str(latent))
    layers = sorted(part.layer.unique())
    ax.set_xticks(layers, layer_names(layers))
    ax.set_ylim(min(0.0, float(part.r2.min()) - 0.05), 1.02)
    ax.set_xlabel("residual stream after layer")
    ax.set_ylabel(f"held-out R² (mean over t >= {score_from})")
    ax.set_title(title)
    ax.legend(title="latent", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the axes
    ax.grid(alpha=0.3)
    return fig


def ladder_figure(table: pd.DataFrame, title: str):
    """Layers × algorithms (crude → refined): distance between each layer's tuned-lens read-out and each
    algorithm's prediction (log colour scale); the nearest algorithm of each layer is outlined."""
    import numpy as np

    plt = pyplot()
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
