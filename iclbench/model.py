"""The model contract and TransformerLens-style hook points.

A model is an ``nn.Module`` mapping ``inputs [B, T, d_in]`` to predictions ``[B, T, d_out]``. Activations
pass through :class:`HookPoint` modules named as in TransformerLens (``blocks.0.attn.hook_pattern``,
``blocks.2.hook_resid_post``, ...), so probes and users can read and patch them without touching model code.
"""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Callable, ClassVar, Iterable

import torch
from torch import nn

from .errors import ICLBenchError, did_you_mean
from .task import NoOptions

HookFn = Callable[..., "torch.Tensor | None"]


class HookPoint(nn.Module):
    """Identity module that calls its hook functions on the way through.

    A hook is ``fn(tensor, hook) -> tensor | None``; returning a tensor replaces the activation (patching).
    Plain Python list, not ``register_forward_hook``: cheaper when empty, which is the training case.
    """

    def __init__(self):
        super().__init__()
        self.fns: list[HookFn] = []
        self.name = ""

    @property
    def active(self) -> bool:
        return bool(self.fns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x, hook=self)
            if out is not None:
                x = out
        return x


class ActivationCache(dict):
    """Dict of activation name → tensor, as returned by :meth:`Model.run_with_cache`."""

    def __getitem__(self, key):
        try:
            return super().__getitem__(key)
        except KeyError:
            raise KeyError(f"no cached activation {key!r}" + did_you_mean(key, self.keys())) from None


class Model(nn.Module):
    """Base class of a model plugin.

    Subclasses set ``name``, ``description``, an ``Options`` dataclass, build their layers in
    ``__init__(options, d_in, d_out, n_ctx)`` with :class:`HookPoint` s, and set ``n_layers`` / ``n_heads``
    (0 heads for non-attention models) so probes can iterate them.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    n_layers: int = 0
    n_heads: int = 0

    def __init__(self, options, d_in: int, d_out: int, n_ctx: int):
        super().__init__()
        self.options = options
        self.d_in, self.d_out, self.n_ctx = d_in, d_out, n_ctx

    @classmethod
    def variant(cls, name: str, description: str, **defaults) -> type["Model"]:
        """A named configuration of this architecture (``gpt3l`` = GPT with 3 layers) as a subclass
        whose Options defaults are changed; all other behaviour is inherited."""
        import dataclasses

        options_cls = dataclasses.make_dataclass(
            f"{name}_options",
            [(k, type(v), dataclasses.field(default=v)) for k, v in defaults.items()],
            bases=(cls.Options,),
        )
        return type(name, (cls,), {"name": name, "description": description, "Options": options_cls,
                                   "__module__": cls.__module__})

    # --- read-out, for probes -----------------------------------------------------------------------
    # Probes read a model through its hook points plus these three accessors. The defaults follow the
    # TransformerLens layout (``ln_final`` then ``unembed``, per-block ``attn.out`` over concatenated heads);
    # a model built differently overrides them instead of probes reaching into its internals.

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        """The model's own prediction from a residual stream ``[..., d_model]`` (final norm + read-out):
        the logit lens."""
        return self.unembed(self.ln_final(resid))

    def direct_readout(self, component: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """What one summand ``component`` of the final residual ``resid`` adds to the prediction, with the
        final norm's scale frozen at its value on ``resid`` (biases excluded). Linear in ``component``, so
        the contributions of all summands add up to the prediction minus a constant."""
        norm = self.ln_final
        if isinstance(norm, nn.LayerNorm):
            scale = (resid.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
            component = (component - component.mean(-1, keepdim=True)) / scale
            if norm.weight is not None:
                component = component * norm.weight
        elif not isinstance(norm, nn.Identity):
            raise ICLBenchError(f"model '{self.name}' has a final norm of type {type(norm).__name__}; "
                                "override Model.direct_readout for direct attribution")
        return component @ self.unembed.weight.T

    def head_write_weights(self, layer: int) -> torch.Tensor:
        """``[n_heads, d_head, d_model]``: how each head's ``hook_z`` output is written into the residual
        stream (the attention output projection split by head; its bias belongs to no head)."""
        weight = self.blocks[layer].attn.out.weight  # [d_model, n_heads * d_head]
        return weight.T.reshape(self.n_heads, -1, weight.shape[0])

    # --- hook points -----------------------------------------------------------------------------------
    def hook_points(self) -> dict[str, HookPoint]:
        points = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                if module.name != name:
                    module.name = name
                points[name] = module
        return points

    def _resolve(self, names: str | Iterable[str] | Callable[[str], bool] | None, points=None) -> list[str]:
        points = self.hook_points() if points is None else points
        if names is None:
            return list(points)
        if callable(names):
            return [n for n in points if names(n)]
        if isinstance(names, str):
            names = [names]
        out = {}  # ordered, without repeats
        for pattern in names:
            hits = [pattern] if pattern in points else [n for n in points if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ICLBenchError(f"no hook point matches {pattern!r}" + did_you_mean(pattern, points))
            out.update(dict.fromkeys(hits))
        return list(out)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: list[tuple[str | Callable[[str], bool], HookFn]]):
        """Context manager adding hooks (name or glob or predicate, fn); removed on exit, even on error."""
        points = self.hook_points()
        added = []
        try:
            for names, fn in fwd_hooks:
                for name in self._resolve(names, points):
                    points[name].fns.append(fn)
                    added.append((points[name], fn))
            yield self
        finally:
            for point, fn in added:
                point.fns.remove(fn)

    def run_with_hooks(self, inputs: torch.Tensor, fwd_hooks=()) -> torch.Tensor:
        with self.hooks(list(fwd_hooks)):
            return self(inputs)

    def run_with_cache(self, inputs: torch.Tensor, names_filter=None, fwd_hooks=(),
                       detach: bool = True) -> tuple[torch.Tensor, ActivationCache]:
        """Forward pass that also returns the activations at the hook points ``names_filter`` selects
        (all by default). ``fwd_hooks`` run first, so a cache of a patched run shows the patch."""
        cache = ActivationCache()

        def save(x, hook):
            cache[hook.name] = x.detach() if detach else x

        with self.hooks(list(fwd_hooks) + [(self._resolve(names_filter), save)]):
            out = self(inputs)
        return out, cache

    def to_transformer_lens(self):
        """This model as a TransformerLens ``HookedTransformer``: same outputs, same activations under the
        same hook names (GPT models, with ``pip install 'iclbench[tl]'``); other models raise."""
        raise ICLBenchError(f"model '{self.name}' has no TransformerLens equivalent")
