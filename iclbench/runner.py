"""One run's life, top to bottom: resolve the config → build the task and model → open the run directory →
train → score beside the baselines → probe → complete. Seeds of one configuration may share their training
(one stacked model); every other phase, the lifecycle hooks included, is each run's own."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import gemm, store
from .build import build, check_plugins
from .config import RunConfig, resolve
from .errors import ICLBenchError, TrainingDiverged
from .evaluate import BAYES, error_curves, evaluation_batch, score
from .pool import pool_variants
from .probing import run_probes
from .registry import Registry, get_registry
from .rundir import OpenRun, RunDir, non_finite_options
from .terminal import isatty
from .trainer import Trainee, resolve_device, train_together


@dataclass
class RunResult:
    """A run: what :func:`run` returns and :func:`load` opens. ``model`` holds the trained weights in eval
    mode; ``metrics`` is ``metrics.json``; ``config`` the resolved :class:`~iclbench.config.RunConfig`;
    ``task`` the task built from it."""
    run_dir: Path
    metrics: dict
    config: RunConfig
    task: object
    model: torch.nn.Module
    outcome: str = "trained"  # "trained", "resumed" (from a checkpoint), "complete" (found done, not rerun) or
    # "exported" (an exported reference model opened by load)
    #: resumed after its training had finished (killed while evaluating or probing): the training figures are
    #: the first attempt's, nothing was retrained
    resumed_after_training: bool = False
    #: an exported reference model's ``manifest.json`` (:mod:`iclbench.export`), whose ``metrics`` are {}
    manifest: dict | None = None

    @property
    def probes(self) -> dict:
        """The probes' summaries (``probes.json``: name → summary, time, table file); {} where none ran."""
        try:
            return RunDir(self.run_dir).probes()
        except store.DamagedRun as exc:
            raise ICLBenchError(f"cannot read the probes of {self.run_dir}: {exc}") from None


def load(run_dir: str | Path, *, device: str = "cpu", registry: Registry | None = None) -> RunResult:
    """Open a finished run without training it: its config, task, model (the trained weights, in eval mode,
    on ``device``) and metrics, from any folder. An incomplete or damaged run directory is one line saying
    what is wrong. An exported reference model (``iclbench export``) opens too: ``outcome`` "exported",
    ``metrics`` {} (it keeps none), ``manifest`` its record (the run's headline error, steps, provenance)."""
    from .export import is_export, load_export

    path = Path(run_dir)
    if not path.is_dir():
        raise ICLBenchError(f"{str(run_dir)!r} is not a directory; iclbench.load wants a run directory "
                            "(RESULTS/<task>-<model>-<hash>-s<seed>) or an exported model")
    if is_export(path):
        manifest, cfg, task, model = load_export(path, registry, device)
        return RunResult(path, {}, cfg, task, model, outcome="exported", manifest=manifest)
    if not (path / store.CONFIG).is_file():
        raise ICLBenchError(f"{path} is not a run directory (no {store.CONFIG}); iclbench.load wants "
                            "RESULTS/<task>-<model>-<hash>-s<seed>")
    try:
        metrics = store.read_run(path)
    except store.DamagedRun as exc:
        raise ICLBenchError(f"{path} is not a complete run ({exc}); iclbench.run(run_dir=...) continues an "
                            "interrupted one") from None
    registry = registry or get_registry()
    cfg, task, model = RunDir(path).load(registry, resolve_device(device))
    return RunResult(path, metrics, cfg, task, model, outcome="complete")


def run(task: str | None = None, model: str | None = None, *, config=None, steps: int | None = None,
        seed: int | None = None, device: str | None = None, out: str | None = None, overrides=(),
        quiet: bool = True, registry: Registry | None = None, run_dir: str | Path | None = None,
        resume: bool = False, force: bool = False) -> RunResult:
    """Train ``model`` on ``task``, evaluate it beside the task's baselines, write the run directory.

    ``config``: a YAML path or a dict in the resolved layout; ``overrides``: ``["task.noise=0.1", ...]`` or
    ``{"task.noise": 0.1}``. Returns a :class:`RunResult`: ``run_dir``, ``metrics``, ``config``, ``task``,
    ``model`` (trained, in eval mode) and ``outcome``. A run's ``config.yaml`` as ``config`` finds that run
    where the file is, from any folder.
    ``run_dir``: write the record there instead of ``out/<run name>`` (a sweep worker without the driver's
    disk computes into a temporary directory and ships the files back); given alone, the run recorded there
    (its ``config.yaml``): returned if complete, continued if interrupted. To open a finished run without
    any chance of training, :func:`load`.

    Rerunning a config continues it: a complete run is returned as recorded (``force=True`` retrains it),
    an interrupted one (Ctrl-C, kill -9) continues from its latest checkpoint (``train.checkpoint_every``)
    and ends with the same metrics as a run that never stopped. ``resume=True`` additionally insists that
    there is an earlier attempt to continue.
    """
    registry = registry or get_registry()
    if run_dir is not None and config is None and task is None and model is None:
        recorded = Path(run_dir) / store.CONFIG
        if not recorded.is_file():
            raise ICLBenchError(f"iclbench.run(run_dir={str(run_dir)!r}) continues the run recorded there, but it "
                                f"holds no {store.CONFIG}; give task and model (or config) to compute a run into "
                                "it, or open a finished run with iclbench.load(run_dir)")
        config = recorded
    cfg = resolve(registry, config=config, task=task, model=model, steps=steps, seed=seed, device=device,
                  out=out, overrides=overrides)
    return run_configs([cfg], registry, quiet=quiet, run_dirs=None if run_dir is None else [run_dir],
                       resume=resume, force=force)[0]


