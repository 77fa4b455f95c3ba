"""Each probe on hand-wired GPTs (tests/wired.py) must find what was wired and nothing that was not;
the probe and specialization commands store and combine what they find."""

import json

import pandas as pd
import pytest
import torch

import iclbench
from conftest import TINY, cli
from iclbench import Probe, hookimpl
from iclbench.probing import run_probes
from iclbench.registry import build_registry
from wired import RampTask, wired_gpt

ZERO_HEADS = ["L0H1", "L1H0", "L1H1"]  # never wired in the default wired_gpt (copy in 0, refine in 2)


@pytest.fixture(scope="module")
def task():
    return RampTask()


class BrokenProbe(Probe):
    name = "broken"
    description = "a third-party probe that fails"

    def run(self, model, task, generator, device):
        raise RuntimeError("boom")


class BrokenPlugin:
    @hookimpl
    def iclbench_probes(self):
        return [BrokenProbe]


@pytest.fixture(scope="module")
def probes(task):
    """Every registered probe on the wired model: copy head L0H0; refine layer 2 = L2H0 (+x_t) and the
    anti-copy head L2H1 (-x_{t-1}); everything else zero. A broken third-party probe rides along."""
    registry = build_registry(extra_plugins=[BrokenPlugin()])
    return run_probes(wired_gpt(), task, seed=0, device="cpu", registry=registry)


def table(probes, name):
    return probes[name]["table"]


def test_every_probe_ran_and_summaries_are_json(probes):
    assert set(probes) >= {"layer_lens", "ladder", "ablation", "attribution", "attention", "similarity",
                           "linear_probe", "patching", "specialization"}
    assert probes["broken"] == {"error": "RuntimeError: boom"}  # recorded; the others still ran
    for name, outcome in probes.items():
        if name == "broken":
            continue
        assert isinstance(outcome["table"], pd.DataFrame) and len(outcome["table"]), name
        json.dumps(outcome["summary"], allow_nan=False)


def test_layer_lens_reads_the_copy_after_layer0_and_the_answer_after_layer2(probes):
    s = probes["layer_lens"]["summary"]
    assert s["logit"]["0"]["distance"]["copy_last"]["mean"] < 1e-4  # layer 0 wrote x_t: the lens shows copy-last
    assert s["logit"]["0"]["nearest_baseline"] == "copy_last"
    assert s["logit"]["1"]["distance"]["copy_last"]["mean"] < 1e-4  # layer 1 does nothing
    err = {lens: {layer: v["error"]["mean"] for layer, v in s[lens].items()} for lens in ("logit", "tuned")}
    assert err["logit"]["0"] > 0.01  # ... and copying is not the answer
    assert err["logit"]["2"] < 1e-4 and s["logit"]["2"]["nearest_baseline"] == "extrapolate"
    assert err["logit"]["-1"] > 0.9  # the embedding writes nothing the read-out reads: predicts 0
    assert err["tuned"]["2"] < 1e-3 < err["tuned"]["1"]
    assert s["tuned"]["2"]["nearest_baseline"] == "extrapolate" and s["tuned"]["2"]["selectivity"]["ci"][0] > 0.5
    lo, hi = s["tuned"]["1"]["error"]["ci"]
    assert lo <= err["tuned"]["1"] <= hi and hi - lo < err["tuned"]["1"]  # an interval over probe sequences


def test_attribution_flags_exactly_the_wired_heads(probes):
    s = probes["attribution"]["summary"]
    assert s["anti_copy_heads"] == ["L2H1"]
    assert sorted(s["copy_heads"]) == ["L0H0", "L2H0"]
    c = s["components"]
    assert c["L0H0"]["corr_copy_last"] > 0.999 and c["L2H1"]["corr_attended"] < -0.999
    for name in ZERO_HEADS + ["embed", "mlp"]:
        assert c[name]["rms"] < 1e-4 and c[name]["flag"] == "", name
    assert s["sum_check_max_abs"] < 1e-4  # the parts add up to the prediction


def test_attention_stats_find_current_previous_and_uniform_heads(probes):
    s = probes["attention"]["summary"]
    assert s["L0H0"]["current"] > 0.99 and s["L2H0"]["current"] > 0.99
    assert s["L2H1"]["prev"] > 0.99
    assert s["L2H1"]["similar"] > 0.99  # in a ramp the previous value is the most similar one
    t = table(probes, "attention")
    zero = t[(t.layer == 0) & (t["head"] == 1)]
    current = zero[zero.stat == "current"].set_index("position")["value"]
    assert torch.allclose(torch.tensor(current.values), 1 / torch.arange(1, 9, dtype=torch.float64), atol=1e-5)
    pattern = t[(t.stat == "pattern") & (t.layer == 2) & (t["head"] == 1)]
    assert len(pattern) == 8 * 9 // 2  # causal mean pattern kept for plots


def test_ablation_costs_nothing_for_zero_components_and_the_closed_form_for_the_anti_copy_head(probes, task):
    t = table(probes, "ablation")
    for name in ZERO_HEADS + ["mlp0", "mlp1", "mlp2", "attn1"]:
        assert t[t.component == name].delta.abs().max() < 1e-6, name
    # zero-ablating L2H1 leaves 2 x_t instead of 2 x_t - x_{t-1}: error x_{t-1}^2 / normalizer
    batch = task.sample(256, torch.Generator().manual_seed(0))  # the probe's batch (same generator seed)
    expected = batch.inputs[:, :-1, 0].pow(2).mean(0) / task.normalizer()[1:]
    got = t[(t.component == "L2H1") & (t.method == "zero") & (t.position >= 1)].sort_values("position").error
    assert torch.allclose(torch.tensor(got.values, dtype=torch.float32), expected, rtol=1e-3)


