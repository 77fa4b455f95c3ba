"""TensorBoard run logger (``--log tensorboard``; ``pip install 'iclbench[tensorboard]'``).

Event files (``torch.utils.tensorboard``) in ``<run dir>/tensorboard``, or ``DIR/<run name>`` with
``--log tensorboard=DIR``, so ``tensorboard --logdir results`` (or ``DIR``) shows every run side by side:
the training curve (``train/loss``, ``train/lr``, ... by step); the headline error of the model and every
baseline with its CI, the excess over the Bayes baseline, the OOD errors and the probes' numbers
(``probe/NAME.KEY``, ``Probe.tracker_summary``) at the last step; the
per-position error curves (``curve/NAME``, step = context position); the text panels ``config`` (the
resolved config), ``labels`` (learned or not, and what each probe says in words) and ``failure``;
the config and the headline error in the HParams dashboard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import common


@dataclass
class State:
    writer: object
    logdir: Path
    params: dict
    steps: int


class TensorBoardLogger(common.Logger):
    name = "tensorboard"
    extra = "tensorboard"

    def library(self):
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)

    def open(self, run_dir, config, target):
        from torch.utils.tensorboard import SummaryWriter

        logdir = (Path(target) / config.run_name) if target else Path(run_dir) / "tensorboard"
        logdir.mkdir(parents=True, exist_ok=True)
        return State(SummaryWriter(log_dir=str(logdir)), logdir, common.flat_config(config), int(config.train.steps))

    def where(self, state):
        return {"logdir": str(state.logdir)}

    def log_config(self, state, config):
        lines = [f"    {k}: {common.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in state.params.items()]
        state.writer.add_text("config", "\n".join(lines), 0)  # indented: a code block in the text panel
        state.writer.flush()

    def log_scalars(self, state, values, step):
        for k, v in values.items():
            state.writer.add_scalar(common.metric_name(k), v, step)

    def log_results(self, state, run_dir, metrics):
        steps = int((metrics.get("train") or {}).get("steps") or state.steps)
        head = common.headline(metrics)
        self.log_scalars(state, head | common.probe_scalars(run_dir), steps)
        for name, curve in common.curves(metrics).items():
            for t, v in curve:
                state.writer.add_scalar(name, v, t)
        labels = common.labels(run_dir, metrics)
        state.writer.add_text("labels", common.describe(labels, metrics), steps)
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else common.dumps(v)
                   for k, v in state.params.items()}
        if "error/model" in head:
            state.writer.add_hparams(hparams, {"hparam/error": head["error/model"]}, run_name=".",
                                     global_step=steps)
        state.writer.flush()

    def log_failure(self, state, failure):
        state.writer.add_text("failure", "\n".join(f"- {k}: {v}" for k, v in failure.items()), 0)
        state.writer.flush()

    def finish(self, state, status):
        state.writer.flush()
        state.writer.close()


LOGGER = TensorBoardLogger()


# the lifecycle hooks, each handed to LOGGER (pluggy finds them by these names)
(iclbench_run_started, iclbench_train_log, iclbench_eval_finished, iclbench_run_finished,
 iclbench_run_failed) = common.forwarding_hooks(LOGGER)
