"""Distribution shifts every task family declares for out-of-distribution evaluation, named alike so OOD
tables line up across tasks."""

from __future__ import annotations

from typing import Callable

#: input scale factors (the issue's ×0.5 / ×2 / ×3)
SCALES = (0.5, 2.0, 3.0)


def standard_shifts(task, scaled: Callable[[float], object], noise: float, longer=None) -> dict:
    """``scale_x{s}`` for each of :data:`SCALES` (``scaled(s)`` builds the task with values scaled by s),
    ``noise_{noise}`` (observation noise added) and ``context_x2`` (twice the context by default, or the
    task ``longer`` gives: length extrapolation, which a model with learned positions must refuse cleanly)."""
    if longer is None:
        longer = task.with_options(context_len=2 * task.options.context_len)
    return {**{f"scale_x{s:g}": scaled(s) for s in SCALES}, f"noise_{noise:g}": task.with_options(noise=noise),
            "context_x2": longer}
