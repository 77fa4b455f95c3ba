"""MLflow run logger (``--log mlflow``; ``pip install 'iclbench[mlflow]'``).

One MLflow run per iclbench run, in the experiment ``iclbench-<task>`` (``MLFLOW_EXPERIMENT_NAME`` wins):
the resolved config as params; the training curve (``train/loss``, ``train/lr``, ... by step); the headline
error of the model and every baseline with its CI, the excess over the Bayes baseline, the OOD errors; the
per-position error curves (``curve/NAME``, step = context position); tags for whether the model learned the
task and what each probe says in words, and its numbers as ``probe/NAME.KEY`` (``Probe.tracker_summary``);
the run directory as the artifact ``run/``; a
failed run's status, error and plugin as tags (run status FAILED).

Store: ``--log mlflow=TRACKING_URI`` (``sqlite:///...``, ``http://...``, a path), else ``MLFLOW_TRACKING_URI``,
else a local file store ``<out>/mlruns`` shared by the runs of one results directory. Browse it with
``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri results/mlruns`` (the UI needs the full
``mlflow`` package; the client in ``mlflow-skinny`` is enough to log).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import common

#: a results directory's MLflow store, beside the run directories (skipped when scanning for runs)
STORE_DIR = "mlruns"
#: files of a run directory not worth copying to the tracker: the resumable state, the lock
SKIPPED = {"train_state.pt", ".lock"}


@dataclass
class State:
    client: object
    run_id: str
    uri: str
    experiment_id: str
    local_store: Path | None
    steps: int


def tracking_uri(target: str | None, out: str) -> str:
    uri = target or os.environ.get("MLFLOW_TRACKING_URI") or str(Path(out) / STORE_DIR)
    if ":" not in uri or Path(uri).is_absolute():  # a path: a local file store
        uri = Path(uri).resolve().as_uri()
    return uri


class MLflowLogger(common.Logger):
    name = "mlflow"
    extra = "mlflow"

    def library(self):
        import mlflow  # noqa: F401  (mlflow-skinny or mlflow)

    def open(self, run_dir, config, target):
        uri = tracking_uri(target, config.out)
        local = None
        if uri.startswith("file:"):
            from urllib.parse import unquote, urlparse

            local = Path(unquote(urlparse(uri).path)).resolve()
            # MLflow >= 3.x refuses its file store unless asked; a local store needs no server, so ask
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        elif uri.startswith(("http:", "https:")):  # an unreachable server must not hold the run for minutes
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        if local is not None:  # the store keeps copies of runs: not runs of the results directory
            from ..rundir import mark_not_runs

            mark_not_runs(local)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"iclbench-{config.task}"
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(name)
            except Exception:  # another run (a parallel seed) created it first
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        tags = {"iclbench.task": config.task, "iclbench.model": config.model, "iclbench.seed": str(config.seed),
                "iclbench.config_hash": config.config_hash, "iclbench.run_dir": str(Path(run_dir).resolve()),
                "iclbench.label": common.label(config)}
        run = client.create_run(experiment_id, run_name=config.run_name, tags=tags)
        return State(client, run.info.run_id, uri, experiment_id, local, int(config.train.steps))

    def where(self, state):
        return {"tracking_uri": state.uri, "experiment_id": state.experiment_id, "run_id": state.run_id}

    def log_config(self, state, config):
        from mlflow.entities import Param

        params = [Param(k, common.dumps(v) if isinstance(v, (list, dict)) else str(v)[:6000])
                  for k, v in common.flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            state.client.log_batch(state.run_id, params=params[i:i + 100])

    def log_scalars(self, state, values, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(common.metric_name(k), float(v), now, int(step)) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            state.client.log_batch(state.run_id, metrics=metrics[i:i + 1000])

    def log_results(self, state, run_dir, metrics):
        from mlflow.entities import Metric, RunTag

        steps = int((metrics.get("train") or {}).get("steps") or state.steps)
        self.log_scalars(state, common.headline(metrics) | common.probe_scalars(run_dir), steps)
        now = int(time.time() * 1000)
        points = [Metric(common.metric_name(name), v, now, t) for name, curve in common.curves(metrics).items()
                  for t, v in curve]
        for i in range(0, len(points), 1000):
            state.client.log_batch(state.run_id, metrics=points[i:i + 1000])
        labels = common.labels(run_dir, metrics)
        if labels:
            state.client.log_batch(state.run_id, tags=[RunTag(k, v[:8000]) for k, v in labels.items()])
        state.client.log_text(state.run_id, common.describe(labels, metrics), "summary.md")
        self.log_run_dir(state, run_dir)

    def log_run_dir(self, state, run_dir):
        """Every file of the run directory under the artifact ``run/`` (not the store itself, when it lies
        inside, nor the resumable state)."""
        run_dir = Path(run_dir).resolve()
        for path in sorted(run_dir.rglob("*")):
            if not path.is_file() or path.is_symlink() or path.name in SKIPPED or path.name.endswith(".tmp"):
                continue
            if state.local_store is not None and path.is_relative_to(state.local_store):
                continue
            rel = path.relative_to(run_dir).parent
            state.client.log_artifact(state.run_id, str(path), "run" if rel == Path(".") else f"run/{rel.as_posix()}")

    def log_failure(self, state, failure):
        from mlflow.entities import RunTag

        state.client.log_batch(state.run_id, tags=[RunTag(f"iclbench.{k}", str(v)[:8000])
                                                   for k, v in failure.items()])
        run_dir = Path(state.client.get_run(state.run_id).data.tags.get("iclbench.run_dir", ""))
        if run_dir.is_dir():  # what the failed run left (status.json, train.log) helps to see why
            self.log_run_dir(state, run_dir)

    def finish(self, state, status):
        state.client.set_terminated(state.run_id, status)


LOGGER = MLflowLogger()


# the lifecycle hooks, each handed to LOGGER (pluggy finds them by these names)
(iclbench_run_started, iclbench_train_log, iclbench_eval_finished, iclbench_run_finished,
 iclbench_run_failed) = common.forwarding_hooks(LOGGER)
