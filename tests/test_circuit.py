"""The circuit probe on hand-wired GPTs whose circuit is known (tests/wired.py): the planted edges and only
those, a cancelling pair left out, a redundant (backup) pair, faithfulness by running the pruned model, no
circuit for an untrained model, and the random-edge control."""

import math

import matplotlib
import matplotlib.figure
import pandas as pd
import pytest
import torch

from iclbench.probes.circuit import (Circuit, Graph, Setup, circuit, circuit_figure, circuit_overlap, edge_forward,
                                     faithfulness)
from iclbench.probes.common import head_writes, probe_batch
from iclbench.probing import run_probes
from iclbench.registry import get_registry
from wired import D_HEAD, RampTask, _sigma, _wire_head, wired_gpt

matplotlib.use("Agg")

COPY = [("embed", "L0ATTN"), ("L0H0", "out")]
PLANTED = COPY + [("embed", "L2ATTN"), ("L2H0", "out"), ("L2H1", "out")]


def find(model, target=0.99, seed=0, n=256):
    summary, table = circuit(model, RampTask(), torch.Generator().manual_seed(seed), "cpu", n, target=target)
    return summary, table


def edges(summary):
    return sorted(tuple(e) for e in summary["edges"])


def test_the_planted_circuit_and_only_it_is_recovered():
    s, table = find(wired_gpt())
    assert edges(s) == sorted(PLANTED)
    assert s["heads"] == ["L0H0", "L2H0", "L2H1"] and s["heads_by_layer"] == {"0": ["H0"], "2": ["H0", "H1"]}
    assert s["faithfulness"]["ci"][0] > 0.99 and s["reaches_target"] == "holds"
    assert s["edge_fraction"] == pytest.approx(5 / len(table))
    assert set(table.loc[table["in_circuit"], ["sender", "receiver"]].itertuples(index=False)) == set(PLANTED)


def test_at_the_default_target_the_copy_path_suffices():
    """Against a resampled ramp, copying y_t recovers ~97% of the gap (the refinement only adds b - b'): the
    smallest circuit at 0.9 is the copy path, the refinement enters at targets above ~0.975."""
    s, _ = find(wired_gpt(), target=0.9)
    assert edges(s) == sorted(COPY)
    assert 0.95 < s["faithfulness"]["mean"] < 0.99


def test_a_head_cancelled_by_another_is_left_out():
    """L1H0 writes 5 x_t into the output, L1H1 writes -5 x_t: each edge scores large, together they do nothing."""
    model = wired_gpt()
    with torch.no_grad():
        _wire_head(model.blocks[1], 0, attend="current", write=5.0)
        _wire_head(model.blocks[1], 1, attend="current", write=-5.0)
    s, table = find(model)
    scores = table.set_index(["sender", "receiver"])["score"]
    assert abs(scores[("L1H0", "out")]) > abs(scores[("L2H1", "out")])  # ranked above planted edges ...
    assert edges(s) == sorted(PLANTED)  # ... and still left out


def backup_gpt():
    """L0H0 copies x_t; L2H0 is its backup: it writes x_t minus what L0H0 wrote (0 in every normal run), so
    either route alone gives x_t."""
    model = wired_gpt(refine_layer=None)
    with torch.no_grad():
        _wire_head(model.blocks[2], 0, attend="current", write=1.0)
        v = 2 * 16 + 0 * D_HEAD
        model.blocks[2].attn.qkv.weight[v, 8], model.blocks[2].attn.qkv.weight[v, 9] = -_sigma() / 2, _sigma() / 2
    return model


def test_a_redundant_pair_keeps_one_route_and_either_suffices():
    model, task = backup_gpt(), RampTask()
    backup = [("embed", "L2ATTN"), ("L2H0", "out")]
    s, _ = find(model)
    # one route, not both: here the backup's (on the joint path the backup cancels L0H0's input edge's gradient,
    # so that edge scores ~0; which route is kept is the ranking's choice, the faithfulness is run)
    assert edges(s) in (sorted(COPY), sorted(backup)) and s["faithfulness"]["mean"] == pytest.approx(1, abs=1e-4)
    gen = torch.Generator().manual_seed(1)
    clean, corrupt = probe_batch(task, 128, gen, "cpu"), probe_batch(task, 128, gen, "cpu")
    assert faithfulness(model, task, clean, corrupt, COPY) == pytest.approx(1, abs=1e-4)
    assert faithfulness(model, task, clean, corrupt, backup) == pytest.approx(1, abs=1e-4)
    assert faithfulness(model, task, clean, corrupt, []) == pytest.approx(0, abs=1e-6)


