"""``iclbench bench --to-learned``: steps and wall time until a model has *learned* its task and until its
held-out error is *flat*, for this project's recipe (the task's training defaults) against Garg et al.'s
(Adam at a constant lr 1e-4, batch 64, no weight decay, their curriculum where the task declares one), both
trained until flat (:class:`iclbench.trainer.Schedule`) in one process, one after the other, on the same
machine, from the same initialisation and data seed.

"Learned" is the run's own label read on the held-out set: the 95 % interval of the relative excess over
the task's Bayes predictor, (error − Bayes) / (zero − Bayes), wholly below
:data:`iclbench.evaluate.LEARNED_BELOW` (0.1). "Flat" is the stop rule's decision (the cooldown's start).
"""

from __future__ import annotations

from .build import build
from .config import resolve
from .errors import ICLBenchError
from .evaluate import BAYES, LEARNED_BELOW
from .trainer import resolve_device, train

#: Garg et al. 2022's training recipe, in this project's options (their Adam: AdamW without decay; a
#: constant rate: no warmup, no decay; betas stay this project's (0.9, 0.99): not an option here)
GARG = {"train.lr": 1e-4, "train.batch_size": 64, "train.warmup": 0, "train.min_lr_ratio": 1.0,
        "train.weight_decay": 0.0}


def recipes(task_options) -> dict[str, dict]:
    """The recipes compared: ours (the task's defaults) and Garg et al.'s (with their curriculum where the
    task declares the option)."""
    garg = dict(GARG)
    if hasattr(task_options, "curriculum"):
        garg["task.curriculum"] = True
    return {"ours": {}, "garg": garg}


def first(history: list[dict], test) -> dict | None:
    return next((h for h in history if test(h)), None)


def time_to_learned(task: str, model: str, *, max_steps: int, seed: int = 0, overrides=(), device: str = "auto",
                    registry=None) -> list[dict]:
    """Train ``model`` on ``task`` with each recipe until flat (cap ``max_steps``); per recipe: steps and
    seconds to learned and to flat (None: not within the cap), the final held-out relative excess interval."""
    from .registry import get_registry

    registry = registry or get_registry()
    dev = resolve_device(device)
    rows = []
    base = resolve(registry, task=task, model=model, overrides=list(overrides))
    for name, recipe in recipes(base.task_options).items():
        sets = [*overrides, "train.until=flat", f"train.max_steps={max_steps}",
                *(f"{k}={v}" for k, v in recipe.items())]
        cfg = resolve(registry, task=task, model=model, seed=seed, overrides=sets)
        built_task, net = build(registry, cfg, dev)
        bayes = registry.task_baselines(built_task.training_task(cfg.seed)).get(BAYES)  # of what it trains on
        if bayes is None:
            raise ICLBenchError(f"task '{task}' has no '{BAYES}' baseline: 'learned' is not defined for it")
        stats = train(net, built_task, cfg.train, cfg.seed, dev, reference=bayes.obj)
        history = stats["stop"]["heldout"]
        learned = first(history, lambda h: h["relative_excess"][1] < LEARNED_BELOW)
        flat_at = stats["stop"]["decay_from"]
        flat = first(history, lambda h: h["step"] == flat_at) if flat_at else None
        rows.append({"recipe": name, "settings": recipe, "lr": cfg.train.lr, "batch_size": cfg.train.batch_size,
                     "steps_to_learned": learned and learned["step"], "s_to_learned": learned and learned["elapsed_s"],
                     "steps_to_flat": flat and flat["step"], "s_to_flat": flat and flat["elapsed_s"],
                     "stopped": stats["stop"]["reason"], "steps": stats["steps"], "train_s": stats["train_time_s"],
                     "final_relative_excess": history[-1]["relative_excess"]})
    return rows


def ratio(theirs: dict, ours: dict, key: str) -> str:
    """Garg's time over ours; a lower bound (">") where their recipe did not get there within the cap."""
    if ours[key] is None:
        return "n/a (ours not within the cap)"
    if theirs[key] is None:
        return f"> {theirs['train_s'] / ours[key]:.1f}x (theirs not within the cap)"
    return f"{theirs[key] / ours[key]:.1f}x"


def table(rows: list[dict], fmt: str = "github") -> str:
    from tabulate import tabulate

    def cell(v, spec):
        return "—" if v is None else format(v, spec)

    body = [[r["recipe"], r["lr"], r["batch_size"], cell(r["steps_to_learned"], "d"), cell(r["s_to_learned"], ".0f"),
             cell(r["steps_to_flat"], "d"), cell(r["s_to_flat"], ".0f"), f"{r['steps']} ({r['stopped']})",
             "[{:.3f}, {:.3f}]".format(*r["final_relative_excess"])] for r in rows]
    text = tabulate(body, headers=["recipe", "lr", "batch", "steps to learned", "s to learned", "steps to flat",
                                   "s to flat", "steps (stop)", "final rel. excess"], tablefmt=fmt,
                    disable_numparse=True)
    by = {r["recipe"]: r for r in rows}
    return (f"{text}\n\ntime to learned, Garg et al.'s recipe over ours: "
            f"{ratio(by['garg'], by['ours'], 's_to_learned')}; time to flat: "
            f"{ratio(by['garg'], by['ours'], 's_to_flat')}")
