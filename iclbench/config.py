"""Run configuration: YAML file + CLI shortcuts + ``--set key=value`` overrides, validated up front.

Resolved form (what ``config.yaml`` in a run directory holds)::

    task:  {name: affine, context_len: 16, ...}     # the task's Options, every field
    model: {name: gpt3l, n_layers: 3, ...}          # the model's Options, every field
    train: {steps: ..., batch_size: ..., lr: ...}   # TrainOptions
    eval:  {n_sequences: ..., seed: ..., ...}       # EvalOptions
    seed: 0
    device: auto
    out: results
    log: [mlflow, tensorboard]                     # optional run loggers (not hashed)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ICLBenchError, did_you_mean
from .options import build_options, parse_scalar
from .registry import Registry


@dataclass
class TrainOptions:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 200
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (= fp32 on every device, the faster one measured on CUDA), fp32, or bf16 autocast
    log_every: int = 100
    checkpoint_every: int = 500  # save the whole training state every N steps (0: never), for --resume
    compile: bool = False  # torch.compile the model for training (--compile)
    #: positions the loss averages: "scored" = the task's scored positions from its summary start
    #: (``score_from``) on, where the model is judged; "all" = every scored position, including the first
    #: ones whose Bayes error is irreducible (1.0 at t = 0 on affine) and would dominate the loss. Measured on
    #: gpt3l/affine, 1500 steps, seed 0: "scored" halves the error at t >= 3 (0.00065 [0.00060, 0.00074] against
    #: 0.00127 [0.00116, 0.00141]) but leaves t = 0, 1, 2 untrained (4.1, 2.9, 0.71 against 0.98, 0.18, 0.006),
    #: which the curves, the report and the probes read; so the default stays "all"
    loss_positions: str = "all"

    def validate(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be > 0, got {self.steps}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup, grad_clip and weight_decay must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.log_every <= 0:
            raise ValueError(f"log_every must be > 0, got {self.log_every}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.loss_positions not in ("all", "scored"):
            raise ValueError(f"loss_positions must be all or scored, got {self.loss_positions!r}")


@dataclass
class EvalOptions:
    n_sequences: int = 4096
    seed: int = 20240601  # the evaluation set depends on this only, not on the run's seed
    bootstrap: int = 1000
    confidence: float = 0.95
    score_from: int = -1  # first position in the summary mean; -1: the task's default
    ood: bool = True  # also evaluate the task's distribution shifts (metrics['ood'])
    probes: bool = True  # run the registered probes after evaluation (probes.json, probes/*.csv)

    def validate(self):
        if self.n_sequences < 2:
            raise ValueError(f"n_sequences must be >= 2, got {self.n_sequences}")
        if self.bootstrap < 1:
            raise ValueError(f"bootstrap must be >= 1, got {self.bootstrap}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not 0 <= self.seed < MAX_SEED - 1:  # probes draw from seed + 1
            raise ValueError(f"seed must be in [0, 2^63 - 1), got {self.seed}")


TOP_LEVEL = ("task", "model", "train", "eval", "seed", "device", "out", "log")
#: seeds go to torch generators as signed 64-bit integers
MAX_SEED = 2 ** 63
#: fields that do not change what a run computes; left out of the config hash
NOT_HASHED = {("train", "log_every"), ("train", "checkpoint_every"), ("train", "compile"),
              ("eval", "ood"), ("eval", "probes")}


@dataclass
class RunConfig:
    task: str
    model: str
    task_options: Any
    model_options: Any
    train: TrainOptions = field(default_factory=TrainOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)
    seed: int = 0
    device: str = "auto"
    out: str = "results"
    #: run loggers to enable (``--log NAME[=TARGET]``), e.g. ``["mlflow", "tensorboard"]``; outside every
    #: hashed section: where a run is logged does not change what it computes
    log: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "task": {"name": self.task, **dataclasses.asdict(self.task_options)},
            "model": {"name": self.model, **dataclasses.asdict(self.model_options)},
            "train": dataclasses.asdict(self.train),
            "eval": dataclasses.asdict(self.eval),
            "seed": self.seed,
            "device": self.device,
            "out": self.out,
            **({"log": list(self.log)} if self.log else {}),
        }

    def section_hash(self, *sections: str) -> str:
        """Short stable hash of the named sections; runs agreeing on them are comparable."""
        d = self.to_dict()
        payload = {s: {k: v for k, v in d[s].items() if (s, k) not in NOT_HASHED} for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def config_hash(self) -> str:
        """Everything that changes the numbers except the seed (and where the run is computed/stored)."""
        return self.section_hash("task", "model", "train", "eval")

    @property
    def run_name(self) -> str:
        return f"{self.task}-{self.model}-{self.config_hash}-s{self.seed}"


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    from .store import DamagedRun, read_regular

    try:
        text = read_regular(path).decode()
    except DamagedRun as exc:  # missing, unreadable, or a FIFO/device that would block
        raise ICLBenchError(f"cannot read config file {str(path)!r}: {exc}") from None
    except UnicodeDecodeError:
        raise ICLBenchError(f"config file {str(path)!r} is not UTF-8 text (a binary file?)") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ICLBenchError(f"malformed YAML in {path}: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ICLBenchError(f"malformed YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ICLBenchError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _set_dotted(tree: dict, key: str, value: Any, where: str):
    parts = key.split(".")
    if not all(parts):
        raise ICLBenchError(f"malformed key {key!r} in {where}; use section.field, e.g. task.noise")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else {"name": child}
            node[part] = child
        node = child
    node[parts[-1]] = value


def resolve(registry: Registry, *, config: str | Path | dict | None = None, task: str | None = None,
            model: str | None = None, steps: int | None = None, seed: int | None = None,
            device: str | None = None, out: str | None = None, overrides=()) -> RunConfig:
    """Merge file, shortcuts and overrides (later wins) and validate everything against the schemas."""
    where = "config"
    if isinstance(config, (str, Path)):
        where = str(config)
        raw = load_yaml(config)
    else:
        raw = dict(config or {})
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key in raw:
        if key not in TOP_LEVEL:
            raise ICLBenchError(f"unknown key '{key}' in {where}" + did_you_mean(str(key), TOP_LEVEL))
    for section in ("task", "model"):
        if isinstance(raw.get(section), str):
            raw[section] = {"name": raw[section]}
    for key, value in (("task", task), ("model", model)):
        if value is not None:
            raw.setdefault(key, {})
            if not isinstance(raw[key], dict):
                raise ICLBenchError(f"'{key}' in {where} must be a name or a mapping")
            raw[key]["name"] = value
    if steps is not None:
        raw.setdefault("train", {})
        raw["train"]["steps"] = steps
    for key, value in (("seed", seed), ("device", device), ("out", out)):
        if value is not None:
            raw[key] = value
    if isinstance(overrides, dict):
        overrides = list(overrides.items())  # Python values, taken as they are
    recorded_log = raw.get("log")  # from a file or a recorded config: a logger since uninstalled is skipped
    for item in overrides:
        if isinstance(item, tuple):
            key, value = item
        else:
            if "=" not in item:
                raise ICLBenchError(f"--set expects key=value, got {item!r}")
            key, text = item.split("=", 1)
            value = parse_scalar(text)
        key = key.strip()
        if key.split(".")[0] not in TOP_LEVEL:
            raise ICLBenchError(f"unknown key '{key}' in --set" + did_you_mean(key.split(".")[0], TOP_LEVEL))
        if "." not in key:
            raw[key] = value
        else:
            _set_dotted(raw, key, value, "--set")

    sections = {}
    for section in ("task", "model", "train", "eval"):
        value = raw.get(section, {})
        if not isinstance(value, dict):
            raise ICLBenchError(f"'{section}' in {where} must be a mapping, got {value!r}")
        sections[section] = dict(value)
    for section in ("task", "model"):
        if not sections[section].get("name"):
            raise ICLBenchError(f"no {section} given; pass --{section} NAME (see `iclbench list {section}s`)")
    task_name = str(sections["task"].pop("name"))
    model_name = str(sections["model"].pop("name"))
    task_cls = registry.task(task_name)
    model_cls = registry.model(model_name)

    seed_value = raw.get("seed", 0)
    if not isinstance(seed_value, int) or isinstance(seed_value, bool) or not 0 <= seed_value < MAX_SEED:
        raise ICLBenchError(f"seed must be an integer in [0, 2^63), got {seed_value!r}")
    out_value = raw.get("out", "results")
    if isinstance(out_value, Path):
        out_value = str(out_value)
    if not isinstance(out_value, str) or not out_value:
        raise ICLBenchError(f"out must be a directory name (a string), got {out_value!r}")
    device_value = raw.get("device", "auto")
    if not isinstance(device_value, str):
        raise ICLBenchError(f"device must be a string, got {device_value!r}")
    return RunConfig(
        task=task_name,
        model=model_name,
        task_options=build_options(task_cls.Options, sections["task"], "task"),
        model_options=build_options(model_cls.Options, sections["model"], "model"),
        # the task's training defaults sit under the file, --steps and --set, which still override them
        train=build_options(TrainOptions, {**getattr(task_cls, "train_defaults", {}), **sections["train"]},
                            "train"),
        eval=build_options(EvalOptions, sections["eval"], "eval"),
        seed=seed_value,
        device=device_value,
        out=out_value,
        log=_log_targets(registry, raw.get("log"), where, strict=raw.get("log") is not recorded_log),
    )


def _log_targets(registry: Registry, value, where: str, strict: bool = True) -> list[str]:
    """``log``: a list of ``NAME`` or ``NAME=TARGET`` (a comma-separated string too); each NAME a registered
    plugin that implements a lifecycle hook (``mlflow``, ``tensorboard``, a third party's logger). An unknown
    name is an error when the user just gave it (``strict``: ``--log``, ``--set``), else (a config file, a run's
    recorded config) a warning, and that logger is left out."""
    if value is None or value == []:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) and i.strip() for i in items):
        raise ICLBenchError(f"log in {where} must be a list of logger names (e.g. [mlflow, tensorboard]), "
                            f"got {value!r}")
    loggers = sorted({impl.plugin_name for hook in ("iclbench_run_started", "iclbench_train_log",
                                                     "iclbench_run_finished", "iclbench_run_failed")
                      for impl in getattr(registry.hook, hook).get_hookimpls()})
    out = []
    for item in items:
        name = item.strip().partition("=")[0].strip()
        if name not in loggers:
            message = (f"unknown logger '{name}' in log" + did_you_mean(name, loggers)
                       + f" (loggers: {', '.join(loggers) or 'none'})")
            if strict:
                raise ICLBenchError(message)
            print(f"iclbench: warning: {message} in {where}; not logging to it", file=sys.stderr)
            continue
        out.append(item.strip())
    return out
