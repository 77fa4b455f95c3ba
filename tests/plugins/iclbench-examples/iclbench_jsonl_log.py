"""A third-party iclbench run logger: one JSON line per lifecycle event in <run_dir>/events.jsonl
(the shape of an MLflow, TensorBoard or W&B logger, without the dependency)."""

import json
import time

from iclbench import hookimpl


def _log(run_dir, event, **fields):
    with open(run_dir / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")


@hookimpl
def iclbench_run_started(run_dir, config):
    _log(run_dir, "started", task=config.task, model=config.model, seed=config.seed,
         config_hash=config.config_hash, steps=config.train.steps)


@hookimpl
def iclbench_train_log(run_dir, step, metrics):
    _log(run_dir, "train", step=step, loss=metrics.get("loss"))


@hookimpl
def iclbench_eval_finished(run_dir, config, metrics):
    metrics["extra"]["jsonl_log"] = {"events": str(run_dir / "events.jsonl")}


@hookimpl
def iclbench_run_finished(run_dir, config, metrics):
    _log(run_dir, "finished", model_error=metrics["summary"]["model"]["mean"])


@hookimpl
def iclbench_run_failed(run_dir, config, status, error, plugin):
    _log(run_dir, "failed", status=status, error=error, plugin=plugin)
