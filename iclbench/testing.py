"""The plugin contracts as checks a plugin author runs (like scikit-learn's ``check_estimator``).

From the shell, ``iclbench check NAME`` (a plugin's entry-point name, or a task, model, probe or
``task:baseline`` name); from pytest::

    from iclbench.testing import check_plugin

    def test_my_plugin_keeps_the_contracts():
        check_plugin("my_plugin")  # raises AssertionError listing every broken contract

The checks are those ``iclbench run`` applies (:mod:`iclbench.contracts`), plus what only a test can afford:
a baseline gives one sequence the same prediction alone as inside a batch, a probe runs end to end on an
untrained model and returns a table and a JSON-able summary.
"""

from __future__ import annotations

import json

import pandas as pd
import torch

from . import contracts
from .errors import ICLBenchError
from .registry import Registry, get_registry

#: the model a task's and a probe's checks run on, and the task a model's and a probe's checks run on, when
#: the plugin provides none of its own
DEFAULT_MODEL, DEFAULT_TASK = "gpt1l", "affine"


def _registry(registry):
    return registry or get_registry()


def _instance(table_get, obj):
    cls = table_get(obj) if isinstance(obj, str) else obj
    return cls() if isinstance(cls, type) else cls


def check_task(task, registry: Registry | None = None) -> None:
    """A task (name, class or instance): shapes, dtypes, mask and latents of ``sample``, its normalizer, its
    OOD variants (each sampled too), its baselines (:func:`check_baselines`)."""
    reg = _registry(registry)
    task = _instance(reg.task, task)
    owner = reg.owner("task", task.name)
    contracts.check_task(task, owner)
    contracts.check_normalizer(task, owner)
    for name, variant in task.ood_variants().items():
        contracts.check_task(variant, f"{owner}, OOD variant '{name}'")
    check_baselines(task, reg)


def check_baselines(task, registry: Registry | None = None) -> None:
    """Every baseline of ``task`` (its own and other plugins'): no peeking at targets or later inputs,
    latents only for oracles, finite predictions of the target's shape, vectorised over the batch."""
    reg = _registry(registry)
    task = _instance(reg.task, task)
    batch = task.sample(16, torch.Generator("cpu").manual_seed(1))
    problems = []
    for name, entry in reg.task_baselines(task).items():
        who = f"baseline '{task.name}:{name}' (plugin '{entry.plugin}')"
        problem = contracts.baseline_problem(name, entry.obj, batch)
        if problem is None:
            alone, inside = entry.obj(batch.slice(slice(2, 3))), entry.obj(batch)[2:3]
            if not contracts._same(alone, inside, None, batch.mask):
                problem = "gives sequence 2 another prediction alone than inside the batch; expected vectorised"
        if problem:
            problems.append(f"{who}: {problem}")
    if problems:
        raise contracts.PluginError("\n  ".join(problems))


def check_model(model, task=DEFAULT_TASK, registry: Registry | None = None) -> None:
    """A model (name or class) built with its default options for ``task``: trainable parameters, output
    ``[B, T, d_out]``, finite, causal; one training step changes its predictions."""
    reg = _registry(registry)
    cls = reg.model(model) if isinstance(model, str) else model
    task = _instance(reg.task, task)
    owner = reg.owner("model", cls.name)
    net = cls(cls.Options(), task.d_in, task.d_out, task.context_len)
    contracts.check_model(net, task, owner)
    batch = task.sample(8, torch.Generator("cpu").manual_seed(2))
    with torch.no_grad():
        before = net(batch.inputs).clone()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    (net(batch.inputs) - batch.targets).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        if torch.equal(net(batch.inputs), before):
            raise contracts.PluginError(f"{owner}: one SGD step on the loss leaves its predictions unchanged; "
                                        "expected the parameters to reach the output")


