"""A third-party iclbench task: continue a sinusoid whose amplitude, frequency and phase are new in
every sequence, y_t = A * sin(w * t + phi)."""

from dataclasses import dataclass

import torch

from iclbench import Batch, Task, hookimpl


@dataclass
class SineOptions:
    context_len: int = 16
    max_freq: float = 1.0  # w ~ U[0.1, max_freq]; A ~ U[0.5, 1.5]; phi ~ U[0, 2 pi]


class SineTask(Task):
    name = "sine"
    description = "continue a sinusoid with random amplitude, frequency and phase"
    Options = SineOptions
    score_from = 3

    d_in = d_out = 1  # one real value per position

    @property
    def context_len(self):
        return self.options.context_len

    def sample(self, n, generator, device="cpu"):
        T = self.options.context_len
        u = torch.rand(n, 3, generator=generator, device=device)
        amp, freq, phase = 0.5 + u[:, 0], 0.1 + (self.options.max_freq - 0.1) * u[:, 1], 6.2832 * u[:, 2]
        t = torch.arange(T + 1, device=device)
        y = amp[:, None] * torch.sin(freq[:, None] * t + phase[:, None])
        return Batch(inputs=y[:, :-1, None], targets=y[:, 1:, None],
                     mask=torch.ones(T, dtype=torch.bool, device=device),
                     latents={"amp": amp, "freq": freq, "phase": phase})

    def baselines(self):
        return {"copy_last": lambda batch: batch.inputs.clone()}


@hookimpl
def iclbench_tasks():
    return [SineTask]
