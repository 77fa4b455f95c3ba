"""What the scalar sequence tasks share: one value per position, noisy observation of clean states."""

from __future__ import annotations

import torch

from iclbench import Task
from iclbench.task import Batch


def observe(x: torch.Tensor, noise: float, generator) -> torch.Tensor:
    return x + noise * torch.randn(x.shape, generator=generator, device=x.device) if noise else x


def copy_last(batch: Batch) -> torch.Tensor:
    """The last value seen, y_t."""
    return batch.inputs.clone()


class Recurrence(Task):
    """Shared shape of the scalar tasks: one value per position, every position scored."""

    score_from = 3
    #: ``features(y [B, T]) -> [B, T, k]``: the regressors of one transition, built causally (the rule maps
    #: them at t to y_{t+1}); gives :meth:`rule_features` for the algorithm ladder
    transition_features = None

    def rule_features(self, batch):
        if self.transition_features is None:
            return None
        return type(self).transition_features(batch.inputs[..., 0].double()).float(), batch.mask

    @property
    def d_in(self):
        return 1

    @property
    def d_out(self):
        return 1

    @property
    def context_len(self):
        return self.options.context_len

    def batch(self, x, latents, generator, mask=None) -> Batch:
        """Observe the clean states ``x [B, T+1]`` and cut them into inputs and next-value targets."""
        y = observe(x, self.options.noise, generator)
        T = x.shape[1] - 1
        mask = torch.ones(T, dtype=torch.bool, device=x.device) if mask is None else mask
        return Batch(inputs=y[:, :-1, None], targets=y[:, 1:, None], mask=mask, latents={**latents, "x": x})
