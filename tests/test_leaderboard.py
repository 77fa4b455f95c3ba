import json
from pathlib import Path

from iclbench import store
from iclbench.leaderboard import aggregate, collect, render


def fake_run(root: Path, task, model, seed, err, base=0.5, task_cfg="t1", model_cfg="m1"):
    d = root / f"{task}-{model}-{model_cfg}{task_cfg}-s{seed}"
    store.write_json(d / "metrics.json", {
        "task": task, "model": model, "seed": seed, "config_hash": model_cfg + task_cfg, "config": {},
        "groups": {"task": task_cfg, "model": model_cfg},
        "summary": {"model": {"mean": err, "ci": [err, err]}, "copy_last": {"mean": base, "ci": [base, base]}},
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
    assert "0.0200 ± 0.0141 (n=2)" in text and "| baseline: copy_last" in text
    assert json.loads(render(tmp_path, "json"))[0]["kind"] == "model"
    assert render(tmp_path, "csv").splitlines()[0] == "kind,row,task,mean,sd,n_seeds"
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


def test_empty_results_dir(tmp_path):
    assert "no complete runs" in render(tmp_path / "nothing")