def run_configs(cfgs: list[RunConfig], registry: Registry, *, quiet: bool = True, run_dirs=None,
                resume: bool = False, force: bool = False, stack: bool = False) -> list[RunResult]:
    """The life of one run per config of ``cfgs``, which differ by seed only (see :func:`run`). With
    ``stack``, those that start afresh are trained together as one stacked model; each is still a run of its
    own: its directory, lock, hooks, log, checkpoints and divergence. A run that diverges is recorded so and
    the others go on; the first divergence is raised at the end."""
    dev = resolve_device(cfgs[0].device)
    # a training bar on a terminal only: written into a log file it is hundreds of redraws
    progress = not quiet and isatty(sys.stderr)
    nan = [o for o in non_finite_options(cfgs[0]) if o.endswith("=nan")]
    if nan:  # fails as a bad option, not later as "divergence" with advice to lower the learning rate
        raise ICLBenchError(f"option(s) {', '.join(nan)} must be numbers, got NaN")
    built = [build(registry, cfg, dev) for cfg in cfgs]
    for cfg, (task, model) in zip(cfgs, built):
        check_plugins(registry, cfg, task, model, dev)
        if "model" in registry.task_baselines(task):
            raise ICLBenchError(f"task '{cfg.task}' declares a baseline named 'model', which is reserved")
    paths = [Path(p) for p in run_dirs] if run_dirs else [Path(cfg.out) / cfg.run_name for cfg in cfgs]
    results, diverged = {}, []
    with contextlib.ExitStack() as held:  # each run directory locked until every run is done
        runs = [held.enter_context(RunDir(path).open(cfg, registry, dev, task, model, resume=resume, force=force))
                for path, cfg, (task, model) in zip(paths, cfgs, built)]
        for r in runs:
            if r.found_complete:
                results[r.path] = RunResult(r.path, r.read_complete(), r.cfg, r.task, r.model, outcome="complete")
        live = [r for r in runs if not r.found_complete]
        together = [r for r in live if r.earlier is None and stackable(r.task, r.cfg.seed)] if stack else []
        together = together if len(together) > 1 else []
        for r in live:
            r.start(stacked_with=[s.cfg.seed for s in together] if r in together else None)
        after_training = {r.path for r in live if r.earlier is not None and r.trained}
        groups = ([together] if together else []) + [[r] for r in live if r not in together and not r.trained]
        for group in groups:
            # the reference of train.until: flat is the Bayes predictor of the distribution trained on
            bayes = registry.task_baselines(group[0].task.training_task(group[0].cfg.seed)).get(BAYES)
            for r, outcome in zip(group, train_together([trainee(r) for r in group], group[0].task,
                                                        group[0].cfg.train, dev, progress=progress,
                                                        reference=bayes and bayes.obj)):
                if isinstance(outcome, TrainingDiverged):
                    diverged.append(r.diverged(outcome))
                else:
                    r.finish_training(outcome)
        memo = {}  # the stacked seeds share one task configuration: each baseline predicts once for them all
        for r in live:
            if r.trained:
                metrics = evaluate(r, registry, dev, memo if r in together else None)
                r.complete(metrics)
                results[r.path] = RunResult(r.path, metrics, r.cfg, r.task, r.model,
                                            outcome="trained" if r.earlier is None else "resumed",
                                            resumed_after_training=r.path in after_training)
    if diverged:
        raise diverged[0]
    return [results[path] for path in paths]


def stackable(task, seed: int) -> bool:
    """Whether ``seed``'s run may train stacked with other seeds: not where it trains on a pool of rules of
    its own (:mod:`iclbench.pool`), a distribution of its own; such a seed trains alone."""
    return task.training_task(seed) is task


def trainee(r: OpenRun) -> Trainee:
    """A run as the training loop sees it: its curve goes to its log and loggers, its checkpoints to its
    directory."""
    return Trainee(r.model, r.cfg.seed, log=r.log_train, checkpoint=r.checkpoint, resume=r.resume_from)


#: bootstrap replicates for each OOD variant: its intervals need less precision than the headline's
OOD_BOOTSTRAP = 200


