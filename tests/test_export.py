"""Reference models (issue 24, item 4): a finished run exported as weights + resolved config + manifest opens
with `iclbench probe` and iclbench.load without training, probes as the run does (within the storage dtype's
rounding), and is never written to; what is neither a run nor an export gets one line and a non-zero exit."""

import importlib.util
import json
import math

import pytest
import torch

import iclbench
from conftest import ROOT, cli, tiny_run
from iclbench.errors import ICLBenchError
from iclbench.export import TOLERANCE, within_tolerance
from test_hostile import main, one_line_refusal

#: the probes compared between a run and its export: every kind of summary (per layer, per head, labels)
PROBES = ("ladder", "attention", "specialization")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cheap affine run (no probes at training), its export by the command, and the run probed in place."""
    home = tmp_path_factory.mktemp("export")
    result = iclbench.run("affine", "gpt3l", steps=40, out=str(home / "results"),
                          overrides=tiny_run(cheap=True, eval__n_sequences=256, eval__bootstrap=50))
    exported = cli("export", str(result.run_dir), "--out", str(home / "models"))
    assert exported.returncode == 0, exported.stderr
    return home, result, home / "models" / result.run_dir.name, exported.stdout


def files(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}


def numbers(summary, path=""):
    """The leaves of a probe summary: {path: number or string}."""
    if isinstance(summary, dict):
        return {k: v for key, value in summary.items() for k, v in numbers(value, f"{path}/{key}").items()}
    if isinstance(summary, list):
        return {k: v for i, value in enumerate(summary) for k, v in numbers(value, f"{path}/{i}").items()}
    return {path: summary}


def test_export_writes_weights_config_and_a_manifest(trained):
    home, result, export, stdout = trained
    assert sorted(p.name for p in export.iterdir()) == ["config.yaml", "manifest.json", "model.safetensors"]
    assert (home / "models" / ".iclbench-not-runs").is_file()  # the leaderboard of a results dir skips exports
    m = json.loads((export / "manifest.json").read_text())
    metrics = result.metrics
    assert (m["task"], m["model"], m["seed"], m["config_hash"]) == ("affine", "gpt3l", 0, metrics["config_hash"])
    assert m["steps"] == 40 and m["stop"] == "steps" and m["dtype"] == "float16"
    assert m["error"] == metrics["summary"]["model"]
    assert m["learned"] == metrics["curves"]["predictors"]["model"]["excess_bayes"]["learned"]
    assert m["source"]["run"] == result.run_dir.name and "git_commit" in m["source"]
    # float32 re-evaluated here is the run's own number (same device, same evaluation set); the stored float16
    # weights' error agrees within the stated tolerance
    full, stored = m["reevaluated"]["float32"]["mean"], m["reevaluated"]["stored"]["mean"]
    assert math.isclose(full, m["error"]["mean"], rel_tol=1e-6)
    assert within_tolerance(stored, full) and abs(stored - full) <= TOLERANCE[0] * full + TOLERANCE[1]
    # half the bytes of the run's float32 weights (plus the header)
    assert m["bytes"] == (export / "model.safetensors").stat().st_size
    assert m["bytes"] < 0.55 * (result.run_dir / "model.safetensors").stat().st_size
    assert "affine × gpt3l seed 0, 40 steps" in stdout and "float16" in stdout


def test_a_folder_of_exports_holds_no_runs_whichever_folder_is_given(trained, tmp_path):
    """Exports are not runs: neither the folder the export command marked nor an export copied elsewhere is
    listed by the leaderboard (before the fix, `--results` on the marked folder listed each export as an
    incomplete run)."""
    home, _, export, _ = trained
    for given in (home / "models", export):
        printed = cli("leaderboard", "--results", str(given))
        assert "no complete runs under" in printed.stdout and "incomplete" not in printed.stdout + printed.stderr
    from iclbench.rundir import find_runs
    copy = tmp_path / "copied"  # an export copied without its folder's marker
    copy.mkdir()
    for f in export.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert find_runs(tmp_path) == [] and find_runs(home) == [home / "results" / export.name]


def test_load_opens_an_export_with_its_weights_rounded_and_its_manifest(trained):
    _, result, export, _ = trained
    run = iclbench.load(export)
    assert run.outcome == "exported" and run.metrics == {} and run.manifest["name"] == result.run_dir.name
    assert run.config.config_hash == result.metrics["config_hash"] and not run.model.training
    for name, weight in result.model.state_dict().items():
        assert torch.equal(run.model.state_dict()[name], weight.cpu().half().float()), name


def test_probing_an_export_equals_probing_its_run_and_writes_nothing_there(trained, tmp_path):
    home, result, export, _ = trained
    before = files(export)
    printed = cli("probe", str(export), *[a for p in PROBES for a in ("--probe", p)])
    assert printed.returncode == 0, printed.stderr
    assert "printed only" in printed.stdout and "role per layer" in printed.stdout
    stored = cli("probe", str(export), *[a for p in PROBES for a in ("--probe", p)], "--out", str(tmp_path / "p"))
    assert stored.returncode == 0, stored.stderr
    assert files(export) == before  # the export is never written to
    on_run = cli("probe", str(result.run_dir), *[a for p in PROBES for a in ("--probe", p)])
    assert on_run.returncode == 0, on_run.stderr
    ours = json.loads((tmp_path / "p" / "probes.json").read_text())["probes"]
    theirs = json.loads((result.run_dir / "probes.json").read_text())["probes"]
    assert sorted((tmp_path / "p" / "probes").iterdir()) and set(ours) == set(theirs) == set(PROBES)
    for probe in PROBES:
        assert ours[probe]["seed"] == theirs[probe]["seed"]
        a, b = numbers(ours[probe]["summary"]), numbers(theirs[probe]["summary"])
        assert a.keys() == b.keys(), probe
        for key in a:  # float16 weights: probe numbers within 1e-2 of the run's (labels the same)
            if isinstance(a[key], float) and isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-2, abs=1e-3), (probe, key)
            else:
                assert a[key] == b[key], (probe, key)


def test_probe_out_keeps_a_run_directory_as_it_was(trained, tmp_path):
    _, result, _, _ = trained
    before = files(result.run_dir)
    proc = cli("probe", str(result.run_dir), "--probe", "attention", "--out", str(tmp_path / "elsewhere"))
    assert proc.returncode == 0, proc.stderr
    assert f"-> {tmp_path / 'elsewhere' / 'probes' / 'attention.csv'}" in proc.stdout
    assert files(result.run_dir) == before
    assert (tmp_path / "elsewhere" / "probes" / "attention.csv").is_file()


def test_reference_models_script_exports_seed_zero_and_indexes_it(trained, tmp_path, capsys):
    home, result, _, _ = trained
    spec = importlib.util.spec_from_file_location("reference_models", ROOT / "experiments" / "reference_models.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    unfinished = home / "results" / "affine-gpt3l-00000000-s0"  # a run still training: skipped with a line
    unfinished.mkdir()
    (unfinished / "status.json").write_text('{"status": "running"}')
    assert script.main([str(home / "results"), "--out", str(tmp_path / "models")]) == 0
    out = capsys.readouterr()
    assert "skipped" in out.err and "affine-gpt3l-00000000-s0" in out.err and "1 exported" in out.out
    readme = (tmp_path / "models" / "README.md").read_text()
    assert f"[{result.run_dir.name}]({result.run_dir.name}/)" in readme and "| affine " in readme
    assert "| 40 " in readme and "1 models" in readme


@pytest.mark.parametrize("case", ["neither", "truncated", "manifest", "export-a-folder", "out-in-export",
                                  "train-into-export"])
def test_bad_input_is_one_line(trained, tmp_path, capsys, case):
    home, result, export, _ = trained
    copy = tmp_path / export.name
    copy.mkdir()
    for f in export.iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    if case == "neither":
        proc = main(capsys, "probe", str(tmp_path))
        one_line_refusal(proc, "is not a finished run directory", "nor an exported model")
    elif case == "truncated":
        weights = copy / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        proc = main(capsys, "probe", str(copy), "--probe", "attention")
        one_line_refusal(proc, "damaged weights", "export the run again")
        with pytest.raises(ICLBenchError, match="damaged weights"):
            iclbench.load(copy)
    elif case == "manifest":
        (copy / "manifest.json").write_text("[1, 2")
        one_line_refusal(main(capsys, "probe", str(copy)), "not a readable exported model")
    elif case == "export-a-folder":
        one_line_refusal(main(capsys, "export", str(tmp_path), "--out", str(tmp_path / "o")),
                         "is not a complete run directory")
        one_line_refusal(main(capsys, "export", str(copy), "--out", str(tmp_path / "o")), "already an exported model")
        assert not (tmp_path / "o").exists()
    elif case == "out-in-export":
        one_line_refusal(main(capsys, "probe", str(copy), "--out", str(copy / "probes")), "never written to")
        one_line_refusal(main(capsys, "probe", str(copy), "--out", str(home / "models")), "not written to")
    else:  # its config.yaml finds the export as "its run": refused, never trained into
        proc = main(capsys, "run", "--config", str(copy / "config.yaml"), "--quiet")
        one_line_refusal(proc, "is an exported reference model", "--out")
    assert sorted(p.name for p in copy.iterdir()) == ["config.yaml", "manifest.json", "model.safetensors"]


COMMITTED = ROOT / "results" / "reference" / "models"


def test_every_committed_reference_model_opens_and_is_indexed():
    """The committed reference models open without training: manifest, config and weights agree (config hash,
    storage dtype, finite weights that fit the configured model), and the folder's index lists each one."""
    from iclbench.export import is_export

    exports = sorted(p for p in COMMITTED.iterdir() if is_export(p))
    readme = (COMMITTED / "README.md").read_text()
    assert len(exports) >= 29 and f"{len(exports)} models" in readme
    for folder in exports:
        run = iclbench.load(folder)
        m = run.manifest
        assert m["config_hash"] == run.config.config_hash and m["name"] == folder.name, folder.name
        assert m["seed"] == 0 and m["dtype"] in ("float16", "float32") and m["label"]["task"] == run.config.task
        assert all(torch.isfinite(w).all() for w in run.model.state_dict().values()), folder.name
        assert f"[{folder.name}]({folder.name}/)" in readme


def test_probing_a_committed_reference_model_gives_its_runs_recorded_verdicts(tmp_path):
    """`iclbench probe` on a committed export reproduces the verdicts its run recorded in the study (the compact
    record under results/reference/records), and writes nothing into the export."""
    name = "affine-gpt2l-c8e38598-s0"
    export, record = COMMITTED / name, ROOT / "results" / "reference" / "records" / "converged-runs" / name
    before = files(export)
    proc = cli("probe", str(export), "--probe", "specialization", "--out", str(tmp_path / "p"))
    assert proc.returncode == 0, proc.stderr
    assert files(export) == before
    got = json.loads((tmp_path / "p" / "probes.json").read_text())["probes"]["specialization"]["summary"]
    want = json.loads((record / "probes.json").read_text())["probes"]["specialization"]["summary"]
    assert got["roles"] == want["roles"]
    for claim in ("claim_1", "claim_2", "refines_with_depth"):
        assert got[claim]["verdict"] == want[claim]["verdict"], claim