def check_probe(probe, task=DEFAULT_TASK, model=DEFAULT_MODEL, registry: Registry | None = None,
                n_sequences: int = 32) -> None:
    """A probe (name or class) on an untrained ``model`` for ``task``: if it applies, ``run`` returns a
    :class:`~iclbench.ProbeResult` with a DataFrame and a JSON-serialisable summary; if not, it says why."""
    reg = _registry(registry)
    cls = reg.probe(probe) if isinstance(probe, str) else probe
    task = _instance(reg.task, task)
    if getattr(task, "registry", None) is None:  # the probe's baselines come from this registry
        task.registry = reg
    model_cls = reg.model(model) if isinstance(model, str) else model
    net = model_cls(model_cls.Options(), task.d_in, task.d_out, task.context_len).eval()
    owner = reg.owner("probe", cls.name)
    instance = cls()
    instance.n_sequences = n_sequences
    if instance.why_not(task, net) is not None:
        return
    with torch.no_grad():
        result = instance.run(net, task, torch.Generator("cpu").manual_seed(3), torch.device("cpu"))
    from .probe import ProbeResult

    if not isinstance(result, ProbeResult) or not isinstance(result.table, pd.DataFrame):
        raise contracts.PluginError(f"{owner}: run() returned {type(result).__name__}; expected "
                                    "ProbeResult(table=pandas.DataFrame, summary=dict)")
    try:
        json.dumps(result.summary, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise contracts.PluginError(f"{owner}: summary is not JSON-serialisable ({exc}); expected plain "
                                    "dicts, lists, str, int, finite float or None") from None


def check_plugin(name: str, registry: Registry | None = None) -> list[str]:
    """Check everything ``name`` provides: a plugin (entry-point name) — each of its tasks, models,
    baselines and probes — or one task, model, probe or ``task:baseline``. Returns one ``ok ...`` line per
    object checked; raises ``AssertionError`` listing every broken contract."""
    reg = _registry(registry)
    checks = []
    if reg.pm.has_plugin(name) or name in reg.failed:
        if name in reg.failed:
            raise AssertionError(f"plugin '{name}' failed to load: {reg.failed[name]}")
        checks += [(f"task '{n}'", check_task, n) for n, e in reg.tasks.items() if e.plugin == name]
        checks += [(f"model '{n}'", check_model, n) for n, e in reg.models.items() if e.plugin == name]
        checks += [(f"probe '{n}'", check_probe, n) for n, e in reg.probes.items() if e.plugin == name]
        for task_name, table in reg.baselines.items():
            if any(e.plugin == name for e in table.values()) and task_name in reg.tasks:
                checks.append((f"baselines of task '{task_name}'", check_baselines, task_name))
        checks += [(k, _clash, k) for k, v in reg.clashes.items() if f"'{name}'" in v]
        if not checks:
            hooks = [h.name for h in reg.pm.get_hookcallers(reg.pm.get_plugin(name)) or ()]
            return [f"ok plugin '{name}': registers no task, model, baseline or probe (hooks: "
                    f"{', '.join(hooks) or 'none'})"]
    elif name in reg.tasks:
        checks.append((f"task '{name}'", check_task, name))
    elif name in reg.models:
        checks.append((f"model '{name}'", check_model, name))
    elif name in reg.probes:
        checks.append((f"probe '{name}'", check_probe, name))
    elif ":" in name and name.split(":", 1)[0] in reg.tasks:
        checks.append((f"baselines of task '{name.split(':', 1)[0]}'", check_baselines, name.split(":", 1)[0]))
    else:
        known = [p for p, _ in reg.pm.list_name_plugin()] + list(reg.tasks) + list(reg.models) + list(reg.probes)
        from .errors import did_you_mean

        raise ICLBenchError(f"nothing named '{name}' to check: not a plugin, task, model, probe or "
                            f"task:baseline{did_you_mean(name, known)}")
    ok, failures = [], []
    for label, check, arg in checks:
        try:
            check(arg, registry=reg)
            ok.append(f"ok {label}")
        except ICLBenchError as exc:
            failures.append(f"FAILED {label}: {exc}")
        except Exception as exc:  # a plugin's own bug, named
            failures.append(f"FAILED {label}: {type(exc).__name__}: {exc}")
    if failures:
        raise AssertionError("\n".join(ok + failures))
    return ok


def _clash(key: str, registry: Registry) -> None:
    raise ICLBenchError(registry.clashes[key])
