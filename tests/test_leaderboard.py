import json
from pathlib import Path

import pytest

from iclbench import store
from conftest import cli
from iclbench.leaderboard import aggregate, collect, compare, render, wide


def fake_run(root: Path, task, model, seed, err, base=0.5, task_cfg="t1", model_cfg="m1", ci=0.0, config=None):
    """A run whose curves are flat at ``err`` (model) and ``base`` (copy_last) over positions 0..3, with an
    oracle at 0 and the zero predictor at 1.0 (``config``: its resolved config, {} by default)."""
    d = root / f"{task}-{model}-{model_cfg}{task_cfg}-s{seed}"
    flat = lambda v: {"mean": v, "ci": [v - ci, v + ci], "curve": [v] * 4}  # noqa: E731
    store.write_json(d / "metrics.json", {
        "task": task, "model": model, "seed": seed, "config_hash": model_cfg + task_cfg, "config": config or {},
        "groups": {"task": task_cfg, "model": model_cfg},
        "summary": {"model": flat(err), "copy_last": flat(base), "oracle": flat(0.0)},
        "curves": {"positions": [0, 1, 2, 3], "predictors": {"model": flat(err), "copy_last": flat(base),
                                                             "oracle": flat(0.0)}},
        "reference": {"zero": {"mean": 1.0, "curve": [1.0] * 4}},
    })
    return d


def test_mean_over_seeds_with_counts_and_configs_kept_apart(tmp_path):
    fake_run(tmp_path, "affine", "gpt3l", 0, 0.01)
    fake_run(tmp_path, "affine", "gpt3l", 1, 0.03)
    fake_run(tmp_path, "affine", "gpt3l", 0, 0.5, model_cfg="m2")  # same name, other config
    fake_run(tmp_path, "linreg", "gpt3l", 0, 0.2, base=0.9)
    agg = aggregate(collect(tmp_path))
    row = agg[(agg.row == "gpt3l@m1") & (agg.task == "affine")].iloc[0]
    assert abs(row["mean"] - 0.02) < 1e-12 and row["n_seeds"] == 2
    assert set(agg[agg.kind == "model"].row) == {"gpt3l@m1", "gpt3l@m2"}
    # baselines: a row of their own, one value per seed even when several models evaluated it
    base = agg[(agg.row == "baseline: copy_last") & (agg.task == "affine")].iloc[0]
    assert base["mean"] == 0.5 and base["n_seeds"] == 2
    text = render(tmp_path, "github")
    # ± is the 95% Student-t interval over the two seeds (t = 12.706), as the specialization table's
    assert "0.0200 ± 0.1271 (n=2)" in text and "| baseline: copy_last" in text
    assert "95% Student-t interval over seeds" in text.splitlines()[0]
    assert json.loads(render(tmp_path, "json"))[0]["kind"] == "model"
    assert render(tmp_path, "csv").splitlines()[0] == ("kind,row,task,mean,sd,n_seeds,ci_half,learned,config,"
                                                       "task_config")
    assert "\\begin{tabular}" in render(tmp_path, "latex")


