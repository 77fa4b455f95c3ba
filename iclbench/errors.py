"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import difflib
import sys


class ICLBenchError(Exception):
    """A user-facing error: the message says what was wrong, which value, and what is allowed."""

    exit_code = 2


class TrainingDiverged(ICLBenchError):
    """A non-finite training loss: at ``step`` the loss was ``loss``. ``advice`` says what to change; ``log``
    names the training log kept for inspection."""

    exit_code = 1

    def __init__(self, step: int, loss: float, advice: str = "try a lower --set train.lr", log=None):
        self.step, self.loss, self.advice, self.log = step, loss, advice, log
        super().__init__(self.cause + (f" (log kept in {log})" if log is not None else ""))

    @property
    def cause(self) -> str:
        """The message without where the log is kept (what ``status.json`` records)."""
        return f"training diverged at step {self.step}: loss is {self.loss}; {self.advice}"


def did_you_mean(value: str, allowed) -> str:
    """' (did you mean 'x'?)' when a close name exists, else the allowed names."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(value, allowed, n=3, cutoff=0.5)
    if close:
        return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
    return " (allowed: " + (", ".join(allowed) if allowed else "none registered") + ")"


def warn(message: str) -> None:
    """A warning on stderr, as every part of iclbench gives one."""
    print(f"iclbench: warning: {message}", file=sys.stderr)


def one_line(exc, limit: int = 300) -> str:
    """An error's text on one line (PyTorch's often span several), shortened to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
