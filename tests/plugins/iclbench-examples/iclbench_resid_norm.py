"""A third-party iclbench probe: the residual stream's RMS after each layer, per position."""

import pandas as pd

from iclbench import Probe, ProbeResult, hookimpl


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


@hookimpl
def iclbench_probes():
    return [ResidNorm]
