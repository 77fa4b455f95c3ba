"""A third-party iclbench probe: the residual stream's RMS after each layer, per position; with its figure
and section in `iclbench report`, what a tracker records, a cross-run table and the command printing it."""

import pandas as pd

from iclbench import Probe, ProbeFigure, ProbeResult, hookimpl


class ResidNorm(Probe):
    name = "resid_norm"
    description = "RMS of the residual stream after each layer, per position"
    requires_hooks = ("blocks.{layer}.hook_resid_post",)  # missing -> skipped, with the hook named
    n_sequences = 256

    def run(self, model, task, generator, device):
        batch = task.sample(self.n_sequences, generator, generator.device).to(device)
        names = [f"blocks.{l}.hook_resid_post" for l in range(model.n_layers)]
        _, cache = model.run_with_cache(batch.inputs, names_filter=names)
        rows = [{"layer": l, "position": t, "rms": float(v)}
                for l, name in enumerate(names)
                for t, v in enumerate(cache[name].pow(2).mean(-1).sqrt().mean(0))]
        table = pd.DataFrame(rows, columns=["layer", "position", "rms"])
        summary = {"rms_by_layer": [round(float(v), 6) for v in table.groupby("layer")["rms"].mean()]}
        return ProbeResult(table, summary)

    # presentation: read from what a run stored (table, summary; run = its metrics.json), never the model

    @classmethod
    def figures(cls, table, summary, run):
        from iclbench.report import pyplot  # matplotlib, headless

        fig, ax = pyplot().subplots(figsize=(6, 3.5))
        for layer, rows in table.groupby("layer"):
            ax.plot(rows.position, rows.rms, marker="o", label=f"after layer {layer}")
        ax.set_xlabel("context position")
        ax.set_ylabel("residual RMS")
        ax.legend()
        return [ProbeFigure("resid_norm", fig, f"Residual RMS per position: {run['model']} on {run['task']}.")]

    @classmethod
    def tracker_summary(cls, summary):
        return {"last_layer_rms": summary["rms_by_layer"][-1]}

    @classmethod
    def cross_run_table(cls, runs):
        return pd.DataFrame({"task": runs.task, "model": runs.model, "seed": runs.seed,
                             "last_layer_rms": [s["rms_by_layer"][-1] for s in runs.summary]})


def resid_norm_command(args):
    from iclbench.probing import cross_run

    print(cross_run(args.results, "resid_norm", "plain"))
    return 0


@hookimpl
def iclbench_probes():
    return [ResidNorm]


@hookimpl
def iclbench_add_commands(subparsers):
    p = subparsers.add_parser("resid-norm", help="last layer's residual RMS of every run")
    p.add_argument("--results", default="results")
    p.set_defaults(iclbench_command=resid_norm_command)
