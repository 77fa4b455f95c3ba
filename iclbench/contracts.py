"""The plugin contracts, checked at run time: each failure is one line naming the plugin, the object and what
was expected (docs/plugins.md states the contracts; :mod:`iclbench.testing` hands the same checks to plugin
authors as ``iclbench check NAME`` and pytest helpers).

A task or model that breaks its contract stops the run before training (:class:`PluginError`). A baseline
that breaks its contract is *refused*: left out of the run's scores (so never "best baseline"), named with the
reason in ``metrics["refused_baselines"]`` and warned about, while the run goes on.
"""

from __future__ import annotations


import torch

from .errors import ICLBenchError, warn
from .task import Batch

#: sequences used to check a task's output and a model's forward pass (cheap, before training)
CHECK_SEQUENCES = 4
#: sequences of the evaluation batch a baseline is screened on (peeking and latent tests call it 5 times)
SCREEN_SEQUENCES = 64


class PluginError(ICLBenchError):
    """A plugin broke its contract; the message names the plugin, the object and what was expected."""

    exit_code = 1

    def __init__(self, message: str, plugin: str | None = None):
        super().__init__(message)
        self.plugin = plugin


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]" if torch.is_tensor(t) else type(t).__name__


def is_oracle(name: str, fn=None) -> bool:
    """A baseline that may read ``batch.latents``: named ``oracle``/``oracle_*`` or whose function has
    ``oracle = True``. Oracles are references, never competitors (never "best baseline")."""
    return name.startswith("oracle") or bool(getattr(fn, "oracle", False))


def check_batch(batch, task, n: int, owner: str, call: str = "sample") -> None:
    """``task.sample(n, ...)`` returned a :class:`Batch` of ``inputs [n, T, d_in]``, ``targets [n, T, d_out]``
    (floating point, finite), ``mask [T]`` bool with a scored position, latents ``{name: tensor [n, ...]}``."""
    T, d_in, d_out = task.context_len, task.d_in, task.d_out
    where = f"{owner}: {call}({n}, ...)"
    if not isinstance(batch, Batch):
        raise PluginError(f"{where} returned {type(batch).__name__}; expected iclbench.Batch")
    for field, want in (("inputs", (n, T, d_in)), ("targets", (n, T, d_out))):
        value = getattr(batch, field)
        if not torch.is_tensor(value) or tuple(value.shape) != want:
            raise PluginError(f"{where} returned {field} of shape {_shape(value)}; expected "
                              f"[n={n}, context_len={T}, {'d_in' if field == 'inputs' else 'd_out'}={want[2]}]")
        if not value.is_floating_point():
            raise PluginError(f"{where} returned {field} of dtype {value.dtype}; expected a floating-point dtype")
        if not bool(torch.isfinite(value).all()):
            raise PluginError(f"{where} returned {field} with NaN or inf; expected finite values")
    if batch.inputs.device != batch.targets.device:
        raise PluginError(f"{where} returned inputs on {batch.inputs.device} and targets on "
                          f"{batch.targets.device}; expected both on the requested device")
    mask = batch.mask
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != (T,):
        raise PluginError(f"{where} returned mask {_shape(mask)} of dtype {getattr(mask, 'dtype', '?')}; "
                          f"expected a bool tensor [context_len={T}] (True = scored position)")
    if not bool(mask.any()):
        raise PluginError(f"{where} returned a mask with no scored position; expected at least one True")
    if not isinstance(batch.latents, dict):
        raise PluginError(f"{where} returned latents of type {type(batch.latents).__name__}; expected a dict")
    for name, value in batch.latents.items():
        if not torch.is_tensor(value) or value.ndim < 1 or value.shape[0] != n:
            raise PluginError(f"{where} returned latent {name!r} of shape {_shape(value)}; expected a tensor "
                              f"with the batch first ([n={n}, ...]) so it can be sliced with the batch")


