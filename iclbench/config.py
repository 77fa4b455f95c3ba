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
    resolved_from:                                 # a run's config.yaml: the defaults shown resolved above
      eval.score_from: {given: -1, resolved: 3}    #   (the config hash reads each as given, so a rerun of
      device: {given: auto, resolved: cpu}         #   the file finds its run)

A run's ``config.yaml`` shows what a default resolved to on that run (``eval.score_from: -1`` → the task's
first scored position, ``model.n_ctx: 0`` → the task's context length, ``device: auto`` → the device used) and
records under ``resolved_from`` what was given; reading the file restores each given value the file still shows
resolved, so the configuration, its hash and its run name are the run's. A run's ``config.yaml`` read as a
config finds its run where the file is (``out`` is the folder holding the run directory), from any folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ICLBenchError, did_you_mean, warn
from .options import MAX_SEED, EvalOptions, TrainOptions, build_options, parse_scalar
from .registry import Registry


TOP_LEVEL = ("task", "model", "train", "eval", "seed", "device", "out", "log")
#: the key of a run's config.yaml recording the defaults it shows resolved (``{key: {given, resolved}}``)
RESOLVED_FROM = "resolved_from"
#: fields that do not change what a run computes; left out of the config hash
NOT_HASHED = {("train", "log_every"), ("train", "checkpoint_every"), ("train", "compile"),
              ("eval", "ood"), ("eval", "probes")}
#: values hashed under their former spelling, so that a configuration keeps its run name (and its results)
HASHED_AS = {("train", "precision", "fp32"): "auto"}
#: train options that mean something only under ``until: flat`` (and ``steps``, which means nothing there):
#: left out of the hash where they mean nothing, so that every configuration recorded before the stop rule
#: existed keeps its hash
FLAT_ONLY = ("until", "max_steps", "eval_every", "heldout", "flat_window", "flat_tol", "flat_stat", "cooldown")


#: options added after runs were recorded, left out of the hash at the value that changes nothing (so every
#: recorded configuration keeps its hash)
OMIT_AT = {("task", "curriculum"): False, ("task", "active_dims"): 0, ("task", "pool"): 0,
           ("train", "flat_stat"): "mean"}


