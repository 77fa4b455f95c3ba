"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import difflib


class ICLBenchError(Exception):
    """A user-facing error: the message says what was wrong, which value, and what is allowed."""

    exit_code = 2


class TrainingDiverged(ICLBenchError):
    exit_code = 1


def did_you_mean(value: str, allowed) -> str:
    """' (did you mean 'x'?)' when a close name exists, else the allowed names."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(value, allowed, n=3, cutoff=0.5)
    if close:
        return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
    return " (allowed: " + (", ".join(allowed) if allowed else "none registered") + ")"
