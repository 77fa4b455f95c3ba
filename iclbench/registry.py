"""Plugin discovery: a pluggy manager loading the ``iclbench`` entry-point group.

Built-in tasks and models are entry points of the ``iclbench`` distribution itself, loaded exactly like a
third party's. ``ICLBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` skips every other distribution's entry points. A plugin
that fails to import is reported by name with its error, and the rest keep working.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from . import hookspecs
from .errors import ICLBenchError, did_you_mean
from .task import Baseline

GROUP = "iclbench"
DIST = "iclbench"


@dataclass
class Entry:
    name: str
    obj: object
    plugin: str
    description: str = ""


@dataclass
class Registry:
    pm: pluggy.PluginManager
    tasks: dict[str, Entry] = field(default_factory=dict)
    models: dict[str, Entry] = field(default_factory=dict)
    baselines: dict[str, dict[str, Entry]] = field(default_factory=dict)  # task -> name -> Entry
    probes: dict[str, Entry] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # plugin name -> error line

    @property
    def hook(self):
        return self.pm.hook

    def task(self, name: str):
        return self._get(self.tasks, name, "task").obj

    def model(self, name: str):
        return self._get(self.models, name, "model").obj

    def probe(self, name: str):
        return self._get(self.probes, name, "probe").obj

    def _get(self, table, name, kind):
        if name not in table:
            hint = did_you_mean(name, table)
            broken = f"; plugins that failed to load: {', '.join(self.failed)}" if self.failed else ""
            raise ICLBenchError(f"unknown {kind} '{name}'{hint}{broken}")
        return table[name]

    def task_baselines(self, task) -> dict[str, Entry]:
        """Baselines the task declares, plus those other plugins add for its name."""
        own = {n: Entry(n, fn, self.tasks[task.name].plugin if task.name in self.tasks else "?")
               for n, fn in task.baselines().items()}
        extra = self.baselines.get(task.name, {})
        for n, e in extra.items():
            if n in own:
                raise ICLBenchError(f"baseline '{task.name}:{n}' is claimed by plugins '{own[n].plugin}' and "
                                    f"'{e.plugin}'")
        return {**own, **extra}


def _plugin_name(pm, plugin) -> str:
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))


def _claim(table: dict, name: str, obj, plugin: str, kind: str, description: str = ""):
    if not name:
        raise ICLBenchError(f"plugin '{plugin}' registers a {kind} with no name")
    if name in table and table[name].obj is not obj:
        raise ICLBenchError(f"{kind} name '{name}' is claimed by two plugins: '{table[name].plugin}' and "
                            f"'{plugin}'; uninstall one or rename its {kind}")
    table[name] = Entry(name, obj, plugin, description)


def build_registry(autoload: bool | None = None, extra_plugins=()) -> Registry:
    """Discover plugins and collect what they register. ``extra_plugins``: modules/objects to register
    directly (used by tests and by the Python API)."""
    if autoload is None:
        autoload = os.environ.get("ICLBENCH_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm)

    for ep in metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else ""
        if not autoload and dist.replace("_", "-").lower() != DIST:
            continue
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            reg.failed[ep.name] = f"{type(exc).__name__}: {exc}"
            print(f"iclbench: warning: plugin '{ep.name}' ({ep.value}, from {dist or 'unknown'}) failed to "
                  f"load: {type(exc).__name__}: {exc}", file=sys.stderr)
    for plugin in extra_plugins:
        pm.register(plugin)

    def collect(hook):
        for impl in hook.get_hookimpls():  # registration order
            plugin = impl.plugin_name
            try:
                items = impl.function() or []
            except Exception as exc:
                reg.failed[plugin] = f"{type(exc).__name__}: {exc}"
                print(f"iclbench: warning: plugin '{plugin}' failed in {hook.name}: {type(exc).__name__}: "
                      f"{exc}", file=sys.stderr)
                continue
            yield plugin, items

    for plugin, items in collect(pm.hook.iclbench_tasks):
        for cls in items:
            _claim(reg.tasks, cls.name, cls, plugin, "task", cls.description)
    for plugin, items in collect(pm.hook.iclbench_models):
        for cls in items:
            _claim(reg.models, cls.name, cls, plugin, "model", cls.description)
    for plugin, items in collect(pm.hook.iclbench_probes):
        for cls in items:
            _claim(reg.probes, cls.name, cls, plugin, "probe", cls.description)
    for plugin, items in collect(pm.hook.iclbench_baselines):
        for b in items:
            if not isinstance(b, Baseline):
                raise ICLBenchError(f"plugin '{plugin}' returned {b!r} from iclbench_baselines; expected "
                                    "iclbench.Baseline")
            _claim(reg.baselines.setdefault(b.task, {}), b.name, b.fn, plugin, "baseline", b.description)
    return reg


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _default
    if _default is None:
        _default = build_registry()
    return _default


def reset_registry() -> None:
    global _default
    _default = None
