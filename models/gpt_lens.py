"""Export a GPT to a TransformerLens 2.x ``HookedTransformer`` (optional: ``pip install 'iclbench[tl]'``).

TransformerLens embeds integer tokens; our models read real values through a linear map. The export keeps
everything else TransformerLens's own (blocks, LayerNorms, unembed, hook points, ``run_with_cache``) and
swaps only that one step: :class:`RealValuedHookedTransformer` replaces ``embed`` by the same
``nn.Linear(d_in, d_model)`` and overrides ``input_to_embed`` to feed it the ``[batch, pos, d_in]`` inputs,
then adds TransformerLens's own positional embedding. So ``hook_embed`` and ``hook_pos_embed`` fire as in
any HookedTransformer, and every hook point our GPT has holds the same tensor under the same name::

    from iclbench.models.gpt_lens import to_transformer_lens
    tl_model = to_transformer_lens(model)         # same outputs as model(inputs)
    logits, cache = tl_model.run_with_cache(inputs)  # cache["blocks.0.attn.hook_pattern"], ...

Weight layout: our fused ``qkv`` Linear is split into TransformerLens's per-head ``W_Q/W_K/W_V
[head, d_model, d_head]``, ``out`` into ``W_O [head, d_head, d_model]``, the MLP's Linears into
``W_in/W_out``; LayerNorms map to ``w/b``; ``unembed`` to ``W_U/b_U`` (``d_vocab_out = d_out``).
"""

from __future__ import annotations

import torch
from torch import nn

from iclbench.errors import ICLBenchError

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError as exc:  # the optional extra is absent
    raise ICLBenchError("TransformerLens export needs transformer-lens 2.x: pip install 'iclbench[tl]' "
                        f"({exc})") from None


class RealValuedHookedTransformer(HookedTransformer):
    """A HookedTransformer whose embedding is a linear read-in of real-valued inputs ``[batch, pos, d_in]``."""

    def __init__(self, cfg: HookedTransformerConfig, d_in: int):
        super().__init__(cfg)
        self.embed = nn.Linear(d_in, cfg.d_model, device=cfg.device, dtype=cfg.dtype)
        self.setup()  # re-index the hook points after swapping a module

    def input_to_embed(self, input, prepend_bos=None, padding_side=None, attention_mask=None,
                       past_kv_cache=None):
        if attention_mask is not None or past_kv_cache is not None:
            raise ValueError("real-valued inputs have no padding or KV cache")
        embed = self.hook_embed(self.embed(input))  # [batch, pos, d_model]
        residual, shortformer_pos_embed = self.get_residual(embed, 0, return_shortformer_pos_embed=True)
        return residual, None, shortformer_pos_embed, None


def transformer_lens_config(model) -> HookedTransformerConfig:
    """The HookedTransformer configuration identical to ``model``'s (a :class:`~iclbench.models.gpt.GPT`)."""
    o = model.options
    device = next(model.parameters()).device
    return HookedTransformerConfig(
        n_layers=o.n_layers, d_model=o.d_model, n_heads=o.n_heads, d_head=o.d_model // o.n_heads,
        d_mlp=None if o.attn_only else o.d_mlp, attn_only=o.attn_only, act_fn=None if o.attn_only else "gelu",
        n_ctx=model.n_ctx, d_vocab=model.d_in, d_vocab_out=model.d_out, normalization_type="LN", eps=1e-5,
        positional_embedding_type="standard", default_prepend_bos=False, device=str(device), seed=None,
    )


@torch.no_grad()
def to_transformer_lens(model) -> RealValuedHookedTransformer:
    """A HookedTransformer with ``model``'s configuration and weights (same outputs, same hook names)."""
    if not hasattr(model, "blocks") or not hasattr(model, "pos_embed"):
        raise ICLBenchError(f"cannot export {type(model).__name__} to TransformerLens: only GPT models export")
    o = model.options
    H, dh, d = o.n_heads, o.d_model // o.n_heads, o.d_model
    tl = RealValuedHookedTransformer(transformer_lens_config(model), model.d_in)
    tl.embed.load_state_dict(model.embed.state_dict())
    tl.pos_embed.W_pos.copy_(model.pos_embed.weight)
    for ours, theirs in zip(model.blocks, tl.blocks):
        w = ours.attn.qkv.weight.view(3, H, dh, d)  # rows of the fused Linear: (q|k|v, head, d_head)
        b = ours.attn.qkv.bias.view(3, H, dh)
        for i, name in enumerate("QKV"):
            getattr(theirs.attn, f"W_{name}").copy_(w[i].transpose(1, 2))  # [head, d_model, d_head]
            getattr(theirs.attn, f"b_{name}").copy_(b[i])
        theirs.attn.W_O.copy_(ours.attn.out.weight.T.reshape(H, dh, d))
        theirs.attn.b_O.copy_(ours.attn.out.bias)
        theirs.ln1.w.copy_(ours.ln1.weight)
        theirs.ln1.b.copy_(ours.ln1.bias)
        if not o.attn_only:
            theirs.ln2.w.copy_(ours.ln2.weight)
            theirs.ln2.b.copy_(ours.ln2.bias)
            theirs.mlp.W_in.copy_(ours.mlp[0].weight.T)
            theirs.mlp.b_in.copy_(ours.mlp[0].bias)
            theirs.mlp.W_out.copy_(ours.mlp[2].weight.T)
            theirs.mlp.b_out.copy_(ours.mlp[2].bias)
    tl.ln_final.w.copy_(model.ln_final.weight)
    tl.ln_final.b.copy_(model.ln_final.bias)
    tl.unembed.W_U.copy_(model.unembed.weight.T)
    tl.unembed.b_U.copy_(model.unembed.bias)
    return tl.train(model.training)