def check_task(task, owner: str, device="cpu") -> None:
    """The task's shape properties, one small sample, its normalizer and its OOD variants."""
    for attr in ("d_in", "d_out", "context_len"):
        try:
            value = getattr(task, attr)
        except NotImplementedError:
            raise PluginError(f"{owner}: {attr} is not implemented; expected a positive int") from None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PluginError(f"{owner}: {attr} is {value!r}; expected a positive int")
    generator = torch.Generator(device=device).manual_seed(0)  # training samples on the device, with its generator
    try:
        batch = task.sample(CHECK_SEQUENCES, generator, device)
    except ICLBenchError:
        raise
    except Exception as exc:
        raise PluginError(f"{owner}: sample({CHECK_SEQUENCES}, generator, {str(device)!r}) raised "
                          f"{type(exc).__name__}: {exc}") from exc
    check_batch(batch, task, CHECK_SEQUENCES, owner)
    variants = task.ood_variants()
    if not isinstance(variants, dict) or not all(hasattr(v, "sample") for v in variants.values()):
        raise PluginError(f"{owner}: ood_variants() returned {type(variants).__name__}; expected a dict "
                          "{shift name: Task} (for example self.with_options(noise=0.5))")


def check_normalizer(task, owner: str, device="cpu") -> None:
    norm = task.normalizer(device)
    T = task.context_len
    if not torch.is_tensor(norm) or tuple(norm.shape) != (T,):
        raise PluginError(f"{owner}: normalizer() returned {_shape(norm)}; expected a tensor [context_len={T}]")
    if not bool((torch.isfinite(norm) & (norm > 0)).all()):
        raise PluginError(f"{owner}: normalizer() has values that are not finite and > 0; expected the "
                          "per-position squared error of predicting the prior mean")


