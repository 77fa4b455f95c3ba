"""An LSTM reference model: the leaderboard's non-transformer row, with the GPTs' read-in/read-out contract.

Linear read-in of the real inputs, ``n_layers`` stacked LSTM layers, linear read-out. The hook points a
recurrent model can honestly offer carry the transformer names probes already iterate: ``hook_embed`` (the
read-in) and ``blocks.{l}.hook_resid_post`` (the hidden state sequence after layer ``l``). No attention,
so ``n_heads = 0``. The defaults give about as many parameters as gpt3l (149k against 151k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from iclbench import Model, hookimpl
from iclbench.gemm import Linear
from iclbench.model import HookPoint


@dataclass
class LSTMOptions:
    n_layers: int = 2
    d_model: int = 96  # hidden size

    def validate(self):
        for key in ("n_layers", "d_model"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


class LSTMBlock(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.lstm = nn.LSTM(d_model, d_model, batch_first=True)
        self.hook_resid_post = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_resid_post(self.lstm(x)[0])


class LSTM(Model):
    name = "lstm"
    description = "2-layer LSTM, hidden 96 (a non-transformer reference, about gpt3l's size)"
    Options = LSTMOptions
    n_heads = 0

    def __init__(self, options: LSTMOptions, d_in: int, d_out: int, n_ctx: int):
        super().__init__(options, d_in, d_out, n_ctx)
        self.n_layers = options.n_layers
        self.embed = Linear(d_in, options.d_model)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(LSTMBlock(options.d_model) for _ in range(options.n_layers))
        self.ln_final = nn.Identity()  # no final norm; named so Model.readout (the logit lens) applies
        self.unembed = Linear(options.d_model, d_out)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.hook_embed(self.embed(inputs))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_final(x))


@hookimpl
def iclbench_models():
    return [LSTM]