@torch.no_grad()
def test_the_pruned_model_is_run_and_equals_a_direct_patch():
    model, task = wired_gpt(), RampTask()
    gen = torch.Generator().manual_seed(2)
    clean, corrupt = probe_batch(task, 64, gen, "cpu"), probe_batch(task, 64, gen, "cpu")
    setup = Setup(model, task, Graph(model), clean, corrupt)
    g = setup.graph
    E = len(g.edges)

    def run(drop):
        keep = torch.ones(1, E)
        keep[0, [g.index[e] for e in drop]] = 0
        return edge_forward(model, g, clean.inputs, keep, setup.acts_x)

    assert torch.allclose(edge_forward(model, g, clean.inputs, torch.ones(1, E), setup.acts_x), model(clean.inputs))
    assert torch.allclose(edge_forward(model, g, clean.inputs, torch.zeros(1, E), setup.acts_x), model(corrupt.inputs),
                          atol=1e-5)
    # every edge out of L2H1 removed = L2H1's output patched from the counterfactual (a node patch)
    _, cache = model.run_with_cache(corrupt.inputs, names_filter=["blocks.2.attn.hook_z"])

    def node(z, hook):
        z = z.clone()
        z[:, :, 1] = cache["blocks.2.attn.hook_z"][:, :, 1]
        return z

    direct = model.run_with_hooks(clean.inputs, [("blocks.2.attn.hook_z", node)])
    assert torch.allclose(run([e for e in g.edges if e[0] == "L2H1"]), direct, atol=1e-5)
    # one edge, L0H0 -> out: only the read-out sees the counterfactual write; layer 2 still reads the clean one
    _, cc = model.run_with_cache(clean.inputs, names_filter=["blocks.0.attn.hook_z"])

    def edge(resid, hook):
        w = lambda z: head_writes(model, z, 0)[:, :, 0]  # noqa: E731
        return resid - w(cc["blocks.0.attn.hook_z"]) + w(cache_x["blocks.0.attn.hook_z"])

    _, cache_x = model.run_with_cache(corrupt.inputs, names_filter=["blocks.0.attn.hook_z"])
    direct = model.run_with_hooks(clean.inputs, [("blocks.2.hook_resid_post", edge)])
    assert torch.allclose(run([("L0H0", "out")]), direct, atol=1e-5)
    # and the reported faithfulness is that run's
    err = setup.errors(setup.mask([g.index[e] for e in g.edges if e != ("L0H0", "out")])[None])
    f = float(setup.faithfulness(err)[0])
    by_hand = (setup.corrupted.mean() - setup.error(direct).mean()) / (setup.corrupted - setup.full).mean()
    assert f == pytest.approx(float(by_hand), rel=1e-5)


def test_an_untrained_model_has_no_circuit():
    registry = get_registry()
    task = registry.task("affine")()
    cls = registry.model("gpt3l")
    torch.manual_seed(0)
    model = cls(cls.Options(), task.d_in, task.d_out, task.context_len).eval()
    out = run_probes(model, task, ["circuit"], seed=0, device="cpu")["circuit"]
    s = out["summary"]
    assert s["learned"] == "not learned" and s["circuit"] == "not learned" and s["edges"] == []
    assert s["faithfulness"] is None and out["table"].empty
    assert matplotlib.figure.Figure == type(circuit_figure(s))


def test_the_circuit_beats_random_edge_sets_of_its_size():
    s, _ = find(wired_gpt())
    assert s["random_faithfulness"]["mean"] < 0.5 < s["faithfulness"]["ci"][0]
    assert s["vs_random"]["verdict"] == "holds"


def test_registered_probe_cross_run_table_overlap_and_figure():
    model, task = wired_gpt(), RampTask()
    out = run_probes(model, task, ["circuit"], seed=0, device="cpu")["circuit"]
    s = out["summary"]
    assert edges(s) == sorted(COPY) and {"sender", "receiver", "score", "in_circuit"} <= set(out["table"])
    full, _ = find(model)
    runs = pd.DataFrame([{"task": "ramp", "model": m, "seed": i, "summary": x, "learned": "learned"}
                         for m, xs in (("wired", [s, s, full]), ("wired-full", [full, full]))
                         for i, x in enumerate(xs)])
    table = Circuit.cross_run_table(runs).set_index("model")
    assert table.loc["wired", "circuits"] == 3 and table.loc["wired", "layer 2 heads"] == "H0 1/3, H1 1/3"
    assert table.loc["wired-full", "edges Jaccard"].startswith("1.00")
    assert table.loc["wired", "edges Jaccard"].startswith(f"{(1 + 0.4 + 0.4) / 3:.2f}")
    overlap = circuit_overlap(runs)
    assert len(overlap) == 1 and set(overlap.iloc[0]["shared edges"].split(", ")) == {"embed->L0ATTN", "L0H0->out"}
    assert overlap.iloc[0]["edges Jaccard"] == pytest.approx((2 * 2 * 0.4 + 2 * 1) / 6, abs=1e-6)
    fig = circuit_figure(full)
    assert len([t for t in fig.axes[0].texts if t.get_bbox_patch()]) == len(full["nodes"]) and not math.isnan(full["faithfulness"]["mean"])