def test_damaged_run_directories_are_skipped_with_a_warning(tmp_path):
    fake_run(tmp_path, "affine", "gpt3l", 0, 0.01)
    broken = tmp_path / "affine-gpt3l-x-s1"
    broken.mkdir()
    (broken / "metrics.json").write_text('{"task": "affine", "mod')  # half-written by a crash
    unfinished = tmp_path / "affine-gpt3l-y-s2"
    store.write_yaml(unfinished / "config.yaml", {"task": {"name": "affine"}})
    warnings = []
    agg = aggregate(collect(tmp_path, warn=warnings.append))
    assert len(agg[agg.kind == "model"]) == 1
    assert len(warnings) == 2
    assert any(str(broken) in w and "unreadable metrics.json" in w for w in warnings)
    assert any(str(unfinished) in w and "incomplete" in w for w in warnings)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    store.write_json(tmp_path / "a.json", {"x": 1})
    store.write_json(tmp_path / "a.json", {"x": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}


@pytest.mark.slow
def test_empty_results_dir(tmp_path):
    assert "no complete runs" in render(tmp_path)
    out = cli("leaderboard", "--results", str(tmp_path / "nothing"))
    assert out.returncode == 2 and out.stderr.strip() == (f"iclbench: error: results directory "
                                                          f"'{tmp_path / 'nothing'}' does not exist (pass --results DIR)")


def test_excess_and_icl_score_known_values(tmp_path):
    fake_run(tmp_path, "affine", "gpt3l", 0, 0.2, base=0.6)
    excess = aggregate(collect(tmp_path, metric="excess"))
    icl = aggregate(collect(tmp_path, metric="icl_score"))
    pick = lambda agg, row: float(agg[agg.row == row]["mean"].iloc[0])  # noqa: E731
    # the oracle (0.0) is a reference, not a competitor: the best baseline is copy_last at 0.6
    assert abs(pick(excess, "gpt3l") + 0.4) < 1e-12
    assert abs(pick(icl, "gpt3l") - (1 - 0.2) / (1 - 0.6)) < 1e-12
    assert abs(pick(icl, "baseline: copy_last") - 1.0) < 1e-12


@pytest.mark.slow
def test_filters_and_compare(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for seed, err in enumerate([0.10, 0.11, 0.09]):
        fake_run(a, "affine", "gpt3l", seed, err, model_cfg="lr1")
        fake_run(b, "affine", "gpt3l", seed, err + 0.2, model_cfg="lr2")  # clearly worse
    fake_run(a, "affine", "gpt1l", 0, 0.3, ci=0.05)
    fake_run(b, "affine", "gpt1l", 0, 0.31, ci=0.05)  # within the CI
    fake_run(a, "linreg", "gpt3l", 0, 0.5, model_cfg="lr1")
    only = aggregate(collect(a), tasks=["affine"], models=["gpt1l"])
    assert set(only.row) == {"gpt1l", "baseline: copy_last", "baseline: oracle"} and set(only.task) == {"affine"}
    diff = compare(a, b).set_index(["row", "task"])
    assert abs(diff.loc[("gpt3l", "affine"), "B - A"] - 0.2) < 1e-9
    assert diff.loc[("gpt3l", "affine"), "exceeds CI"] == "yes"
    assert diff.loc[("gpt1l", "affine"), "exceeds CI"] == "no"
    assert ("gpt3l", "linreg") not in diff.index  # only what both sides have
    out = cli("leaderboard", "--compare", str(a), str(b), "--format", "plain")
    assert out.returncode == 0 and "exceeds CI" in out.stdout
    out = cli("leaderboard", "--results", str(a), "--metric", "icl_score", "--from", "2", "--task", "affine")
    assert out.returncode == 0 and "icl_score (positions t >= 2)" in out.stdout and "linreg" not in out.stdout
    bad = cli("leaderboard", "--compare", str(a), str(tmp_path / "missing"))
    assert bad.returncode == 2 and "is not a directory" in bad.stderr


def test_a_tasks_own_training_defaults_do_not_split_a_model_row(tmp_path):
    # regression tasks train at their own lr, so gpt1l's model+train hash differs between the two columns
    fake_run(tmp_path, "affine", "gpt1l", 0, 0.1, model_cfg="x")
    fake_run(tmp_path, "linreg", "gpt1l", 0, 0.2, model_cfg="y")
    agg = aggregate(collect(tmp_path))
    assert set(agg[agg.kind == "model"].row) == {"gpt1l"}


def resolved(task, model, *overrides):
    from iclbench.config import resolve
    from iclbench.registry import get_registry

    cfg = resolve(get_registry(), task=task, model=model, overrides=list(overrides))
    return cfg, {"task_cfg": cfg.section_hash("task", "eval"), "model_cfg": cfg.section_hash("model", "train"),
                 "config": cfg.to_dict()}


def test_rows_and_columns_are_labelled_by_the_settings_that_differ(tmp_path):
    for noise in (None, "0.1"):
        for steps in (None, "600"):
            sets = [f"task.noise={noise}"] * bool(noise) + [f"train.steps={steps}"] * bool(steps)
            _, kw = resolved("affine", "gpt2l", *sets)
            fake_run(tmp_path, "affine", "gpt2l", 0, 0.1, **kw)
    agg = aggregate(collect(tmp_path))
    assert set(agg.task) == {"affine", "affine noise=0.1"}
    assert set(agg[agg.kind == "model"].row) == {"gpt2l", "gpt2l train.steps=600"}
    assert "@" not in render(tmp_path, "github")
    tidy = json.loads(render(tmp_path, "json"))
    assert {r["task"] for r in tidy} == {"affine", "affine noise=0.1"}
    assert all(len(r["task_config"]) == 8 for r in tidy)  # the hashes stay, for machines
    assert {len(r["config"]) for r in tidy} == {0, 8}  # baselines have no model configuration


def test_configurations_that_read_the_same_keep_their_hash(tmp_path):
    _, kw = resolved("affine", "gpt2l", "train.steps=600")
    fake_run(tmp_path, "affine", "gpt2l", 0, 0.1, **kw)
    fake_run(tmp_path, "affine", "gpt2l", 0, 0.2, **{**kw, "model_cfg": "other"})  # same settings, other hash
    rows = set(aggregate(collect(tmp_path)).query("kind == 'model'").row)
    assert rows == {f"gpt2l train.steps=600@{kw['model_cfg']}", "gpt2l train.steps=600@other"}


def test_a_model_trained_alike_on_every_task_reads_as_one_labelled_row(tmp_path):
    for task in ("affine", "linreg"):
        _, kw = resolved(task, "gpt2l", "train.steps=600")
        fake_run(tmp_path, task, "gpt2l", 0, 0.1, **kw)
    agg = aggregate(collect(tmp_path))
    assert set(agg[agg.kind == "model"].row) == {"gpt2l train.steps=600"}


def test_compare_writes_only_the_table_to_stdout_and_says_which_settings_differ(tmp_path, capsys):
    from iclbench.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    for root, lr, err in ((a, "0.001", 0.1), (b, "0.0001", 0.3)):
        _, kw = resolved("affine", "gpt3l", f"train.lr={lr}")
        fake_run(root, "affine", "gpt3l", 0, err, **kw)
    assert main(["leaderboard", "--compare", str(a), str(b), "--format", "latex"]) == 0
    out, err = capsys.readouterr()
    assert out.lstrip().startswith("\\begin{tabular}") and "error:" not in out
    assert "gpt3l" in out  # one configuration a side: matched by name
    assert f"A = {a}, B = {b}" in err and "train.lr: 0.001 → 0.0001" in err
    assert not err.startswith("error")


def test_paste_ready_latex_and_markdown(tmp_path, capsys):
    from iclbench.cli import main

    fake_run(tmp_path, "affine", "gpt3l", 0, 0.01)
    fake_run(tmp_path, "affine", "gpt3l", 1, 0.03)
    fake_run(tmp_path, "linreg", "gpt1l", 0, 0.2)  # the gpt1l × affine cell is empty ("—")
    latex = render(tmp_path, "latex")
    assert all(rule in latex for rule in ("\\toprule", "\\midrule", "\\bottomrule")) and "\\hline" not in latex
    assert "$\\pm$" in latex and "---" in latex and "baseline: copy\\_last" in latex
    assert not any(sym in latex for sym in "±→—") and latex.isascii()
    assert main(["leaderboard", "--results", str(tmp_path), "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert out == render(tmp_path, "github") + "\n" and "|" in out


def test_copies_of_a_run_are_counted_once_with_one_warning(tmp_path):
    import shutil

    first = tmp_path / "first"
    for seed in (0, 1):
        fake_run(first, "affine", "gpt3l", seed, 0.01 + seed / 100)
    shutil.copytree(first, tmp_path / "copy")  # the same runs again, in a second folder
    fake_run(tmp_path / "copy", "affine", "gpt3l", 2, 0.03)  # a genuinely new seed there
    warnings = []
    agg = aggregate(collect(tmp_path, warn=warnings.append))
    row = agg[agg.row == "gpt3l"].iloc[0]
    assert row["n_seeds"] == 3 and abs(row["mean"] - 0.02) < 1e-12
    assert len(warnings) == 1 and "2 run directories are copies" in warnings[0]
    assert "\n" not in warnings[0] and "counted once" in warnings[0]


def test_copies_count_once_in_probe_tables_and_report_sections(tmp_path, capsys):
    import shutil

    from iclbench.probing import collect_probe
    from iclbench.rundir import distinct_runs, find_runs

    _, kw = resolved("affine", "gpt2l", "task.noise=0.1")
    for seed in (0, 1):
        d = fake_run(tmp_path / "first", "affine", "gpt2l", seed, 0.1, **kw)
        store.write_json(d / "probes.json", {"probes": {"some_probe": {"summary": {"x": seed}}}})
    shutil.copytree(tmp_path / "first", tmp_path / "copy")
    runs = collect_probe(tmp_path, "some_probe")
    assert sorted(runs.seed) == [0, 1] and set(runs.task) == {"affine noise=0.1"}
    assert capsys.readouterr().err.count("counted once") == 1
    kept = distinct_runs(find_runs(tmp_path))  # what the report makes its sections of
    assert [p.parent.name for p in kept] == ["copy", "copy"]
    assert capsys.readouterr().err == ""  # warned once in this process already


def test_a_report_section_names_the_settings_that_distinguish_its_run():
    from iclbench.report import section_title

    _, kw = resolved("affine", "gpt2l", "task.noise=0.1", "train.steps=600")
    assert section_title({"task": "affine", "model": "gpt2l", "config": kw["config"]}) == \
        "affine noise=0.1 × gpt2l train.steps=600"
    assert section_title({"task": "affine", "model": "gpt2l", "config": {}}) == "affine × gpt2l"


def test_report_leaderboard_cells_link_to_runs_under_readable_labels(tmp_path):
    from iclbench.leaderboard import wide
    from iclbench.report import leaderboard_links, run_anchors

    _, kw = resolved("affine", "gpt2l", "task.noise=0.1", "train.steps=600")
    run = fake_run(tmp_path, "affine", "gpt2l", 0, 0.1, **kw)
    tidy = collect(tmp_path)
    table = wide(aggregate(tidy)).reset_index().rename(columns={"row": "model"})
    assert list(table.columns) == ["model", "affine noise=0.1"]
    links = leaderboard_links(table, tidy, run_anchors([run]))
    assert links[(0, "model")] == links[(0, "affine noise=0.1")] == run_anchors([run])[str(run.resolve())]


def test_the_report_writes_no_negative_zeros(tmp_path):
    import pandas as pd

    from iclbench.report import Document, no_negative_zero

    assert no_negative_zero("-0.0000 [-0.0000, -0.0000]") == "0.0000 [0.0000, 0.0000]"
    assert no_negative_zero("-0.0001, -0.00001, 1e-0, x-0.0, -1.0000") == "-0.0001, -0.00001, 1e-0, x-0.0, -1.0000"
    doc = Document(tmp_path, "t")
    doc.text("oracle -0.0000 [-0.0000, -0.0000]")
    doc.table(pd.DataFrame({"name": ["oracle", "model"], "error": [-1e-7, -0.25], "ci": ["[-0.0000, 0.0]", "x"]}))
    md, page = doc.markdown(), doc.html()
    assert "-0.0000" not in md and "-0.0000" not in page
    assert "-0.2500" in md and "-0.2500" in page


def test_an_ood_skip_message_does_not_widen_the_table():
    from iclbench.cli import format_ood

    flat = {"mean": 0.1, "ci": [0.1, 0.1]}
    reason = "sequence of 32 positions is longer than the model's context of 16 " * 2
    m = {"model": "gpt3l", "summary": {"model": flat, "bayes": flat},
         "ood": {"scale_x2": {"summary": {"model": flat, "bayes": flat}}, "long": {"skipped": reason.strip()}}}
    lines = format_ood(m).splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 4 and max(map(len, table)) < 60
    assert lines[-1] == f"long: skipped: {reason.strip()}"


def test_the_specialization_table_for_a_paper_is_narrow(tmp_path, capsys):
    from iclbench.cli import main

    est = {"mean": 0.5, "ci": [0.4, 0.6]}
    summary = {"roles": ["copy_last", "bayes"], "claim_1": {"verdict": "n/a"},
               "claim_2": {"verdict": "holds", "any_later_layer": "holds"},
               "refines_with_depth": {"verdict": "holds", "relative_gain": est}, "model_error": est}
    _, kw = resolved("affine", "gpt2l", "task.noise=0.1")
    for seed in (0, 1):
        d = fake_run(tmp_path, "affine", "gpt2l", seed, 0.1, **kw)
        store.write_json(d / "probes.json", {"probes": {"specialization": {"summary": summary}}})
    assert main(["specialization", "--results", str(tmp_path), "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    header = latex.splitlines()[2]
    assert header.count("&") == 6 and "layer 0" not in latex and "\\toprule" in latex
    assert "affine noise=0.1" in latex and "refinement first" not in latex
    assert main(["specialization", "--results", str(tmp_path), "--format", "csv"]) == 0
    assert "layer 0" in capsys.readouterr().out  # the details stay in CSV


def test_the_specialization_table_gives_the_leaderboards_error(tmp_path):
    from iclbench.probing import collect_probe
    from iclbench.registry import get_registry

    probe_set = {"mean": 0.9, "ci": [0.8, 1.0]}  # the probe's own sample: not what the leaderboard reports
    summary = {"roles": ["copy_last"], "claim_1": {"verdict": "n/a"},
               "claim_2": {"verdict": "n/a", "any_later_layer": "n/a"},
               "refines_with_depth": {"verdict": "n/a", "relative_gain": probe_set}, "model_error": probe_set}
    _, kw = resolved("affine", "gpt2l")
    for seed, err in ((0, 0.004), (1, 0.006)):
        d = fake_run(tmp_path, "affine", "gpt2l", seed, err, **kw)
        store.write_json(d / "probes.json", {"probes": {"specialization": {"summary": summary}}})
    runs = collect_probe(tmp_path, "specialization")
    table = get_registry().probe("specialization").cross_run_table(runs)
    board = aggregate(collect(tmp_path))
    mean = float(board[board.row == "gpt2l"]["mean"].iloc[0])
    assert table["model error"].iloc[0].startswith(f"{mean:.4f} [")
    # one interval kind for one quantity: the leaderboard's ± is the specialization interval's half-width
    half = float(board[board.row == "gpt2l"]["ci_half"].iloc[0])
    assert table["model error"].iloc[0] == f"{mean:.4f} [{mean - half:.4f}, {mean + half:.4f}]"
    cell = wide(board).loc["gpt2l"].iloc[0]
    assert cell.startswith(f"{mean:.4f} ± {half:.4f} (n=2)")


def test_each_table_says_what_its_interval_is(tmp_path, capsys):
    from iclbench.cli import main

    est = {"mean": 0.5, "ci": [0.4, 0.6]}
    summary = {"roles": ["copy_last"], "claim_1": {"verdict": "n/a"},
               "claim_2": {"verdict": "n/a", "any_later_layer": "n/a"},
               "refines_with_depth": {"verdict": "n/a", "relative_gain": est}, "model_error": est}
    _, kw = resolved("affine", "gpt2l")
    for seed in (0, 1):
        d = fake_run(tmp_path, "affine", "gpt2l", seed, 0.1 + seed / 100, **kw)
        store.write_json(d / "probes.json", {"probes": {"specialization": {"summary": summary}}})
    assert main(["specialization", "--results", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "95% Student-t interval over seeds" in err and "the leaderboard's number" in err and "Student" not in out
    assert main(["leaderboard", "--results", str(tmp_path)]) == 0
    assert "95% Student-t interval over seeds" in capsys.readouterr().out.splitlines()[0]
    assert main(["leaderboard", "--compare", str(tmp_path), str(tmp_path)]) == 0
    assert "Student-t over seeds" in capsys.readouterr().err


def test_loggers_record_the_readable_label_beside_the_hash():
    from iclbench.loggers.common import flat_config

    cfg, _ = resolved("affine", "gpt2l", "task.noise=0.1", "train.steps=600")
    params = flat_config(cfg)
    assert params["label"] == "affine noise=0.1 × gpt2l train.steps=600"
    assert params["config_hash"] == cfg.config_hash


def test_the_error_plots_legend_hides_no_curve():
    from iclbench.report import error_curve_figure

    flat = lambda v: {"curve": [v] * 4, "curve_lo": [v] * 4, "curve_hi": [v] * 4}  # noqa: E731
    names = ["model", "bayes", "least_squares", "copy_last", "averaging", "ridge", "knn"]
    metrics = {"task": "affine", "model": "gpt3l", "seed": 0,
               "curves": {"positions": [0, 1, 2, 3], "score_from": 1,
                          "predictors": {n: flat(0.1 * (i + 1)) for i, n in enumerate(names)}}}
    fig = error_curve_figure(metrics)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend, plot = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert not legend.overlaps(plot) and legend.y1 <= plot.y0
    assert len(ax.get_legend().get_texts()) == len(names) + 1  # every curve and the prior mean


def test_a_damaged_copy_never_hides_the_healthy_run(tmp_path):
    import shutil

    good = fake_run(tmp_path / "b", "affine", "gpt3l", 0, 0.01)
    bad = shutil.copytree(good, tmp_path / "a" / good.name)  # found first
    metrics = json.loads((bad / "metrics.json").read_text())
    (bad / "metrics.json").write_text(json.dumps({**metrics, "summary": [1]}))
    warnings = []
    table = collect(tmp_path, warn=warnings.append)
    assert set(table.run) == {str(good)} and len(warnings) == 1 and "damaged" in warnings[0]
