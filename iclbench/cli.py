"""Command line: ``iclbench run | list | leaderboard | ...``, and the commands plugins add
(``iclbench_add_commands``). Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ICLBenchError, one_line

KINDS = ("tasks", "models", "baselines", "probes")


def _add_run(sub):
    p = sub.add_parser("run", help="train a model on a task, evaluate it beside the baselines, record the run")
    p.add_argument("--task", help="task name (see `iclbench list tasks`)")
    p.add_argument("--model", help="model name (see `iclbench list models`)")
    p.add_argument("--config", help="YAML file with task/model/train/eval/seed/device/out keys")
    p.add_argument("--steps", type=int, help="training steps (train.steps)")
    p.add_argument("--seed", type=int, help="seed for initialisation and the training stream")
    p.add_argument("--seeds", help="several seeds of this config, e.g. 0-9 or 0,3,7: one run directory each; "
                   "on a CPU as parallel 1-thread processes (--jobs)")
    p.add_argument("--jobs", type=int, help="processes for --seeds on a CPU (default: one per core)")
    p.add_argument("--stack", choices=("auto", "yes", "no"), default="auto",
                   help="--seeds trained together as one stacked model: auto (on a GPU or MPS, not when compiled; "
                   "on a CPU separate processes are as fast), yes, no")
    p.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--out", help="results directory (default: results)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set task.noise=0.1 --set model.d_model=128")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table; print the run dir")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of this config from its "
                   "last checkpoint (a plain rerun does so too; --resume fails if there is nothing to resume)")
    p.add_argument("--force", action="store_true", help="start afresh even if this config already ran "
                   "(complete or interrupted); without it a complete run is not retrained")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training (train.compile)")
    p.add_argument("--no-probes", action="store_true", help="skip the probes after evaluation (eval.probes)")
    p.add_argument("--log", action="append", default=[], metavar="LOGGER[=TARGET]",
                   help="also log the run to an experiment tracker (repeatable): mlflow (store: "
                   "OUT/mlruns, or mlflow=TRACKING_URI), tensorboard (RUN_DIR/tensorboard, or tensorboard=DIR); "
                   "needs pip install 'iclbench[mlflow]' / 'iclbench[tensorboard]'")


def cmd_run(args) -> int:
    from .runner import run

    if args.compile:
        args.overrides.append("train.compile=true")
    if args.jobs is not None and args.jobs < 1:
        raise ICLBenchError(f"--jobs must be >= 1, got {args.jobs}")
    if args.seeds is not None:
        return run_many_seeds(args)
    result = run(args.task, args.model, config=args.config, steps=args.steps, seed=args.seed,
                 resume=args.resume, force=args.force,
                 device=args.device, out=args.out, quiet=args.quiet,
                 overrides=_run_overrides(args))
    unstable = unstable_warning(result.run_dir, result.metrics)
    if args.quiet:
        print(result.run_dir)
        return _unstable_end([unstable])
    m = result.metrics
    if result.outcome == "complete":
        print(f"already complete, not retrained (--force retrains): {result.run_dir}\n")
    elif result.outcome == "resumed" and result.resumed_after_training:
        print(f"resumed after training (the {m['train']['steps']} steps were not rerun; their training figures "
              "are kept): evaluated again\n")
    elif result.outcome == "resumed":
        print(f"resumed from the checkpoint at step {m['train']['resumed_from_step']}\n")
    print(format_curves(m))
    print(f"[lo, hi]: {round(100 * m['curves'].get('confidence', 0.95))}% bootstrap interval over the evaluation "
          "sequences (this model's score; the leaderboard's ± is an interval over training seeds)")
    if m.get("ood"):
        print(f"\nout of distribution (mean t>={m['curves']['score_from']}, each normalized by its shifted "
              "task's prior mean):")
        print(format_ood(m))
    t = m["train"]
    print(f"\n{m['task']} × {m['model']} seed {m['seed']} on {m['provenance']['device']}: "
          f"{t['steps']} steps in {t['train_time_s']:.1f}s ({t['tokens_per_s']:,.0f} tokens/s), "
          f"total {m['wall_time_s']:.1f}s")
    stop = t.get("stop")
    if stop:  # train.until: flat
        print(f"stopped: {stop['reason']}" + (f" (flat at step {stop['decay_from']}, then the cooldown)"
                                              if stop["reason"] == "flat" else " (the cap, train.max_steps)"))
    print(f"run directory: {result.run_dir}")
    return _unstable_end([unstable])


def unstable_warning(run_dir, metrics):
    from .rundir import unstable_warning

    return unstable_warning(run_dir, metrics)


def _unstable_end(warnings) -> int:
    """The end of a command that ran or found runs: one warning line per unstable run (after the tables, where
    it is seen), and exit status 1 if there was one (docs/training.md: diverged, unstable, complete)."""
    from .errors import warn

    warnings = [w for w in warnings if w]
    sys.stdout.flush()
    for line in warnings:
        warn(line)
    return 1 if warnings else 0


def format_ood(metrics: dict, fmt: str = "github") -> str:
    """One row per distribution shift: the summary error of the model and each baseline (or why skipped)."""
    from tabulate import tabulate

    names = ["model"]
    for summary in [metrics["summary"]] + [e["summary"] for e in metrics.get("ood", {}).values() if "summary" in e]:
        names += [n for n in summary if n not in names]  # a shift may add a baseline (ridge once noisy)
    rows, notes = [], []
    for shift, entry in metrics.get("ood", {}).items():
        if "skipped" in entry:  # why, under the table: a sentence in a cell would widen its column
            rows.append([shift, "skipped (below)"] + [""] * (len(names) - 1))
            notes.append(f"{shift}: skipped: {entry['skipped']}")
        else:
            rows.append([shift] + [f"{entry['summary'][n]['mean']:.4f}" if n in entry["summary"] else ""
                                   for n in names])
    table = tabulate(rows, headers=["shift"] + [f"{n} ({metrics['model']})" if n == "model" else n
                                                for n in names], tablefmt=fmt, disable_numparse=True)
    return "\n".join([table, *notes])


def format_curves(metrics: dict, fmt: str = "github") -> str:
    """Per-position table: one row per position, one column per predictor, 'mean [lo, hi]'."""
    from tabulate import tabulate

    curves = metrics["curves"]
    names = ["model"] + [n for n in curves["predictors"] if n != "model"]
    rows = []
    for i, pos in enumerate(curves["positions"]):
        row = [pos]
        for n in names:
            p = curves["predictors"][n]
            row.append(f"{p['curve'][i]:.4f} [{p['curve_lo'][i]:.4f}, {p['curve_hi'][i]:.4f}]")
        rows.append(row)
    k = curves["score_from"]
    row = [f"mean t>={k}"]
    for n in names:
        s = metrics["summary"][n]
        row.append(f"{s['mean']:.4f} [{s['ci'][0]:.4f}, {s['ci'][1]:.4f}]")
    rows.append(row)
    return tabulate(rows, headers=["t"] + [f"{n} ({metrics['model']})" if n == "model" else n for n in names],
                    tablefmt=fmt, disable_numparse=True)


def _run_overrides(args) -> list:
    """--set items, plus --no-probes and --log (a list, passed as a Python value)."""
    return (args.overrides + (["eval.probes=false"] if args.no_probes else [])
            + ([("log", list(args.log))] if args.log else []))


#: ``--stack`` of ``run --seeds`` and ``sweep``: None lets the device decide (iclbench.seeds.stacks_by_default)
STACK = {"auto": None, "yes": True, "no": False}


def run_many_seeds(args) -> int:
    from .seeds import parse_seeds, run_seeds

    if args.seed is not None:
        raise ICLBenchError("give --seed or --seeds, not both")
    seeds = parse_seeds(args.seeds)
    stack = STACK[args.stack]
    results = run_seeds(seeds, jobs=args.jobs, stack=stack, task=args.task, model=args.model, config=args.config,
                        steps=args.steps, resume=args.resume, force=args.force, device=args.device, out=args.out,
                        overrides=_run_overrides(args))
    for seed, (run_dir, outcome, m) in zip(seeds, results):
        print(run_dir if args.quiet else f"seed {seed}: {outcome}, model {m['summary']['model']['mean']:.4f}, "
              f"{m['train']['tokens_per_s']:,.0f} tokens/s: {run_dir}")
    return _unstable_end([unstable_warning(run_dir, m) for run_dir, _, m in results])


def cmd_list(args) -> int:
    from tabulate import tabulate

    from .registry import get_registry

    reg = get_registry()
    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        if kind == "baselines":
            from .task import bayes_kind

            rows = []
            for task_name, entry in sorted(reg.tasks.items()):
                try:
                    task = entry.obj()
                    for name, e in reg.task_baselines(task).items():
                        doc = (getattr(e.obj, "__doc__", None) or "").strip().splitlines()
                        text = e.description or (doc[0] if doc else "")
                        bayes = bayes_kind(e.obj)
                        if bayes:  # exact and quadrature are the posterior mean; the others approximate it
                            text = (f"[Bayes-optimal: {bayes}] " if bayes in ("exact", "quadrature")
                                    else f"[approximates Bayes: {bayes}] ") + text
                        rows.append([f"{task_name}:{name}", text, e.plugin])
                except Exception as exc:  # a broken task must not hide the others
                    rows.append([f"{task_name}:?", f"cannot list: {type(exc).__name__}: {exc}", entry.plugin])
        else:
            table = getattr(reg, kind)
            rows = [[n, e.description, e.plugin] for n, e in sorted(table.items())]
        if len(kinds) > 1:
            print(f"\n{kind}:")
        print(tabulate(rows, headers=["name", "description", "plugin"], tablefmt="plain") if rows
              else f"(no {kind} registered)")
    if reg.clashes:
        print("\ndisabled names (an error when used):")
        for key, err in sorted(reg.clashes.items()):
            print(f"  {key}: {err}")
    if reg.failed:
        print("\nplugins that failed to load:")
        for name, err in reg.failed.items():
            print(f"  {name}: {err}")
    return 0


def cmd_leaderboard(args) -> int:
    from .leaderboard import render, render_compare

    if args.score_from is not None and args.score_from < 0:
        raise ICLBenchError(f"--from must be >= 0, got {args.score_from}")
    if args.compare:
        for path in args.compare:
            if not os.path.isdir(path):
                raise ICLBenchError(f"--compare: {path!r} is not a directory (give two results or run directories)")
        table = render_compare(args.compare[0], args.compare[1], args.format, args.metric, args.score_from)
        if table:
            print(table)
        return 0
    print(render(results_dir(args.results), args.format, metric=args.metric, score_from=args.score_from,
                 tasks=args.task or (), models=args.model or (), include_unstable=args.include_unstable))
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from .report import build_report
    from .rundir import find_runs
    from .store import DamagedRun, read_run

    if args.runs:
        runs = [Path(r) for r in args.runs]
        for r in runs:
            try:
                read_run(r)
            except DamagedRun as exc:
                raise ICLBenchError(f"{r} is not a complete run directory: {exc}") from None
    else:
        runs = []
        for r in find_runs(Path(results_dir(args.results))):
            try:
                read_run(r)
                runs.append(r)
            except DamagedRun:
                pass  # the leaderboard section warns about it
        if not runs:
            raise ICLBenchError(f"no complete runs under {args.results!r}")
    md, page = build_report(runs, Path(args.out), Path(args.results) if not args.runs else None)
    print(f"wrote {md} and {page}")
    return 0


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="run every task × model × seed × override of an experiment file")
    p.add_argument("experiment", help="experiment YAML: base, grid and/or runs (see README, Sweeps)")
    p.add_argument("--executor", default="local", choices=("local", "ray"),
                   help="local: a process pool on this machine; ray: a Ray cluster (pip install 'iclbench[ray]')")
    p.add_argument("--jobs", type=int, help="runs at once (local default: cores / cpus-per-run; ray: what the "
                   "cluster holds)")
    p.add_argument("--cpus-per-run", type=float, help="torch threads (and Ray CPUs) per run (default: "
                   "cores / jobs locally, 1 on Ray)")
    p.add_argument("--gpus-per-run", type=float, default=0, help="Ray GPUs per run, fractions allowed")
    p.add_argument("--address", help="Ray cluster to join (e.g. auto, HOST:6379, ray://HOST:10001); "
                   "default: start a local one")
    p.add_argument("--connect-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --address: give up joining the Ray cluster after this long, the whole start "
                   "included (default: 60)")
    p.add_argument("--stack", choices=("auto", "yes", "no"), default="auto",
                   help="the seeds of each config (runs that differ only in seed) as one job, trained together "
                   "as one stacked model, each still a run of its own: auto (where their device is a GPU or MPS, "
                   "not when compiled; on a CPU separate processes are as fast), yes, no")
    p.add_argument("--out", help="results directory for every run (default: base.out, else results)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the runs (and the stacked jobs); "
                   "run nothing")
    p.add_argument("--only", action="append", metavar="GLOB", help="only the runs whose names match this "
                   "shell-style pattern (repeatable), e.g. 'relu-nn-gpt6l-*-s[0-4]'; --dry-run shows the names")
    p.add_argument("--max-runs", type=int, default=None,
                   help="refuse an experiment of more runs than this (default: 100000), counted before expanding")
    p.add_argument("--quiet", action="store_true", help="no progress display (on a terminal a bar, otherwise a "
                   "line per finished run); only failures and the summary")


def cmd_sweep(args) -> int:
    from .sweep import MAX_RUNS, RAY_START_TIMEOUT, check_runs, load_experiment, plan_jobs, plan_table, run_sweep

    max_runs = MAX_RUNS if args.max_runs is None else args.max_runs
    if max_runs < 1:
        raise ICLBenchError(f"--max-runs must be >= 1, got {max_runs}")
    stack = STACK[args.stack]
    experiment = load_experiment(args.experiment, out=args.out, max_runs=max_runs, collect_errors=args.dry_run)
    if args.only:
        experiment = experiment.only(args.only)
    if args.dry_run:  # every run's config checked as a run would check it before training: one line each
        checked = check_runs(experiment, devices=args.executor == "local")
        problems = experiment.invalid + list(checked.values())
        if experiment.runs:
            jobs, notes = plan_jobs([p for p in experiment.runs if p.name not in checked and not p.is_complete()],
                                    stack, args.executor, args.gpus_per_run)
            print(plan_table(experiment, checked, jobs))
            for note in notes:
                print(note)
        for line in problems:  # one line each, then one error line
            print(f"iclbench: invalid run: {line}", file=sys.stderr)
        if problems:
            print(f"iclbench: error: {len(problems)} invalid run(s) in {args.experiment} (listed above); fix them "
                  "before running the sweep", file=sys.stderr)
            return 2
        return 0
    report = run_sweep(experiment, args.executor, jobs=args.jobs, cpus_per_run=args.cpus_per_run,
                       gpus_per_run=args.gpus_per_run, address=args.address, progress=not args.quiet,
                       connect_timeout=RAY_START_TIMEOUT if args.connect_timeout is None else args.connect_timeout,
                       stack=stack)
    print(report.summary())
    if report.signal:
        return 130
    return 1 if report.failed or report.unstable else 0


def _add_probe(sub):
    p = sub.add_parser("probe", help="run interpretability probes on a finished run (stored in its directory) "
                       "or an exported model (printed)")
    p.add_argument("run_dir", metavar="PATH", help="a run directory (results/<task>-<model>-<hash>-s<seed>) or an "
                   "exported model (results/reference/models/<run name>, see `iclbench export`)")
    p.add_argument("--out", help="store probes.json and the tables (probes/<name>.csv) in this folder instead "
                   "of the run directory; an exported model is never written to: without --out its probes are "
                   "printed only")
    p.add_argument("--probe", action="append", help="only this probe (repeatable; see `iclbench list probes`)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the probe sequences and resamples (default: the run's eval.seed + 1); another "
                        "seed draws another probe sample")


def cmd_probe(args) -> int:
    from .export import is_export
    from .probing import describe, probe_run_dir
    from .rundir import PROBES_DIR

    outcomes = probe_run_dir(args.run_dir, args.probe, args.device, seed=args.seed, out=args.out)
    stored = args.out is not None or not is_export(args.run_dir)
    print(describe(outcomes, tables=(os.path.join(args.out, PROBES_DIR) if args.out else PROBES_DIR) if stored
                   else None))
    if not stored:
        print(f"(printed only: {args.run_dir} is an exported model, never written to; --out DIR stores "
              "probes.json and the tables)")
    return 0


def _add_export(sub):
    p = sub.add_parser("export", help="a finished run's weights, resolved config and manifest in a folder of "
                       "their own, which `iclbench probe` and iclbench.load open (reference models)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run directories")
    p.add_argument("--out", required=True, help="folder to export into: one OUT/<run name>/ per run "
                   "(model.safetensors, config.yaml, manifest.json)")
    p.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                   help="storage dtype of the weights (default float16: measured, docs/usage.md); where rounding "
                   "moves the error beyond the tolerance, float32 is stored instead")


def cmd_export(args) -> int:
    from .export import STORAGE_DTYPE, check_exportable, describe_export, export_run

    check_exportable(args.run_dirs)  # every input checked before anything is written
    for run_dir in args.run_dirs:
        manifest = export_run(run_dir, args.out, dtype=args.dtype or STORAGE_DTYPE)
        print(describe_export(manifest, os.path.join(args.out, manifest["name"])))
    return 0


def results_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise ICLBenchError(f"results directory {path!r} does not exist (pass --results DIR)")
    return path


def _add_bench(sub):
    p = sub.add_parser("bench", help="training and forward-with-cache throughput and memory of a model, side "
                       "by side with TransformerLens when installed")
    p.add_argument("--task", required=True, help="task name (see `iclbench list tasks`)")
    p.add_argument("--model", required=True, help="model name (see `iclbench list models`)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set train.batch_size=128 --set task.context_len=64")
    p.add_argument("--rounds", type=int, default=10, help="alternating timing rounds per measurement")
    p.add_argument("--steps", type=int, default=10, help="training steps (or forward passes) per round")
    p.add_argument("--compile", action="store_true", help="torch.compile the models before timing")
    p.add_argument("--no-tl", action="store_true", help="skip TransformerLens even when it is installed")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face GPT2Model (Garg et al.'s model) even "
                   "when transformers is installed")
    p.add_argument("--seeds", type=int, default=0, help="also time N seeds one after another against the same "
                   "N stacked into one model")
    p.add_argument("--scaling", action="store_true", help="also the scaling table: training tokens/s by "
                   "model and context length")
    p.add_argument("--scaling-models", default="gpt1l,gpt2l,gpt3l,gpt6l,gpt12l", help="comma-separated")
    p.add_argument("--scaling-contexts", default="16,32,64,128,256", help="comma-separated context lengths")
    p.add_argument("--format", default="github", choices=("github", "plain"), help="table format")
    p.add_argument("--to-learned", action="store_true", help="instead: steps and wall time to learned and to "
                   "flat, this project's recipe against Garg et al.'s, trained until flat side by side")
    p.add_argument("--max-steps", type=int, default=30000, help="with --to-learned: the cap of each training")


def cmd_bench(args) -> int:
    from .bench import main

    return main(args)


def _add_plugin_tools(sub):
    c = sub.add_parser("check", help="check a plugin (or one task, model, probe, task:baseline) against the "
                       "plugin contracts (docs/plugins.md)")
    c.add_argument("names", nargs="+", metavar="PLUGIN_OR_NAME", help="entry-point name of a plugin, or a "
                   "task, model, probe or task:baseline name")
    r = sub.add_parser("rescore", help="score baselines installed after a run finished, without retraining")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="task.KEY=VALUE",
                   help="turn on a baseline a task option registers, e.g. --set task.sklearn=true (decision-tree); "
                   "only options that never change the data")


def cmd_check(args) -> int:
    from .testing import check_plugin

    failed = False
    for name in args.names:
        try:
            print("\n".join(check_plugin(name)))
        except AssertionError as exc:
            print(str(exc))
            failed = True
    return 1 if failed else 0


def cmd_rescore(args) -> int:
    from .rescore import rescore
    from .trainer import resolve_device

    resolve_device(args.device)  # before any run: an impossible device is refused whatever needs scoring
    for run_dir in args.run_dirs:
        out = rescore(run_dir, device=args.device, overrides=args.overrides)
        added = ", ".join(out["added"]) or "no new baseline"
        print(f"{run_dir}: {added}" + "".join(f"\n  refused {n}: {r}" for n, r in out["refused"].items()))
    return 0


def parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="iclbench", description="Benchmark suite for in-context learning.")
    p.add_argument("--version", action="version", version=f"iclbench {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_sweep(sub)
    _add_bench(sub)
    _add_probe(sub)
    _add_export(sub)
    _add_plugin_tools(sub)
    lp = sub.add_parser("list", help="list registered tasks, models, baselines, probes")
    lp.add_argument("kind", nargs="?", choices=KINDS)
    lb = sub.add_parser("leaderboard", help="table of every run under a results directory")
    lb.add_argument("--results", default="results", help="results directory (default: results)")
    from .leaderboard import FORMATS

    lb.add_argument("--format", default="github", choices=FORMATS)
    from .leaderboard import METRIC_HELP

    lb.add_argument("--metric", default="error", choices=sorted(METRIC_HELP),
                    help="; ".join(f"{k}: {v}" for k, v in METRIC_HELP.items()))
    lb.add_argument("--from", dest="score_from", type=int, metavar="K",
                    help="average over positions t >= K instead of each task's default")
    lb.add_argument("--task", action="append", help="only this task (repeatable)")
    lb.add_argument("--model", action="append", help="only this model (repeatable); baselines stay")
    lb.add_argument("--include-unstable", action="store_true", help="also rank runs whose error is non-finite "
                    "or absurd (over 3x the zero predictor's), which are left out with a warning by default")
    lb.add_argument("--compare", nargs=2, metavar=("A", "B"),
                    help="two results or run directories side by side: B - A and whether it exceeds the CI")
    rp = sub.add_parser("report", help="Markdown + HTML report with figures for runs")
    rp.add_argument("runs", nargs="*", help="run directories (default: every complete run under --results)")
    rp.add_argument("--results", default="results", help="results directory (default: results)")
    rp.add_argument("--out", default="report", help="output directory (default: report)")
    from .registry import get_registry

    get_registry().notify("iclbench_add_commands", subparsers=sub)  # commands plugins add (hookspecs.py)
    return p


COMMANDS = {"report": cmd_report, "run": cmd_run, "sweep": cmd_sweep, "list": cmd_list,
            "leaderboard": cmd_leaderboard}
COMMANDS.update(probe=cmd_probe, export=cmd_export)

COMMANDS["bench"] = cmd_bench
COMMANDS.update(check=cmd_check, rescore=cmd_rescore)


def main(argv=None) -> int:
    from .errors import raise_on_signals, restore_signals

    args = parser().parse_args(argv)
    previous = raise_on_signals()  # a closed terminal (SIGHUP) or SIGTERM interrupts a run as Ctrl-C does
    try:
        command = COMMANDS.get(args.command) or args.iclbench_command  # a plugin's: iclbench_add_commands
        return command(args)
    except ICLBenchError as exc:
        print(f"iclbench: error: {one_line(exc, 600)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        from .errors import interruption

        resumable = args.command in ("run", "sweep")  # what they were computing continues from its checkpoint
        print(f"iclbench: interrupted by {interruption(exc)}" + ("; rerun the same command to continue from the "
              "latest checkpoint" if resumable else ""), file=sys.stderr)
        return 130
    except MemoryError:
        print("iclbench: error: out of memory; choose smaller sizes (model, train.batch_size, "
              "eval.n_sequences)", file=sys.stderr)
        return 2
    except RecursionError:
        print("iclbench: error: input nested too deeply", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`iclbench sweep FILE --dry-run | head`): stop quietly
        try:  # and leave no second error for the interpreter's final flush of stdout
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141  # 128 + SIGPIPE, as a shell tool killed by it
    except Exception as exc:  # an internal error: one line unless asked for the traceback
        if os.environ.get("ICLBENCH_DEBUG"):
            raise
        print(f"iclbench: internal error: {type(exc).__name__}: {one_line(exc, 600)} (set ICLBENCH_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return 1
    finally:
        restore_signals(previous)


if __name__ == "__main__":
    sys.exit(main())
