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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, or a signal that ends the session (SIGHUP: the terminal closed; SIGTERM), raised where the
    program is, as Ctrl-C is: the run in progress is marked ``interrupted`` and its rerun continues from its
    latest checkpoint. ``signame``: the signal, as ``status.json`` and the sweep record name it."""

    def __init__(self, signame: str = "SIGINT"):
        super().__init__(signame)
        self.signame = signame


#: the signals that interrupt a run (and what each means, for status.json)
INTERRUPTS = {"SIGINT": "Ctrl-C (SIGINT)", "SIGHUP": "SIGHUP (the terminal closed)", "SIGTERM": "SIGTERM"}


def interruption(exc: BaseException) -> str:
    """What interrupted a run, in words: ``Ctrl-C (SIGINT)``, ``SIGHUP (the terminal closed)``, ``SIGTERM``."""
    return INTERRUPTS.get(getattr(exc, "signame", "SIGINT"), str(getattr(exc, "signame", "Ctrl-C")))


def raise_on_signals(active=lambda: True) -> dict | None:
    """In this process's main thread: SIGINT, SIGHUP and SIGTERM raise :class:`Interrupted` (not SIGHUP's and
    SIGTERM's silent death, which leaves a run ``running`` with a dead pid) while ``active()`` says so, and are
    ignored otherwise. Once: after the first, the others are ignored until this is called again, so what the
    interruption records is not itself interrupted. A terminal that closed (SIGHUP) gets no more output:
    stdout and stderr, where they were that terminal, go to /dev/null. Returns the handlers it replaced (for
    :func:`restore_signals`), None where signals cannot be handled here (not the main thread)."""
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    fired = []

    def handler(signum, frame):
        if fired or not active():
            return
        fired.append(signum)
        name = signal.Signals(signum).name
        if name == "SIGHUP":
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                try:
                    if os.isatty(fd):
                        os.dup2(devnull, fd)
                except OSError:
                    pass
            os.close(devnull)
        raise Interrupted(name)

    previous = {}
    for name in INTERRUPTS:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    return previous


def restore_signals(previous: dict | None) -> None:
    """Put back the handlers :func:`raise_on_signals` replaced."""
    import signal

    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
