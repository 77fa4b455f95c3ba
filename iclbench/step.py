"""How one optimisation step is computed: the loss, AdamW, clipping, autocast and ``torch.compile``, for one
model (:class:`OneModel`); :class:`iclbench.stacked.StackedSeeds` computes it for N seeds at once."""

from __future__ import annotations

import contextlib

import torch

from .errors import ICLBenchError
from .options import TrainOptions
from .task import Batch


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked for (``train.precision=bf16``); fp32 otherwise."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def normalized_error(pred: torch.Tensor, batch: Batch, normalizer: torch.Tensor) -> torch.Tensor:
    """Per-sequence, per-position squared error over the prior-mean error: ``[B, T]``."""
    return (pred.float() - batch.targets.float()).pow(2).mean(-1) / normalizer


def mask_index(mask: torch.Tensor) -> torch.Tensor | None:
    """The indices of the positions a ``[T]`` mask keeps, or ``None`` when it keeps every position. Syncs
    with the device once: the trainer calls it once per curriculum stage, never per step."""
    if bool(mask.all()):
        return None
    return mask.nonzero().flatten()


def training_loss(pred: torch.Tensor, batch: Batch, normalizer: torch.Tensor,
                  scored: torch.Tensor | None) -> torch.Tensor:
    """The training objective: mean normalized error over the positions the loss takes (``scored``: their
    indices, ``None`` for all). ``index_select`` with an index tensor kept on the device takes the place of
    boolean indexing, which syncs; the values and their order are the same, so the loss is bitwise unchanged."""
    err = normalized_error(pred, batch, normalizer)
    return (err if scored is None else err.index_select(1, scored)).mean()


def make_optimizer(params, o: TrainOptions) -> torch.optim.Optimizer:
    """AdamW over a model's parameters (or a list of tensors); its fused kernel (one pass over all weights)
    on devices that have one."""
    params = list(params.parameters() if isinstance(params, torch.nn.Module) else params)
    fused = params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=(0.9, 0.99), fused=fused)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Batch, normalizer: torch.Tensor,
               lr: float, o: TrainOptions, scored: torch.Tensor | None | str = "mask") -> torch.Tensor:
    """One optimisation step on ``batch``; returns the loss as a tensor (the caller decides when to sync).
    ``iclbench bench`` times exactly this function for every model it compares. ``scored``: the indices of
    the positions the loss takes (:func:`mask_index`), or ``"mask"`` to derive them from ``batch.mask``
    (one sync). Nothing in here waits for the device."""
    if isinstance(scored, str):
        scored = mask_index(batch.mask)
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast(batch.inputs.device, o.precision):
        pred = model(batch.inputs)
    loss = training_loss(pred, batch, normalizer, scored)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip, foreach=True)
    opt.step()
    return loss.detach()


def compile_model(model: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """``torch.compile(model)``, sharing its parameters; a failure is one line, not a compiler traceback.
    On CUDA with mode ``reduce-overhead``: the compiled forward and backward are captured as CUDA graphs
    (the step has no host sync, so capture is possible); elsewhere the default mode."""
    cuda = device is not None and device.type == "cuda"
    try:
        return torch.compile(model, mode="reduce-overhead") if cuda else torch.compile(model)
    except Exception as exc:
        raise compile_error(exc) from None


def compile_error(exc: Exception) -> ICLBenchError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ICLBenchError(f"--compile is not supported here ({type(exc).__name__}: {first[:200]}); "
                         "run without --compile")


class OneModel:
    """The step of one model (N = 1): :func:`train_step` with its own AdamW, on a compiled copy of the model
    when ``train.compile`` is set."""

    def __init__(self, model: torch.nn.Module, o: TrainOptions, device: torch.device):
        self.model, self.o = model, o
        self.opt = make_optimizer(model, o)
        self.step_model = compile_model(model, device) if o.compile else model

    def step(self, batches: list[Batch], normalizer: torch.Tensor, lrs: list[float],
             scored: torch.Tensor | None = None) -> torch.Tensor:
        """The loss ``[1]`` (no sync)."""
        return train_step(self.step_model, self.opt, batches[0], normalizer, lrs[0], self.o, scored).reshape(1)

    @torch.no_grad()
    def heldout_errors(self, held) -> torch.Tensor:
        """The per-sequence held-out errors ``[1, B]`` (:class:`iclbench.trainer.HeldOut`)."""
        self.model.eval()
        try:
            return held.errors(self.model(held.batch.inputs))[None]
        finally:
            self.model.train()

    def state(self, i: int) -> tuple[dict, dict]:
        """The weights and the AdamW state."""
        return self.model.state_dict(), self.opt.state_dict()

    def load(self, i: int, weights: dict, optimizer: dict) -> None:
        self.model.load_state_dict(weights)
        self.opt.load_state_dict(optimizer)

    def finish(self, models: list[torch.nn.Module]) -> None:
        """Nothing to copy back: the model trained in place."""