def evaluate(r: OpenRun, registry: Registry, dev: torch.device, memo: dict | None = None) -> dict:
    """Score the trained model beside the task's baselines, run the probes, score each distribution shift;
    return the metrics of the run. ``memo``: baseline predictions shared with runs of the same task
    configuration (:func:`~iclbench.evaluate.score`)."""
    cfg, task, started = r.cfg, r.task, time.perf_counter()
    batch = evaluation_batch(task, cfg.eval, dev)
    score_from = cfg.eval.score_from if cfg.eval.score_from >= 0 else task.score_from
    entries = registry.task_baselines(task)
    owners = {n: f"baseline '{cfg.task}:{n}' (plugin '{e.plugin}')" for n, e in entries.items()}
    owners.update({"model": registry.owner("model", cfg.model), "model.plugin": registry.models[cfg.model].plugin})
    scores = score(r.model, {n: e.obj for n, e in entries.items()}, task, batch, score_from=score_from,
                   replicates=cfg.eval.bootstrap, confidence=cfg.eval.confidence, seed=cfg.eval.seed, owners=owners,
                   memo=memo)
    # the all-zeros predictor anchors the leaderboard's ICL score (0 = zero predictor, 1 = best baseline)
    zero = error_curves({"zero": torch.zeros_like(batch.targets)}, batch, task.normalizer(dev), score_from,
                        replicates=1)["predictors"]["zero"]
    if cfg.eval.probes:  # before metrics.json, which marks the run complete
        r.dir.save_probes(run_probes(r.model, task, seed=cfg.eval.seed + 1, device=dev, registry=registry),
                          replace=True)
    ood = evaluate_ood(r.model, task, registry, cfg, dev, score_from, memo) if cfg.eval.ood else {}
    curves = scores.curves
    return {
        "task": cfg.task,
        "model": cfg.model,
        "seed": cfg.seed,
        "config_hash": cfg.config_hash,
        "groups": {"task": cfg.section_hash("task", "eval"), "model": cfg.section_hash("model", "train")},
        "summary": {name: {"mean": p["mean"], "ci": p["ci"]} for name, p in curves["predictors"].items()},
        "reference": {"zero": {"mean": zero["mean"], "curve": zero["curve"]}},
        "curves": curves,
        "ood": ood,
        "baselines": sorted(scores.baselines),
        "refused_baselines": scores.refused,  # broke the baseline contract; not scored
        "oracles": scores.oracles,
        "train": r.stats,
        "wall_time_s": r.stats["train_time_s"] + time.perf_counter() - started,
        "provenance": {**store.provenance(dev), "seed": cfg.seed, "plugins": registry.plugin_versions(),
                       "train_segments": r.segments, "gemm": {"mode": gemm.mode(), "auto": gemm.summary()}},
        "config": cfg.to_dict(),
        "extra": {},
    }


def evaluate_ood(model, task, registry: Registry, cfg: RunConfig, device: torch.device, score_from: int,
                 memo: dict | None = None) -> dict:
    """The trained model and the baselines on each of ``task.ood_variants()``, and on the run's pool of rules
    for a task trained on one (``pool_rules``, :mod:`iclbench.pool`).

    Each variant gets a fixed evaluation set drawn like the main one (same ``eval.seed``, on the CPU) and is
    normalized by its own prior-mean error, so 1.0 still means "no better than the shifted distribution's
    prior mean"; ``mse`` keeps the raw squared error. A variant the model cannot take (a context longer
    than its positions reach, other input widths) is recorded as ``{"skipped": reason}``, never a crash.
    """
    out = {}
    for name, shifted in {**task.ood_variants(), **pool_variants(task)}.items():
        base, new = dataclasses.asdict(task.options), dataclasses.asdict(shifted.options)
        entry = {"options": {k: v for k, v in new.items() if base.get(k) != v}}
        if (shifted.d_in, shifted.d_out) != (task.d_in, task.d_out):
            out[name] = {**entry, "skipped": f"input/output widths {shifted.d_in}/{shifted.d_out} differ from "
                                             f"the trained {task.d_in}/{task.d_out}"}
            continue
        try:
            curves = score(model, {n: e.obj for n, e in registry.task_baselines(shifted).items()}, shifted,
                           evaluation_batch(shifted, cfg.eval, device), score_from=score_from,
                           replicates=min(cfg.eval.bootstrap, OOD_BOOTSTRAP), confidence=cfg.eval.confidence,
                           seed=cfg.eval.seed, warn=lambda m: None, memo=memo).curves
        except ICLBenchError as exc:
            out[name] = {**entry, "skipped": str(exc)}
            continue
        out[name] = {**entry, "summary": {n: {"mean": p["mean"], "ci": p["ci"], "mse": p["mse"]}
                                          for n, p in curves["predictors"].items()}, "curves": curves}
    return out
