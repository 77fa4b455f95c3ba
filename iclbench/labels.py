"""Readable labels for configurations: a name and the settings that differ from its defaults.

``affine noise=0.1``, ``gpt2l train.steps=600``: what ``iclbench specialization``, the leaderboard and the
report call a configuration, so that one configuration has one name everywhere (the hash stays in the
machine-readable outputs, and is appended where two configurations would otherwise read the same).
"""

from __future__ import annotations

import dataclasses

from .config import HASHED_AS, hashed
from .options import EvalOptions, TrainOptions


def config_label(name: str, section: dict, defaults: dict, train: dict | None = None,
                 train_defaults: dict | None = None, eval: dict | None = None) -> str:
    """'gpt3l', or 'gpt3l n_layers=6' where options (or training / evaluation settings) differ from the
    defaults (``train_defaults``: the task's own training defaults over :class:`TrainOptions`'s)."""
    def same(s, k, a, b):  # equal, or one value under its two spellings (precision "auto" is "fp32")
        return HASHED_AS.get((s, k, a), a) == HASHED_AS.get((s, k, b), b)

    changed = [f"{k}={v}" for k, v in section.items() if k in defaults and defaults[k] != v]
    for prefix, values, base in (("train", train, {**dataclasses.asdict(TrainOptions()), **(train_defaults or {})}),
                                 ("eval", eval, dataclasses.asdict(EvalOptions()))):
        changed += [f"{prefix}.{k}={v}" for k, v in (values or {}).items()
                    if k in hashed(prefix, values) and not same(prefix, k, base.get(k, v), v)]
    return " ".join([name] + changed)


def option_defaults(registry, table: str, name: str) -> dict:
    """The default Options of a registered task or model ({} where ``name`` is not registered)."""
    entries = getattr(registry, table)
    return dataclasses.asdict(entries[name].obj.Options()) if name in entries else {}


def run_labels(config: dict, registry=None) -> tuple[str, str]:
    """(task label, model label) of a run's resolved ``config.yaml``: the task with its evaluation settings,
    the model with its training settings (measured against the task's own training defaults)."""
    if registry is None:
        from .registry import get_registry

        registry = get_registry()
    task, model = config["task"]["name"], config["model"]["name"]
    task_cls = registry.tasks[task].obj if task in registry.tasks else None
    task_label = config_label(task, config["task"], option_defaults(registry, "tasks", task),
                              eval=config.get("eval"))
    model_label = config_label(model, config["model"], option_defaults(registry, "models", model),
                               config.get("train"), getattr(task_cls, "train_defaults", {}))
    return task_label, model_label


def differing_settings(configs_a: list[dict], configs_b: list[dict]) -> list[str]:
    """'train.lr: 0.001 → 0.0001' for each setting whose values differ between two sets of resolved
    configurations (settings that do not change the numbers, the seed and where runs are stored left out)."""
    def flat(configs):
        values: dict[str, set] = {}
        for cfg in configs:
            for section in ("task", "model", "train", "eval"):
                for k, v in (cfg.get(section) or {}).items():
                    if k in hashed(section, cfg.get(section) or {}):
                        values.setdefault(f"{section}.{k}", set()).add(repr(HASHED_AS.get((section, k, v), v)))
        return values

    a, b = flat(configs_a), flat(configs_b)
    show = lambda vals: "/".join(sorted(v.strip("'") for v in vals)) or "—"  # noqa: E731
    return [f"{k}: {show(a.get(k, set()))} → {show(b.get(k, set()))}" for k in sorted(a.keys() | b.keys())
            if a.get(k, set()) != b.get(k, set())]
