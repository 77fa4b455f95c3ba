"""A third-party iclbench model: an MLP that sees the last `window` inputs at each position (causal by
construction), with the hook points the built-in residual-stream probes read."""

from dataclasses import dataclass

import torch
from torch import nn

from iclbench import HookPoint, Model, hookimpl


@dataclass
class WindowMLPOptions:
    window: int = 4  # inputs x[t-window+1 .. t] feed position t
    d_model: int = 64
    n_layers: int = 2

    def validate(self):  # called on the resolved options; a ValueError is shown as a config error
        if self.window < 1 or self.d_model < 1 or self.n_layers < 1:
            raise ValueError("window, d_model and n_layers must be >= 1")


class Block(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_model), nn.GELU())
        self.hook_resid_pre, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x):
        x = self.hook_resid_pre(x)
        return self.hook_resid_post(x + self.mlp(x))


class WindowMLP(Model):
    name = "window_mlp"
    description = "MLP over the last few inputs (a non-attention reference)"
    Options = WindowMLPOptions
    n_heads = 0  # no attention: the attention probes are skipped, saying so

    def __init__(self, options, d_in, d_out, n_ctx):
        super().__init__(options, d_in, d_out, n_ctx)
        self.n_layers = options.n_layers
        self.embed = nn.Linear(options.window * d_in, options.d_model)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(Block(options.d_model) for _ in range(options.n_layers))
        self.ln_final = nn.LayerNorm(options.d_model)  # Model.readout = unembed(ln_final(resid))
        self.unembed = nn.Linear(options.d_model, d_out)

    def forward(self, inputs):  # [B, T, d_in] -> [B, T, d_out]
        k = self.options.window
        padded = nn.functional.pad(inputs, (0, 0, k - 1, 0))  # zeros before the first input
        windows = padded.unfold(1, k, 1).transpose(2, 3).flatten(2)  # [B, T, k * d_in], causal
        x = self.hook_embed(self.embed(windows))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_final(x))


@hookimpl
def iclbench_models():
    return [WindowMLP]
