"""GPT-style decoders for real-valued sequences (nanoGPT's shape, TransformerLens's hook names).

Pre-LayerNorm blocks, causal softmax attention, GELU MLP, learned positions, a linear read-in of the real
inputs and a linear read-out. Attention runs fused (``scaled_dot_product_attention``) unless something hooks
``hook_attn_scores``/``hook_pattern``; then the explicit pattern is computed so it can be read or patched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import is_batchedtensor

from iclbench import Model, hookimpl
from iclbench.errors import ICLBenchError
from iclbench.gemm import Linear
from iclbench.model import HookPoint


@dataclass
class GPTOptions:
    n_layers: int = 3
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    attn_only: bool = False
    n_ctx: int = 0  # 0: the task's context length

    def validate(self):
        for key in ("n_layers", "d_model", "n_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.d_mlp < 1 and not self.attn_only:
            raise ValueError(f"d_mlp must be >= 1, got {self.d_mlp}")


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = Linear(d_model, 3 * d_model)
        self.out = Linear(d_model, d_model)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern, self.hook_z = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.d_head).unbind(2)  # [B, T, H, dh] each
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, dh]
        if self.hook_attn_scores.active or self.hook_pattern.active or is_batchedtensor(q):
            # (explicit also under vmap, i.e. seeds stacked: SDPA has no batching rule and would loop)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.d_head)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            scores = self.hook_attn_scores(scores.masked_fill(~causal, float("-inf")))
            pattern = self.hook_pattern(scores.softmax(-1))  # [B, H, T_q, T_k]
            z = pattern @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        z = self.hook_z(z.transpose(1, 2))  # [B, T, H, dh]
        return self.out(z.reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, o: GPTOptions):
        super().__init__()
        self.ln1 = nn.LayerNorm(o.d_model)
        self.attn = Attention(o.d_model, o.n_heads)
        self.attn_only = o.attn_only
        if not o.attn_only:
            self.ln2 = nn.LayerNorm(o.d_model)
            self.mlp = nn.Sequential(Linear(o.d_model, o.d_mlp), nn.GELU(), Linear(o.d_mlp, o.d_model))
            self.hook_mlp_out, self.hook_resid_mid = HookPoint(), HookPoint()
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x):
        x = self.hook_resid_pre(x)
        x = x + self.hook_attn_out(self.attn(self.ln1(x)))
        if not self.attn_only:
            x = self.hook_resid_mid(x)
            x = x + self.hook_mlp_out(self.mlp(self.ln2(x)))
        return self.hook_resid_post(x)


class FinalNorm(nn.LayerNorm):
    def __init__(self, d):
        super().__init__(d)
        self.hook_normalized = HookPoint()

    def forward(self, x):
        return self.hook_normalized(super().forward(x))


class GPT(Model):
    name = "gpt"
    description = "GPT-style decoder; depth/width/heads set by options"
    Options = GPTOptions

    def __init__(self, options: GPTOptions, d_in: int, d_out: int, n_ctx: int):
        super().__init__(options, d_in, d_out, max(n_ctx, options.n_ctx))
        o = options
        self.n_layers, self.n_heads = o.n_layers, o.n_heads
        self.embed = Linear(d_in, o.d_model)
        self.pos_embed = nn.Embedding(self.n_ctx, o.d_model)
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList(Block(o) for _ in range(o.n_layers))
        self.ln_final = FinalNorm(o.d_model)
        self.unembed = Linear(o.d_model, d_out)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.out.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * o.n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        T = inputs.shape[1]
        if T > self.n_ctx:
            raise ICLBenchError(f"sequence of {T} positions is longer than this model's n_ctx={self.n_ctx}; "
                                "train with --set model.n_ctx=N to evaluate longer contexts")
        pos_embed = self.pos_embed.weight[:T].expand(inputs.shape[0], T, -1)  # [B, T, d] as in TL, no copy
        x = self.hook_embed(self.embed(inputs)) + self.hook_pos_embed(pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_final(x))

    def to_transformer_lens(self):
        from .gpt_lens import to_transformer_lens

        return to_transformer_lens(self)


def _catalogue() -> list[type[GPT]]:
    """The named configurations. gpt1l..gpt6l keep the seed paper's width (d_model 64, 4 heads, d_mlp 256)
    so depth is the only thing that changes; gpt12l is Garg et al.'s standard model (12 layers, d_model 256,
    8 heads). Each has an attention-only twin (``gpt3l-attn``) whose circuits are easier to read."""
    width = dict(d_model=64, n_heads=4, d_mlp=256)
    shapes = {1: width, 2: width, 3: width, 6: width, 12: dict(d_model=256, n_heads=8, d_mlp=1024)}
    models = []
    for layers, shape in shapes.items():
        size = f"{layers}-layer GPT, d_model {shape['d_model']}, {shape['n_heads']} heads"
        note = {3: " (the seed paper's model)", 12: " (Garg et al.'s standard)"}.get(layers, "")
        models.append(GPT.variant(f"gpt{layers}l", size + note, n_layers=layers, **shape))
        models.append(GPT.variant(f"gpt{layers}l-attn", f"attention-only {size}", n_layers=layers,
                                  attn_only=True, **shape))
    return models


MODELS = _catalogue()


@hookimpl
def iclbench_models():
    return MODELS
