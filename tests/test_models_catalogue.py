"""The model catalogue: named GPT depths and widths, attention-only twins, the LSTM reference row."""

import pytest
import torch

import iclbench
from conftest import overrides, tiny_run
from iclbench.config import resolve
from iclbench.errors import ICLBenchError
from iclbench.registry import get_registry


def build(name, n_ctx=16, **overrides):
    reg = get_registry()
    cfg = resolve(reg, task="affine", model=name, overrides=overrides)
    torch.manual_seed(0)
    return reg.model(name)(cfg.model_options, 1, 1, n_ctx).eval()


@pytest.mark.parametrize("name,layers,d_model,heads", [
    ("gpt1l", 1, 64, 4), ("gpt2l", 2, 64, 4), ("gpt3l", 3, 64, 4), ("gpt6l", 6, 64, 4), ("gpt12l", 12, 256, 8),
])
def test_gpt_catalogue_declares_its_shape_for_the_probes(name, layers, d_model, heads):
    for variant in (name, f"{name}-attn"):
        model = build(variant)
        assert (model.n_layers, model.n_heads, model.options.d_model) == (layers, heads, d_model)
        hooks = set(model.hook_points())
        assert f"blocks.{layers - 1}.attn.hook_pattern" in hooks and f"blocks.{layers}.hook_resid_post" not in hooks
        assert (f"blocks.0.hook_mlp_out" in hooks) == (not variant.endswith("-attn"))


def test_any_depth_width_and_heads_by_override():
    model = build("gpt3l", **{"model.n_layers": 4, "model.d_model": 48, "model.n_heads": 6})
    assert (model.n_layers, model.n_heads) == (4, 6)
    assert model.run_with_cache(torch.randn(2, 16, 1))[1]["blocks.3.attn.hook_z"].shape == (2, 16, 6, 8)
    with pytest.raises(ICLBenchError, match="divisible by n_heads"):
        build("gpt3l", **{"model.n_heads": 5})


def test_lstm_is_causal_hookable_and_declares_no_heads():
    model = build("lstm")
    assert model.n_heads == 0 and model.n_layers == 2
    assert {"hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"} <= set(model.hook_points())
    x = torch.randn(3, 16, 1)
    y = x.clone()
    y[:, 9:] += 5
    assert torch.allclose(model(x)[:, :9], model(y)[:, :9], atol=1e-6)
    assert not torch.allclose(model(x)[:, 9:], model(y)[:, 9:])
    out, cache = model.run_with_cache(x)
    # the last layer's hidden states through the read-out are the prediction (what the logit lens assumes)
    assert torch.allclose(model.readout(cache["blocks.1.hook_resid_post"]), out, atol=1e-6)
    patched = model.run_with_hooks(x, [("blocks.0.hook_resid_post", lambda t, hook: torch.zeros_like(t))])
    assert not torch.allclose(patched, out)
    assert abs(sum(p.numel() for p in model.parameters()) - 151297) < 5000  # about gpt3l's size


@pytest.mark.slow
def test_lstm_trains_on_affine_below_copy_last(tmp_path):
    result = iclbench.run("affine", "lstm", steps=300, out=str(tmp_path), overrides=overrides(tiny_run(sizes=False)) + ["model.d_model=48"])
    s = result.metrics["summary"]
    assert s["model"]["mean"] < 0.5 * s["copy_last"]["mean"], s


def test_only_gpt_exports_to_transformer_lens():
    with pytest.raises(ICLBenchError, match="no TransformerLens equivalent"):
        build("lstm").to_transformer_lens()
