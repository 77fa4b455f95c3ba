"""Seeds trained together: N models of one configuration stacked into one set of ``[N, ...]`` parameters and
stepped as one (``torch.func.stack_module_state`` + ``vmap``), each seed with its own data stream.

Every seed gets exactly the update a separate run would: the loss is the sum of the per-seed losses (so each
seed's gradient is its own), gradients are clipped per seed, and AdamW is elementwise. What differs is
float rounding in the batched kernels (tested: parameters within 1e-5 of separate runs after several steps).
On a GPU, where one small model leaves the device mostly idle, N seeds cost little more than one; on a CPU,
where each seed is already GEMM-bound, it does not pay (``iclbench bench --seeds N`` measures both).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import TrainOptions
from .task import Batch
from .trainer import autocast, normalized_error


class StackedSeeds:
    """Train ``models`` (same class and configuration, different initialisations) as one stacked model."""

    def __init__(self, models: list[nn.Module], o: TrainOptions):
        from torch.func import functional_call, stack_module_state, vmap

        self.n, self.o = len(models), o
        self.names = [n for n, _ in models[0].named_parameters()]
        params, self.buffers = stack_module_state(models)
        self.params = {n: params[n] for n in self.names}
        base = copy.deepcopy(models[0]).to("meta")
        self.device = next(iter(self.params.values())).device

        def one(p, b, x):
            return functional_call(base, (p, b), (x,))

        self.forward = vmap(one)
        fused = self.device.type in ("cpu", "cuda")
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=o.lr, weight_decay=o.weight_decay,
                                     betas=(0.9, 0.99), fused=fused)

    def step(self, batches: list[Batch], normalizer: torch.Tensor, lr: float,
             scored: torch.Tensor | None = None) -> torch.Tensor:
        """One optimisation step of every seed on its own batch; returns the per-seed losses ``[N]`` (no
        sync). The loss is :func:`~iclbench.trainer.training_loss` per seed, summed."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        inputs = torch.stack([b.inputs for b in batches])
        stacked = Batch(inputs, torch.stack([b.targets for b in batches]), batches[0].mask)
        with autocast(self.device, self.o.precision):
            pred = self.forward(self.params, self.buffers, inputs)  # [N, B, T, d_out]
        err = normalized_error(pred, stacked, normalizer)  # [N, B, T]
        if scored is not None:
            err = err.index_select(2, scored)
        losses = err.flatten(1).mean(1)
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        if self.o.grad_clip:
            self.clip(self.o.grad_clip)
        self.opt.step()
        return losses.detach()

    def clip(self, max_norm: float):
        """``clip_grad_norm_`` of each seed separately: the same formula, on a ``[N]`` vector of norms."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], 1).norm(dim=1)  # [N]
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))

    def state_dict(self, i: int, model: nn.Module) -> dict:
        """Seed ``i``'s weights in ``model``'s own state-dict layout (an ordinary run's checkpoint)."""
        state = model.state_dict()
        for name, p in self.params.items():
            state[name] = p[i].detach().clone()
        for name, b in self.buffers.items():
            state[name] = b[i].clone()
        return state

    def optimizer_state(self, i: int) -> dict:
        """Seed ``i``'s AdamW state in the layout of a separate run's optimizer (same parameter order), so a
        checkpoint of a stacked run resumes as an ordinary run."""
        full = self.opt.state_dict()
        state = {}
        for idx, s in full["state"].items():
            state[idx] = {k: (v if k == "step" else v[i]).clone() for k, v in s.items()}
        return {"state": state, "param_groups": copy.deepcopy(full["param_groups"])}


def train_stacked(plans: list, device: torch.device, o: TrainOptions, *, progress: bool = False) -> None:
    """Train the seeds of ``plans`` (:class:`~iclbench.seeds.Plan`: a run directory, its config, task, freshly
    built model and open log, with the run's lock held) as one stacked model, leaving each run directory as
    an ordinary run leaves it when killed right after training (weights, log, a final training state): the
    runner then only evaluates it. Every ``o.checkpoint_every`` steps each seed gets an ordinary mid-training
    checkpoint (its own weights, AdamW state and data stream), so a killed stacked job resumes seed by seed.
    Each seed draws exactly the batches its separate run would (its own generator, seeded alike)."""
    import json
    import time

    from tqdm.auto import tqdm

    from . import store
    from .errors import TrainingDiverged
    from .trainer import Curriculum, learning_rate

    first = plans[0]
    gens = [torch.Generator(device=device).manual_seed(p.cfg.seed) for p in plans]
    stacked = StackedSeeds([p.model for p in plans], o)
    stages = Curriculum(first.task, o.steps, device, first.task.score_from if o.loss_positions == "scored" else 0)
    n = len(plans)
    sums = torch.zeros(n, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    bad = torch.zeros(n, dtype=torch.bool, device=device)
    last = torch.full((n,), float("nan"), device=device)
    window_tokens = tokens_done = 0
    bar = tqdm(total=o.steps, disable=not progress, desc=f"train {n} seeds stacked", unit="step", leave=False,
               dynamic_ncols=True)
    start = window_start = time.perf_counter()
    for p in plans:
        p.log.write(json.dumps({"event": "start", "run": p.cfg.run_name, "device": str(device),
                                "stacked_seeds": [q.cfg.seed for q in plans]}) + "\n")
    try:
        for step in range(o.steps):
            stage = stages(step)
            batches = [stage.task.sample(o.batch_size, g, device) for g in gens]
            losses = stacked.step(batches, stage.normalizer, learning_rate(step, o), stage.scored(batches[0]))
            sums += losses
            bad |= ~torch.isfinite(losses)
            last = losses
            window_tokens += batches[0].inputs.shape[0] * batches[0].inputs.shape[1]
            bar.update(1)
            done = step + 1
            if done % o.log_every == 0 or done == o.steps:
                if bool(bad.any()):  # one sync per log interval, as in a separate run
                    seeds = [p.cfg.seed for p, b in zip(plans, bad.tolist()) if b]
                    raise TrainingDiverged(f"training diverged (seeds {seeds}) by step {done}")
                now = time.perf_counter()
                for p, total in zip(plans, sums.tolist()):
                    p.log.write(json.dumps({"step": done, "loss": total / ((step % o.log_every) + 1),
                                            "lr": learning_rate(step, o),
                                            "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                                            "elapsed_s": now - start}) + "\n")
                tokens_done += window_tokens
                window_tokens, window_start = 0, now
                sums.zero_()
            if o.checkpoint_every and done % o.checkpoint_every == 0 and done < o.steps:
                if bool(bad.any()):
                    raise TrainingDiverged(f"training diverged by step {done}")
                elapsed = time.perf_counter() - start
                for i, (p, total) in enumerate(zip(plans, sums.tolist())):
                    p.log.flush()
                    store.save_training_state(p.run_dir / store.TRAIN_STATE, {
                        "step": done, "model": stacked.state_dict(i, p.model),
                        "optimizer": stacked.optimizer_state(i), "generator": gens[i].get_state(),
                        "running_loss": total, "window_tokens": window_tokens, "tokens": tokens_done,
                        "elapsed_s": elapsed, "device": device.type, "log_offset": p.log.tell(),
                        "segments": p.segments})
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    for i, (p, loss) in enumerate(zip(plans, last.tolist())):
        p.model.load_state_dict(stacked.state_dict(i, p.model))
        stats = {"steps": o.steps, "final_loss": loss, "train_time_s": wall,
                 "tokens_per_s": tokens_done / max(wall, 1e-9), "resumed_from_step": 0, "stacked_with": n}
        p.log.write(json.dumps({"event": "trained", **stats}) + "\n")
        p.log.flush()
        store.save_state_dict(p.run_dir / store.CHECKPOINT, p.model.state_dict(),
                              {"config": json.dumps(p.cfg.to_dict())})
        store.save_training_state(p.run_dir / store.TRAIN_STATE, {
            "step": o.steps, "trained": stats, "device": device.type, "log_offset": p.log.tell(),
            "segments": p.segments})
