import pytest
import torch

from iclbench.errors import ICLBenchError
from iclbench.models.gpt import GPT, GPTOptions
from iclbench.registry import get_registry


def make(**kw):
    torch.manual_seed(0)
    return GPT(GPTOptions(**kw), d_in=1, d_out=1, n_ctx=16).eval()


def test_gpt3l_is_registered_with_the_seed_papers_depth():
    cls = get_registry().model("gpt3l")
    model = cls(cls.Options(), 1, 1, 16)
    assert model.n_layers == 3 and model.n_heads == 4


def test_transformerlens_hook_names_exist():
    names = set(make().hook_points())
    expected = {"hook_embed", "hook_pos_embed", "ln_final.hook_normalized"}
    for layer in range(3):
        expected |= {f"blocks.{layer}.{n}" for n in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                                                     "hook_attn_out", "hook_mlp_out")}
        expected |= {f"blocks.{layer}.attn.{n}" for n in ("hook_q", "hook_k", "hook_v", "hook_pattern",
                                                          "hook_z", "hook_attn_scores")}
    assert expected <= names


def test_fused_and_explicit_attention_agree():
    model = make()
    x = torch.randn(8, 16, 1)
    fused = model(x)
    explicit, cache = model.run_with_cache(x, names_filter="blocks.*.attn.hook_pattern")
    assert torch.allclose(fused, explicit, atol=1e-5)
    pattern = cache["blocks.1.attn.hook_pattern"]
    assert pattern.shape == (8, 4, 16, 16)
    assert torch.allclose(pattern.sum(-1), torch.ones(8, 4, 16), atol=1e-5)
    assert float(pattern.triu(1).abs().max()) == 0.0  # causal


def test_causality_future_inputs_do_not_change_past_outputs():
    model = make()
    x = torch.randn(4, 16, 1)
    y = x.clone()
    y[:, 9:] += 5
    assert torch.allclose(model(x)[:, :9], model(y)[:, :9], atol=1e-5)
    assert not torch.allclose(model(x)[:, 9:], model(y)[:, 9:])


def test_run_with_cache_shapes_and_residual_decomposition():
    model = make()
    x = torch.randn(2, 16, 1)
    out, cache = model.run_with_cache(x)
    assert cache["blocks.0.attn.hook_q"].shape == (2, 16, 4, 16)  # [batch, pos, head, d_head]
    assert cache["blocks.0.attn.hook_z"].shape == (2, 16, 4, 16)
    resid = cache["hook_embed"] + cache["hook_pos_embed"]
    for layer in range(3):
        resid = resid + cache[f"blocks.{layer}.hook_attn_out"] + cache[f"blocks.{layer}.hook_mlp_out"]
        assert torch.allclose(resid, cache[f"blocks.{layer}.hook_resid_post"], atol=1e-5)
    assert torch.allclose(model.unembed(model.ln_final(resid)), out, atol=1e-5)


def test_run_with_hooks_patches_and_hooks_are_removed_afterwards():
    model = make()
    x = torch.randn(2, 16, 1)
    clean = model(x)
    zeroed = model.run_with_hooks(x, [("blocks.*.hook_mlp_out", lambda t, hook: torch.zeros_like(t))])
    assert not torch.allclose(clean, zeroed)
    assert all(not p.active for p in model.hook_points().values())
    assert torch.equal(model(x), clean)
    with pytest.raises(ICLBenchError, match="no hook point"):
        model.run_with_hooks(x, [("blocks.9.hook_nothing", lambda t, hook: t)])


def test_attention_only_variant_and_context_limit():
    model = make(attn_only=True, n_layers=2)
    assert "blocks.0.hook_mlp_out" not in model.hook_points()
    assert model(torch.randn(1, 16, 1)).shape == (1, 16, 1)
    with pytest.raises(ICLBenchError, match="n_ctx=16"):
        model(torch.randn(1, 17, 1))
