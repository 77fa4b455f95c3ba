"""Progress bars on a terminal (the training bar of ``iclbench run``, the sweep's bar): whether a stream is a
terminal, and the size to draw a bar at."""

from __future__ import annotations

import os

#: the size a bar is drawn at on a terminal that reports none
FALLBACK_COLUMNS, FALLBACK_ROWS = 100, 24


def isatty(stream) -> bool:
    """Whether ``stream`` is a terminal (a closed or fake stream is not)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def bar_size(stream) -> dict:
    """tqdm's sizing arguments for a bar written to ``stream``: the terminal's own size, following it as it
    changes, or :data:`FALLBACK_COLUMNS` × :data:`FALLBACK_ROWS` where it reports none (0 × 0: a fresh pty, some
    IDE, CI and remote terminals), where tqdm's own sizing hides the bar: it fits in no row."""
    try:
        width, height = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        width = height = 0
    return {"dynamic_ncols": width > 0, "ncols": None if width > 0 else FALLBACK_COLUMNS,
            "nrows": None if height > 0 else FALLBACK_ROWS}
