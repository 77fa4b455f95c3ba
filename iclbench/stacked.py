"""Seeds trained together: N models of one configuration stacked into one set of ``[N, ...]`` parameters and
stepped as one (``torch.func.stack_module_state`` + ``vmap``), each seed with its own data stream. The
trainer's one loop (:func:`iclbench.trainer.train_together`) drives it as it drives one model.

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

from .options import TrainOptions
from .step import autocast, make_optimizer, normalized_error
from .task import Batch


class StackedSeeds:
    """Train ``models`` (same class and configuration, different initialisations) as one stacked model."""

    def __init__(self, models: list[nn.Module], o: TrainOptions):
        from torch.func import functional_call, stack_module_state, vmap

        self.n, self.o, self.models = len(models), o, models
        self.names = [n for n, _ in models[0].named_parameters()]
        params, self.buffers = stack_module_state(models)
        self.params = {n: params[n] for n in self.names}
        base = copy.deepcopy(models[0]).to("meta")
        self.device = next(iter(self.params.values())).device

        def one(p, b, x):
            return functional_call(base, (p, b), (x,))

        self.forward = vmap(one)
        self.opt = make_optimizer(self.params.values(), o)

    def step(self, batches: list[Batch], normalizer: torch.Tensor, lrs: list[float],
             scored: torch.Tensor | None = None) -> torch.Tensor:
        """One optimisation step of every seed on its own batch at its own learning rate (0: a seed that has
        stopped); returns the per-seed losses ``[N]`` (no sync). The loss is
        :func:`~iclbench.step.training_loss` per seed, summed."""
        same = all(lr == lrs[0] for lr in lrs)
        for group in self.opt.param_groups:
            group["lr"] = lrs[0] if same else 1.0
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
        if same:
            self.opt.step()
        else:  # AdamW's update is linear in lr: take it at lr 1, then scale each seed's share
            before = {name: p.detach().clone() for name, p in self.params.items()}
            self.opt.step()
            scale = torch.tensor(lrs, dtype=torch.float32, device=self.device)
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(torch.lerp(before[name], p, scale.view(-1, *[1] * (p.dim() - 1))))
        return losses.detach()

    @torch.no_grad()
    def heldout_errors(self, held) -> torch.Tensor:
        """Every seed's per-sequence held-out errors ``[N, B]`` (:class:`iclbench.trainer.HeldOut`)."""
        inputs = held.batch.inputs.expand(self.n, *held.batch.inputs.shape)
        return held.errors(self.forward(self.params, self.buffers, inputs))

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

    def state(self, i: int) -> tuple[dict, dict]:
        """Seed ``i``'s weights and AdamW state, as an ordinary run of it would checkpoint them."""
        return self.state_dict(i, self.models[i]), self.optimizer_state(i)

    def finish(self, models: list[nn.Module]) -> None:
        """Copy each seed's trained weights into its own model."""
        for i, model in enumerate(models):
            model.load_state_dict(self.state_dict(i, model))

    def optimizer_state(self, i: int) -> dict:
        """Seed ``i``'s AdamW state in the layout of a separate run's optimizer (same parameter order), so a
        checkpoint of a stacked run resumes as an ordinary run."""
        full = self.opt.state_dict()
        state = {}
        for idx, s in full["state"].items():
            state[idx] = {k: (v if k == "step" else v[i]).clone() for k, v in s.items()}
        return {"state": state, "param_groups": copy.deepcopy(full["param_groups"])}
