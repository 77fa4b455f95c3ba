"""Every hook iclbench calls, in one place (modelled on pytest's hookspec.py).

A plugin is a module with functions decorated by ``iclbench.hookimpl`` and named as below, registered
through the ``iclbench`` entry-point group::

    [project.entry-points.iclbench]
    my_tasks = "my_package.my_module"

The built-in tasks and models register through exactly this mechanism. Registration hooks return a list;
the registry merges the lists of all plugins and refuses two plugins claiming one name. Lifecycle hooks
return nothing and let a logger (MLflow, TensorBoard, W&B, ...) follow a run without any engine change. Each
lifecycle implementation is called on its own: one that raises is reported on stderr by plugin name and the
run and the other plugins go on. A plugin implements only the hooks it needs and may take any subset of a
hook's arguments (pluggy passes them by name). The contract of every kind, with a tested example of each:
``docs/plugins.md``.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("iclbench")
hookimpl = pluggy.HookimplMarker("iclbench")


# --- registration -------------------------------------------------------------------------------------

@hookspec
def iclbench_tasks():
    """Return a list of :class:`iclbench.Task` subclasses this plugin provides.

    Called once when the registry is built. Each class needs a unique ``name``, a one-line ``description``
    and an ``Options`` dataclass whose field defaults are the task's defaults.
    """


@hookspec
def iclbench_models():
    """Return a list of :class:`iclbench.Model` subclasses this plugin provides.

    Called once when the registry is built. ``Model.variant(name, ...)`` makes a named configuration
    (e.g. ``gpt3l``) of one architecture without a new class.
    """


@hookspec
def iclbench_baselines():
    """Return a list of :class:`iclbench.Baseline` for tasks registered by any plugin.

    Tasks declare their own baselines; this hook lets a third party add an estimator to an existing task
    (the baseline's ``task`` names it). Baselines see the same evaluation batch as the model.
    """


@hookspec
def iclbench_probes():
    """Return a list of :class:`iclbench.Probe` subclasses this plugin provides.

    Probes read a trained model through its hook points; they never train the model they inspect.
    """


# --- run lifecycle ------------------------------------------------------------------------------------

@hookspec
def iclbench_run_started(run_dir, config):
    """Called after the run directory is created and the resolved config written, before training.

    ``run_dir`` is a ``pathlib.Path``; ``config`` the resolved :class:`iclbench.config.RunConfig`:
    ``config.task`` / ``config.model`` (names), ``config.task_options`` / ``config.model_options`` (the
    plugins' Options dataclasses), ``config.train`` / ``config.eval`` (TrainOptions / EvalOptions),
    ``config.seed``, ``config.device``, ``config.out``, ``config.run_name``, ``config.config_hash`` and
    ``config.to_dict()`` (the configuration as given, which the hash reads; ``config.yaml`` also shows the
    defaults as they resolved on the run, under ``resolved_from``).
    """


@hookspec
def iclbench_train_log(run_dir, step, metrics):
    """Called every ``train.log_every`` steps with a dict of scalars (loss, lr, tokens_per_s, ...), and under
    ``train.until: flat`` at each held-out scoring (heldout_error, heldout_excess, last_step)."""


@hookspec
def iclbench_eval_finished(run_dir, config, metrics):
    """Called when evaluation is done, before ``metrics.json`` is written; ``metrics`` is that dict.

    A plugin may add keys under ``metrics["extra"][plugin_name]``; everything else should be left alone.
    """


@hookspec
def iclbench_run_finished(run_dir, config, metrics):
    """Called after every file of a successful run is written."""


@hookspec
def iclbench_run_failed(run_dir, config, status, error, plugin):
    """Called when a run that had started (``iclbench_run_started`` was called) ends without completing.

    ``status`` is ``"failed"`` (an exception; ``status.json`` records it) or ``"diverged"`` (non-finite
    loss); ``error`` the one-line message; ``plugin`` the name of the plugin whose code raised, or ``None``.
    Ctrl-C is not a failure (the run is resumable) and calls no hook.
    """


# --- command line -------------------------------------------------------------------------------------

@hookspec
def iclbench_add_commands(subparsers):
    """Add subcommands to the ``iclbench`` command line (as pytest plugins add options).

    Called once while the parser is built; ``subparsers`` is the ``argparse`` sub-parsers action. Add a
    command with ``p = subparsers.add_parser(NAME, help=...)``, its arguments, and
    ``p.set_defaults(iclbench_command=FN)``: ``FN(args)`` runs it and returns the exit code; raising
    :class:`iclbench.errors.ICLBenchError` prints one line and exits non-zero. A probe module may add the
    command that prints its cross-run table this way (the built-in probes do: ``iclbench/probes/``).
    """