def hashed(section: str, values: dict) -> dict:
    """The part of a config section that enters its hash."""
    values = {k: v for k, v in values.items() if (section, k) not in OMIT_AT or OMIT_AT[section, k] != v}
    if section == "train":
        unused = ("steps",) if values.get("until") == "flat" else FLAT_ONLY
        values = {k: v for k, v in values.items() if k not in unused}
    return {k: HASHED_AS.get((section, k, v), v) for k, v in values.items() if (section, k) not in NOT_HASHED}


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

    def to_dict(self, resolved: dict | None = None) -> dict:
        """The configuration as given (what the hashes read); with ``resolved`` (``{"eval.score_from": 3}``, as
        :func:`resolved_defaults` finds), those values shown resolved and the given ones under
        ``resolved_from``: a run's ``config.yaml``."""
        d = self._given()
        if resolved:
            record = {}
            for key, value in resolved.items():
                section, _, name = key.partition(".")
                node, name = (d[section], name) if name else (d, section)
                record[key] = {"given": node[name], "resolved": value}
                node[name] = value
            d[RESOLVED_FROM] = record
        return d

    def _given(self) -> dict:
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
        payload = {s: hashed(s, d[s]) for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def config_hash(self) -> str:
        """Everything that changes the numbers except the seed (and where the run is computed/stored)."""
        return self.section_hash("task", "model", "train", "eval")

    @property
    def run_name(self) -> str:
        return f"{self.task}-{self.model}-{self.config_hash}-s{self.seed}"


def resolved_defaults(cfg: RunConfig, task, model, device) -> dict:
    """What ``cfg``'s "use the default" values came to on this run: ``eval.score_from`` -1 (the task's
    ``score_from``), a model's ``n_ctx`` 0 (the positions the built model has), ``device`` auto (the device
    used). ``{dotted key: value}``, for :meth:`RunConfig.to_dict`."""
    out = {}
    if cfg.device == "auto":
        out["device"] = str(device)
    if cfg.eval.score_from < 0 and isinstance(getattr(task, "score_from", None), int):
        out["eval.score_from"] = int(task.score_from)
    n_ctx = getattr(model, "n_ctx", None)
    if getattr(cfg.model_options, "n_ctx", None) == 0 and isinstance(n_ctx, int) and n_ctx > 0:
        out["model.n_ctx"] = n_ctx
    return out


def _restore_given(raw: dict, where: str) -> None:
    """A run's config.yaml: put back each value given as a default that the file still shows resolved (see
    :data:`RESOLVED_FROM`); one the user has since edited stays as edited."""
    record = raw.pop(RESOLVED_FROM, None)
    if record is None:
        return
    if not isinstance(record, dict):
        raise ICLBenchError(f"{RESOLVED_FROM} in {where} must map keys to {{given: ..., resolved: ...}}, got "
                            f"{record!r}")
    for key, entry in record.items():
        if not (isinstance(key, str) and isinstance(entry, dict) and {"given", "resolved"} <= set(entry)):
            raise ICLBenchError(f"{RESOLVED_FROM} in {where}: {key!r} must map to {{given: ..., resolved: ...}}, "
                                f"got {entry!r}")
        section, _, name = key.partition(".")
        node, name = (raw.get(section), name) if name else (raw, section)
        if isinstance(node, dict) and name in node and node[name] == entry["resolved"]:
            node[name] = entry["given"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that writes a key twice (YAML itself keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: the safe loader refuses it in its own words
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is written twice (first on line {first}); keep one",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    """A config file's mapping; malformed YAML, a key written twice, or a file that is not a regular text file
    is one line naming it."""
    path = Path(path)
    from .store import DamagedRun, read_regular

    try:
        text = read_regular(path).decode()
    except DamagedRun as exc:  # missing, unreadable, or a FIFO/device that would block
        raise ICLBenchError(f"cannot read config file {str(path)!r}: {exc}") from None
    except UnicodeDecodeError:
        raise ICLBenchError(f"config file {str(path)!r} is not UTF-8 text (a binary file?)") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
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
    _restore_given(raw, where)
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
    out_set = False  # --set out=...: the file's run is not where the runs go
    for item in overrides:
        if isinstance(item, tuple):
            key, value = item
        else:
            if "=" not in item:
                raise ICLBenchError(f"--set expects key=value, got {item!r}")
            key, text = item.split("=", 1)
            value = parse_scalar(text)
        key = key.strip()
        out_set = out_set or key == "out"
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
    cfg = RunConfig(
        task=task_name,
        model=model_name,
        task_options=build_options(task_cls.Options, sections["task"], "task"),
        model_options=build_options(model_cls.Options, sections["model"], "model"),
        # the task's training defaults sit under the file, --steps and --set, which still override them
        train=build_options(TrainOptions, train_settings(getattr(task_cls, "train_defaults", {}), sections["train"]),
                            "train"),
        eval=build_options(EvalOptions, sections["eval"], "eval"),
        seed=seed_value,
        device=device_value,
        out=out_value,
        log=_log_targets(registry, raw.get("log"), where, strict=raw.get("log") is not recorded_log),
    )
    if isinstance(config, (str, Path)) and out is None and not out_set:
        home = run_home(Path(config), cfg)
        if home is not None:
            cfg.out = home
    return cfg


def run_home(path: Path, cfg: RunConfig) -> str | None:
    """Where the runs of a run's ``config.yaml`` go (the file in a folder named like a run,
    ``TASK-MODEL-HASH-sSEED``): the folder holding that run directory, absolute, so that rerunning the file
    finds its run from any folder rather than training it anew under a relative ``out`` (and a variant of it,
    another seed or ``--set``, lands beside it). None for any other file."""
    path = Path(path)
    if path.name == "config.yaml" and (path.parent.name == cfg.run_name
                                       or re.fullmatch(r".+-[0-9a-f]{8}-s\d+", path.parent.name)):
        return os.path.abspath(path.parent.parent)
    return None


def train_settings(defaults: dict, given: dict) -> dict:
    """The task's training defaults under the settings given (file, ``--steps``, ``--set``). Naming a step
    count means training that many steps: ``steps`` given without ``until`` sets ``until: steps``, also where
    the task's defaults train until flat."""
    if "steps" in given and "until" not in given:
        given = {**given, "until": "steps"}
    return {**defaults, **given}


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
            warn(f"{message} in {where}; not logging to it")
            continue
        out.append(item.strip())
    return out