def test_plain_gradient_is_blind_at_a_perfect_model_integrated_gradients_are_not():
    """The wired model's error is 0: the gradient at the clean run vanishes, so plain attribution patching
    (``ig_steps=0``) scores every edge ~0; the integrated gradient scores the planted edges."""
    model, task = wired_gpt(), RampTask()
    gen = torch.Generator().manual_seed(3)
    setup = Setup(model, task, Graph(model), probe_batch(task, 64, gen, "cpu"), probe_batch(task, 64, gen, "cpu"))
    from iclbench.probes.circuit import edge_scores
    plain, ig = edge_scores(setup, 0), edge_scores(setup, 5)
    assert plain.abs().max() < 1e-4 * ig.abs().max()
    top = {setup.graph.edges[i] for i in ig.abs().argsort(descending=True)[:5].tolist()}
    assert top == set(PLANTED)


@pytest.mark.parametrize("name", ["gpt2l", "gpt2l-attn"])
def test_edge_patching_reproduces_the_model_with_and_without_mlps(name):
    registry = get_registry()
    task = registry.task("affine")()
    cls = registry.model(name)
    torch.manual_seed(0)
    model = cls(cls.Options(), task.d_in, task.d_out, task.context_len).eval()
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = probe_batch(task, 16, gen, "cpu"), probe_batch(task, 16, gen, "cpu")
    setup = Setup(model, task, Graph(model), clean, corrupt)
    E = len(setup.graph.edges)
    assert (E == 33) == (name == "gpt2l") and all(setup.graph.mlp) == (name == "gpt2l")
    with torch.no_grad():
        assert torch.allclose(edge_forward(model, setup.graph, clean.inputs, torch.ones(1, E), setup.acts_x),
                              model(clean.inputs), atol=1e-5)
        assert torch.allclose(edge_forward(model, setup.graph, clean.inputs, torch.zeros(1, E), setup.acts_x),
                              model(corrupt.inputs), atol=1e-5)


def test_cross_run_table_of_cells_of_other_depths_and_an_unlearned_seed():
    s, _ = find(wired_gpt())
    shallow = dict(s, graph=dict(s["graph"], n_layers=1), edges=[list(e) for e in COPY], nodes=["embed", "L0ATTN",
                   "L0H0", "out"], heads=["L0H0"], heads_by_layer={"0": ["H0"]}, edge_fraction=0.1)
    runs = pd.DataFrame([{"task": "ramp", "model": "deep", "seed": 0, "summary": s, "learned": "learned"},
                         {"task": "ramp", "model": "deep", "seed": 1, "summary": {"circuit": "not learned"},
                          "learned": "not learned"},
                         {"task": "ramp", "model": "shallow", "seed": 0, "summary": shallow, "learned": "learned"},
                         {"task": "ramp", "model": "shallow", "seed": 1, "summary": shallow, "learned": "learned"}])
    table = Circuit.cross_run_table(runs).set_index("model")
    assert table.loc["deep", "seeds"] == 2 and table.loc["deep", "circuits"] == 1
    assert table.loc["shallow", "layer 2 heads"] == "—" and table.loc["shallow", "edge fraction"] == "0.10 [0.10, 0.10]"
    assert circuit_overlap(runs).iloc[0]["edges Jaccard"] == pytest.approx(0.4)


def test_the_circuit_presents_itself_in_the_report_and_the_terminal():
    summary = run_probes(wired_gpt(), RampTask(), ["circuit"], seed=0, device="cpu")["circuit"]["summary"]
    (fig,) = Circuit.figures(None, summary, {})
    assert fig.name == "circuit" and "faithfulness" in fig.caption
    assert Circuit.terminal_lines(summary)[0].startswith("circuit: 2 edges")
    assert Circuit.tracker_summary(summary)["faithfulness"] == summary["faithfulness"]["mean"]
