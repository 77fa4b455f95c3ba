import pytest

from iclbench.config import resolve
from iclbench.errors import ICLBenchError
from iclbench.registry import get_registry

REG = get_registry()


def test_overrides_are_coerced_and_later_sources_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("task: {name: affine, noise: 0.1}\nmodel: gpt3l\ntrain: {steps: 7}\nseed: 3\n")
    cfg = resolve(REG, config=f, steps=9, overrides=["task.noise=0.2", "model.d_model=32", "train.lr=1e-3"])
    assert cfg.task_options.noise == 0.2 and cfg.train.steps == 9 and cfg.seed == 3
    assert cfg.model_options.d_model == 32 and cfg.train.lr == 1e-3
    assert cfg.to_dict()["model"]["n_layers"] == 3


def test_hash_ignores_seed_and_logging_but_not_options():
    base = resolve(REG, task="affine", model="gpt3l")
    assert resolve(REG, task="affine", model="gpt3l", seed=5).config_hash == base.config_hash
    assert resolve(REG, task="affine", model="gpt3l", overrides=["train.log_every=7"]).config_hash \
        == base.config_hash
    assert resolve(REG, task="affine", model="gpt3l", overrides=["task.noise=0.1"]).config_hash \
        != base.config_hash


@pytest.mark.parametrize("kwargs,message", [
    ({"task": "afine", "model": "gpt3l"}, "unknown task 'afine' (did you mean 'affine'"),
    ({"task": "affine", "model": "gpt3"}, "unknown model 'gpt3'"),
    ({"task": "affine", "model": "gpt3l", "overrides": ["task.nois=1"]}, "unknown key 'task.nois'"),
    ({"task": "affine", "model": "gpt3l", "overrides": ["trian.steps=1"]}, "unknown key 'trian.steps'"),
    ({"task": "affine", "model": "gpt3l", "steps": 0}, "steps must be > 0, got 0"),
    ({"task": "affine", "model": "gpt3l", "overrides": ["model.d_model=fast"]}, "expected int"),
    ({"task": "affine", "model": "gpt3l", "overrides": ["model.n_heads=3"]}, "divisible"),
    ({"model": "gpt3l"}, "no task given"),
])
def test_bad_values_name_the_key(kwargs, message):
    with pytest.raises(ICLBenchError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        resolve(REG, **kwargs)


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: affine\nmodel: [gpt3l\n")
    with pytest.raises(ICLBenchError, match=r"malformed YAML in .*bad.yaml line 3"):
        resolve(REG, config=bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("task: affine\nmodel: gpt3l\ntrian: {steps: 1}\n")
    with pytest.raises(ICLBenchError, match=r"unknown key 'trian' in .*unknown.yaml \(did you mean 'train'"):
        resolve(REG, config=unknown)
    with pytest.raises(ICLBenchError, match="cannot read config file"):
        resolve(REG, config=tmp_path / "missing.yaml")