@torch.no_grad()
def check_model(model, task, owner: str, device="cpu") -> None:
    """Trainable parameters; a forward pass ``[n, T, d_in] -> [n, T, d_out]``, floating point and finite;
    causal (a prediction does not change when later inputs do)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise PluginError(f"{owner}: has no trainable parameters; expected an nn.Module with at least one "
                          "nn.Parameter (iclbench trains it)")
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            batch = task.sample(CHECK_SEQUENCES, torch.Generator("cpu").manual_seed(0), "cpu").to(device)
            out = model(batch.inputs)
            want = (*batch.inputs.shape[:2], task.d_out)
            if not torch.is_tensor(out) or tuple(out.shape) != want:
                raise PluginError(f"{owner}: forward(inputs {_shape(batch.inputs)}) returned {_shape(out)}; "
                                  f"expected predictions [B={want[0]}, T={want[1]}, d_out={want[2]}]")
            if not out.is_floating_point() or not bool(torch.isfinite(out).all()):
                raise PluginError(f"{owner}: forward returned {out.dtype} values with NaN/inf at "
                                  "initialisation; expected finite floating-point predictions")
            t = task.context_len // 2
            later = batch.inputs.clone()
            later[:, t + 1:] = later[:, t + 1:].roll(1, 0) + 1.0
            if not torch.allclose(model(later)[:, :t + 1], out[:, :t + 1], rtol=1e-4, atol=1e-5):
                raise PluginError(f"{owner}: predictions at positions <= {t} change when only inputs after {t} "
                                  "change; expected a causal model (position t sees inputs[:, :t+1] only)")
    finally:
        model.train(was_training)


def predictions_problem(pred, batch: Batch, what: str) -> str | None:
    """Why ``pred`` cannot be scored against ``batch`` (shape, dtype, NaN/inf at scored positions), or None."""
    want = tuple(batch.targets.shape)
    if not torch.is_tensor(pred) or tuple(pred.shape) != want:
        return f"{what} of shape {_shape(pred)}; expected [B, T, d_out] = {list(want)}"
    if not pred.is_floating_point():
        return f"{what} of dtype {pred.dtype}; expected floating point"
    scored = pred[:, batch.mask.to(pred.device)]
    bad = int((~torch.isfinite(scored)).sum())
    if bad:
        return f"{what} with NaN/inf at {bad} of {scored.numel()} scored values; expected finite values"
    return None


def _tampered(batch: Batch, inputs=None, targets=None, latents=None) -> Batch:
    return Batch(batch.inputs if inputs is None else inputs, batch.targets if targets is None else targets,
                 batch.mask, batch.latents if latents is None else latents)


def _same(a, b, upto: int | None, mask) -> bool:
    cols = mask.clone()
    if upto is not None:
        cols[upto + 1:] = False
    a, b = a[:, cols.to(a.device)].float(), b[:, cols.to(b.device)].float()
    scale = max(1.0, float(a.abs().nan_to_num(0, 0, 0).max()) if a.numel() else 1.0)
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale, equal_nan=True)


@torch.no_grad()
def baseline_problem(name: str, fn, batch: Batch, oracle: bool | None = None) -> str | None:
    """Why the baseline ``name`` breaks the contract on ``batch`` (at least 2 sequences), or None: it raises,
    returns the wrong shape or NaN/inf, its prediction at t changes when targets or inputs after t change
    (reads the future), or it is not an oracle and its predictions change when the latents do."""
    oracle = is_oracle(name, fn) if oracle is None else oracle
    try:
        base = fn(batch)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"
    problem = predictions_problem(base, batch, "fn(batch) gave predictions")
    if problem:
        return problem
    if len(batch) < 2:
        return None
    shifted = {k: v.roll(1, 0) for k, v in batch.latents.items()}
    scored = torch.nonzero(batch.mask.cpu()).flatten().tolist()
    T = batch.inputs.shape[1]
    for t in sorted({scored[0], scored[len(scored) // 2], max(scored[0], T - 2)}):
        inputs = batch.inputs.clone()
        inputs[:, t + 1:] = batch.inputs.roll(1, 0)[:, t + 1:] + 1.0
        for what, tampered in (("the targets", _tampered(batch, targets=batch.targets.roll(1, 0) + 1.0)),
                               (f"inputs after position {t}", _tampered(batch, inputs=inputs))):
            if not _same(fn(tampered), base, t, batch.mask):
                return (f"reads the future: its prediction at position <= {t} changes when {what} change; "
                        "a baseline may use inputs[:, :t+1] only")
    if not oracle and batch.latents and not _same(fn(_tampered(batch, latents=shifted)), base, None, batch.mask):
        return ("reads batch.latents but is not marked as an oracle; name it 'oracle' or 'oracle_*' (or set "
                "fn.oracle = True) so it is a reference, not a competitor")
    return None


def screen_baselines(baselines: dict, batch: Batch, owners: dict | None = None,
                     warn=warn) -> tuple[dict, dict]:
    """Split ``baselines`` into (accepted, refused ``{name: reason}``) by :func:`baseline_problem` on the
    first :data:`SCREEN_SEQUENCES` sequences of ``batch``; each refusal is warned about."""
    sample = batch.slice(slice(0, SCREEN_SEQUENCES))
    accepted, refused = {}, {}
    for name, fn in baselines.items():
        problem = baseline_problem(name, fn, sample)
        if problem is None:
            accepted[name] = fn
            continue
        who = (owners or {}).get(name, f"baseline '{name}'")
        refused[name] = f"{who}: {problem}"
        warn(f"REFUSED {refused[name]} (left out of this run's scores)")
    return accepted, refused


def blame(exc: BaseException, registry) -> str | None:
    """The plugin whose code raised ``exc`` (the innermost traceback frame in a plugin's source file)."""
    import inspect

    files = {}
    for name, plugin in registry.pm.list_name_plugin():
        try:
            files[inspect.getfile(plugin)] = name
        except TypeError:
            continue
    for kind, table in (("task", registry.tasks), ("model", registry.models), ("probe", registry.probes)):
        for entry in table.values():
            try:
                files.setdefault(inspect.getfile(entry.obj), entry.plugin)
            except TypeError:
                continue
    found = None
    tb = exc.__traceback__
    while tb is not None:
        found = files.get(tb.tb_frame.f_code.co_filename, found)
        tb = tb.tb_next
    return found