def test_linear_probes_find_the_slope_only_where_it_is_computed(probes):
    s = probes["linear_probe"]["summary"]
    assert s["b"]["r2"]["2"] > 0.95 and s["b"]["best_layer"] == 2
    assert 2 in s["b"]["decoded_at"] and s["b"]["layers"]["2"]["gain"]["ci"][0] > 0.1  # beyond the controls
    assert s["decoy"]["decoded_at"] == []
    assert max(s["b"]["r2"][k] for k in ("-1", "0", "1")) < 0.8  # x_t alone says little about b
    assert all(abs(v) < 0.1 for v in s["decoy"]["r2"].values())  # nothing encodes an unused latent
    assert "x" not in s  # per-position latents are not probed


def test_patching_recovers_nothing_through_silent_heads_or_out_of_reach_positions(probes):
    s = probes["patching"]["summary"]
    for name in ZERO_HEADS:
        assert s["heads"][name] == 0.0
    assert s["heads"]["L0H0"] > 0.5 and s["heads"]["L2H1"] != 0
    t = table(probes, "patching")
    resid = t[t.site == "resid"]
    far = resid[resid.position >= resid.patch_position + 2]  # the wired model looks back one token at most
    assert far.recovery.abs().max() < 1e-5
    assert resid[resid.position == resid.patch_position].recovery.mean() > 0.3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe_results")
    return iclbench.run("affine", "gpt3l", steps=30, seed=0, out=str(out), overrides=TINY + ["eval.probes=false"])


@pytest.mark.slow
def test_probe_command_stores_summaries_and_tables_then_specialization_combines_them(tiny_run):
    d = tiny_run.run_dir
    assert not (d / "probes.json").exists()  # eval.probes=false
    out = cli("probe", str(d), "--probe", "attention", "--probe", "specialization")
    assert out.returncode == 0, out.stderr
    assert "role per layer" in out.stdout and "claim 1" in out.stdout
    record = json.loads((d / "probes.json").read_text())
    assert set(record["probes"]) == {"attention", "specialization"}
    assert sorted(p.name for p in (d / "probes").iterdir()) == ["attention.csv", "specialization.csv"]
    assert len(pd.read_csv(d / "probes" / "specialization.csv")) == 3
    assert not list(d.glob(".*.tmp")) and not list((d / "probes").glob(".*.tmp"))  # atomic writes
    spec = cli("specialization", "--results", str(d.parent), "--format", "plain")
    assert spec.returncode == 0, spec.stderr
    assert "affine" in spec.stdout and "gpt3l" in spec.stdout and "claim 1" in spec.stdout


@pytest.mark.parametrize("args,message", [
    (["--probe", "lens"], "unknown probe 'lens'"),
    (["--probe", "attention", "/nonexistent/run"], "not a finished run directory"),
])
@pytest.mark.slow
def test_probe_bad_input_one_line(tiny_run, args, message):
    run_dir = [] if "/nonexistent/run" in args else [str(tiny_run.run_dir)]
    out = cli("probe", *run_dir, *args)
    assert out.returncode == 2 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_tuned_lens_after_the_last_layer_reads_out_as_well_as_the_model(tiny_run):
    """Fitted on the scored positions of other sequences, the last layer's tuned lens can represent the
    model's own read-out, so its held-out error must not exceed the model's (fitted over every position it
    was about 2x worse on a trained affine model; on this barely trained one it may even be better)."""
    from iclbench.probes.lens import lens_distances

    task, model = tiny_run.task, tiny_run.model
    gen = torch.Generator().manual_seed(0)
    fit, test = task.sample(512, gen), task.sample(512, gen)
    d = lens_distances(task, model, fit, test)["tuned"][model.n_layers - 1]
    scored = slice(task.score_from, None)
    lens_err = float(d["target"][scored].mean())
    own = float(lens_distances(task, model, fit, test)["logit"][model.n_layers - 1]["target"][scored].mean())
    assert lens_err <= 1.05 * own


@pytest.mark.slow
def test_probe_seed_draws_another_sample_and_is_recorded(tiny_run):
    d = tiny_run.run_dir
    first = cli("probe", str(d), "--probe", "ladder", "--seed", "7")
    assert first.returncode == 0, first.stderr
    a = json.loads((d / "probes.json").read_text())["probes"]["ladder"]
    assert a["seed"] == 7
    cli("probe", str(d), "--probe", "ladder", "--seed", "8")
    b = json.loads((d / "probes.json").read_text())["probes"]["ladder"]
    assert b["seed"] == 8 and a["summary"]["layers"][0]["error"] != b["summary"]["layers"][0]["error"]
    bad = cli("probe", str(d), "--probe", "ladder", "--seed", "-1")
    assert bad.returncode == 2 and "--seed" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_runs_from_before_the_precision_rename_are_labelled_as_the_default():
    """train.precision "auto" (the old default's spelling) is "fp32": no "train.precision=auto" in row labels."""
    from iclbench.labels import config_label as _label

    assert _label("gpt3l", {}, {}, {"precision": "auto", "steps": 3000}) == "gpt3l"
    assert _label("gpt3l", {}, {}, {"precision": "bf16"}) == "gpt3l train.precision=bf16"
