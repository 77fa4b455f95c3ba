"""A third-party iclbench baseline for another plugin's task: linear extrapolation of the sine task,
y_{t+1} ~ 2 y_t - y_{t-1}, using only the inputs up to each position."""

import torch

from iclbench import Baseline, hookimpl


def extrapolate(batch):
    x = batch.inputs  # [B, T, 1]; the prediction at t may use x[:, :t+1] only
    previous = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # x[t-1], or x[0] at t = 0
    return 2 * x - previous


@hookimpl
def iclbench_baselines():
    return [Baseline(task="sine", name="extrapolate", fn=extrapolate,
                     description="linear extrapolation 2 y_t - y_(t-1)")]
