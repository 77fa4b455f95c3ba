"""The TransformerLens export computes the same function and caches the same activations under the same
names. Skipped when transformer-lens (the optional extra ``iclbench[tl]``) is not installed."""

import pytest
import torch

pytest.importorskip("transformer_lens")

from iclbench.models.gpt import GPT, GPTOptions  # noqa: E402


@pytest.mark.parametrize("options", [GPTOptions(n_layers=2), GPTOptions(n_layers=2, attn_only=True),
                                     GPTOptions(n_layers=1, d_model=32, n_heads=8, d_mlp=48)])
def test_export_gives_same_outputs_and_same_cache(options):
    torch.manual_seed(0)
    model = GPT(options, d_in=2, d_out=3, n_ctx=12).eval()
    with torch.no_grad():  # non-trivial LayerNorm gains and biases, so a mixed-up mapping shows
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5)
    tl = model.to_transformer_lens()
    x = torch.randn(4, 12, 2)
    ours, cache = model.run_with_cache(x)
    theirs, tl_cache = tl.run_with_cache(x)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert set(cache) <= set(tl_cache.keys())
    for name, act in cache.items():
        assert act.shape == tl_cache[name].shape, name
        assert torch.allclose(act, tl_cache[name], atol=1e-5), name
    # patching through the same name changes both models the same way
    zero = [("blocks.0.hook_attn_out", lambda t, hook: torch.zeros_like(t))]
    assert torch.allclose(model.run_with_hooks(x, zero), tl.run_with_hooks(x, fwd_hooks=zero), atol=1e-5)
