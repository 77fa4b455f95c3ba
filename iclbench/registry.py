"""Plugin discovery: a pluggy manager loading the ``iclbench`` entry-point group.

Built-in tasks and models are entry points of the ``iclbench`` distribution itself, loaded exactly like a
third party's. ``ICLBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` skips every other distribution's entry points. A plugin
that fails to import is reported by name with its error, and the rest keep working; a name two plugins claim
is disabled (an error naming both when used, listed by ``iclbench list``) and every other name keeps working.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from . import hookspecs
from .errors import ICLBenchError, did_you_mean, warn
from .pool import pool_baselines
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
    #: "task:affine" -> why the name is disabled (claimed by two plugins); every other name keeps working
    clashes: dict[str, str] = field(default_factory=dict)
    #: plugin name -> (distribution, version) for plugins loaded from entry points
    dists: dict[str, tuple[str, str]] = field(default_factory=dict)

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
        if f"{kind}:{name}" in self.clashes:
            raise ICLBenchError(self.clashes[f"{kind}:{name}"])
        if name not in table:
            hint = did_you_mean(name, table)
            broken = f"; plugins that failed to load: {', '.join(self.failed)}" if self.failed else ""
            raise ICLBenchError(f"unknown {kind} '{name}'{hint}{broken}")
        return table[name]

    def task_baselines(self, task) -> dict[str, Entry]:
        """Baselines the task declares, plus those other plugins add for its name, plus ``dmmse`` for a task
        trained on a pool of rules (:mod:`iclbench.pool`)."""
        own = {n: Entry(n, fn, self.tasks[task.name].plugin if task.name in self.tasks else "?")
               for n, fn in {**task.baselines(), **pool_baselines(task)}.items()}
        extra = self.baselines.get(task.name, {})
        for n, e in list(extra.items()):
            if n in own:  # the task's own baseline stays; the other plugin's is disabled, not the task
                warn(f"baseline '{task.name}:{n}' of plugin '{e.plugin}' is ignored: task plugin "
                     f"'{own[n].plugin}' already declares a baseline of that name")
                extra = {k: v for k, v in extra.items() if k != n}
        return {**own, **extra}

    def owner(self, kind: str, name: str) -> str:
        """``"task 'sine' (plugin 'sine')"``: how error messages name a plugin's object."""
        table = {"task": self.tasks, "model": self.models, "probe": self.probes}.get(kind, {})
        plugin = table[name].plugin if name in table else None
        return f"{kind} '{name}'" + (f" (plugin '{plugin}')" if plugin else "")

    def notify(self, hook: str, **kwargs) -> list[str]:
        """Call lifecycle hook ``hook`` on every plugin, each isolated: one that raises is reported on
        stderr by name and the others (and the run) go on. Returns the error lines."""
        errors = []
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):  # pluggy's call order
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames if arg in kwargs})
            except Exception as exc:
                line = f"plugin '{impl.plugin_name}' failed in {hook}: {type(exc).__name__}: {exc}"
                warn(line)
                errors.append(line)
        return errors

    def plugin_versions(self) -> dict[str, dict]:
        """Per registered plugin: its distribution and version, and a hash of its source files, so results
        of changed plugin code can be told apart (an editable install keeps its version when edited)."""
        out = {}
        for name, plugin in self.pm.list_name_plugin():
            dist, version = self.dists.get(name, ("", ""))
            out[name] = {"distribution": dist or None, "version": version or None,
                         "source_sha256": source_hash(plugin)}
        return dict(sorted(out.items()))


def source_hash(module) -> str | None:
    """sha256 (12 hex digits) of a plugin module's source: the file of a top-level module, or every ``.py``
    file of the package directory a module lives in (its helpers change its behaviour too)."""
    import hashlib
    from pathlib import Path

    path = getattr(module, "__file__", None)
    if not path:
        return None
    path = Path(path)
    files = sorted(path.parent.glob("*.py")) if getattr(module, "__package__", "") else [path]
    digest = hashlib.sha256()
    for f in files:
        try:
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
        except OSError:
            continue
    return digest.hexdigest()[:12]


def _plugin_name(pm, plugin) -> str:
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))


def _claim(reg: Registry, table: dict, name: str, obj, plugin: str, kind: str, description: str = "",
           key: str | None = None):
    """Add ``name`` to ``table``. A name two plugins claim is disabled (an error on use, shown by
    ``iclbench list``); every other name keeps working."""
    if not name:
        reg.failed[plugin] = f"registers a {kind} with no name ({obj!r})"
        warn(f"plugin '{plugin}' registers a {kind} with no name ({obj!r}); ignored")
        return
    key = key or f"{kind}:{name}"
    if key in reg.clashes:  # a third claimant: the name stays disabled
        return
    if name in table and table[name].obj is not obj:
        first = table.pop(name).plugin
        reg.clashes[key] = (f"{kind} name '{name}' is claimed by two plugins: '{first}' and '{plugin}'; "
                            f"uninstall one or rename its {kind}")
        warn(reg.clashes[key])
        return
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
            reg.dists[ep.name] = (dist, ep.dist.version if ep.dist is not None else "")
        except Exception as exc:  # a broken plugin must not take the others down
            reg.failed[ep.name] = f"{type(exc).__name__}: {exc}"
            warn(f"plugin '{ep.name}' ({ep.value}, from {dist or 'unknown'}) failed to load: "
                 f"{type(exc).__name__}: {exc}")
    for plugin in extra_plugins:
        pm.register(plugin)

    def collect(hook):
        for impl in hook.get_hookimpls():  # registration order
            plugin = impl.plugin_name
            try:
                items = impl.function() or []
            except Exception as exc:
                reg.failed[plugin] = f"{type(exc).__name__}: {exc}"
                warn(f"plugin '{plugin}' failed in {hook.name}: {type(exc).__name__}: {exc}")
                continue
            yield plugin, items

    for plugin, items in collect(pm.hook.iclbench_tasks):
        for cls in items:
            _claim(reg, reg.tasks, cls.name, cls, plugin, "task", cls.description)
    for plugin, items in collect(pm.hook.iclbench_models):
        for cls in items:
            _claim(reg, reg.models, cls.name, cls, plugin, "model", cls.description)
    for plugin, items in collect(pm.hook.iclbench_probes):
        for cls in items:
            _claim(reg, reg.probes, cls.name, cls, plugin, "probe", cls.description)
    for plugin, items in collect(pm.hook.iclbench_baselines):
        for b in items:
            if not isinstance(b, Baseline):
                reg.failed[plugin] = f"returned {b!r} from iclbench_baselines; expected iclbench.Baseline"
                warn(f"plugin '{plugin}' {reg.failed[plugin]}")
                continue
            _claim(reg, reg.baselines.setdefault(b.task, {}), b.name, b.fn, plugin, "baseline",
                   b.description, key=f"baseline:{b.task}:{b.name}")
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
