"""The run directory: atomic writes, checkpoints, provenance.

Every file is written to a temporary name in the same directory and renamed into place, so an interrupted
run never leaves a half-written file; ``metrics.json`` is written last and marks a run as complete.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import platform
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

METRICS, CONFIG, STATUS, LOG, CHECKPOINT = "metrics.json", "config.yaml", "status.json", "train.log", \
    "model.safetensors"
#: the whole training state of an unfinished run (model, optimizer, step, data RNG, log position); removed
#: when the run completes
TRAIN_STATE = "train_state.pt"
#: held (``flock``) by the one process writing a run directory, for the whole run; removed when it ends
LOCK = ".lock"
#: suffix of the temporary files :func:`write_atomic` renames into place (``.<name>.<random>.tmp``)
TMP_SUFFIX = ".tmp"

_umask_lock = threading.Lock()


def file_mode() -> int:
    """The mode a new file gets under this process's umask (``0o666 & ~umask``), as ``open`` would give it."""
    with _umask_lock:  # reading the umask means setting it; no other thread of ours may see the interim
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _write_error(path: Path, exc: OSError, what: str = "write"):
    from .errors import ICLBenchError

    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        blocker = next((p for p in path.parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            return ICLBenchError(f"cannot {what} {str(path)!r}: {str(blocker)!r} exists and is not a directory")
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free some space and rerun: nothing complete was lost)"
    return ICLBenchError(f"cannot {what} {str(path)!r}: {reason}")


def real_dirs(path: Path, root: Path) -> None:
    """Make every folder below ``root`` down to ``path`` (inclusive) a real directory: a symlink in the way
    (to a directory or not, dangling or not) is removed, its target untouched, and a directory made in its
    place, so nothing written under ``root`` lands outside it. Something else in the way (a file) is one line."""
    from .errors import ICLBenchError

    path, root = Path(path), Path(root)
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise ValueError(f"{path} is not under {root}") from None
    if ".." in rel.parts:
        raise ICLBenchError(f"cannot write {str(path)!r}: it leaves {str(root)!r}")
    try:  # root itself is the user's to place (a symlink to another disk is fine)
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(root, exc, "create the directory") from None
    folder = root
    for part in rel.parts:
        folder = folder / part
        try:
            if folder.is_symlink():
                folder.unlink()
            folder.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            raise _write_error(folder, exc, "create the directory") from None
        if folder.is_symlink() or not folder.is_dir():
            raise ICLBenchError(f"cannot write under {str(folder)!r}: it exists and is not a directory")


def write_atomic(path: Path, data: bytes | str, root: Path | None = None) -> None:
    """Write ``path`` whole or not at all: a temporary file in the same directory (created exclusively, so
    never through a symlink), fsynced, given the umask's mode, renamed over ``path`` (a symlink there is
    replaced, its target untouched). With ``root``, every folder between ``root`` and ``path`` is made a real
    directory first (:func:`real_dirs`: a symlinked ``probes/`` or ``figures/`` is replaced, never written
    through). An OS error (disk full, read-only, not a directory) is one line naming the file."""
    path = Path(path)
    if root is not None:
        real_dirs(path.parent, root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp gives 0600 whatever the umask
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files of writes that were killed halfway (call only while holding the lock)."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / "probes"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and not p.is_dir():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def open_log(path: Path, keep: int | None = None):
    """``train.log`` opened for appending, line-buffered, never through a symlink.

    ``keep=None``: a new log (whatever was there, a symlink included, is replaced, its target untouched).
    ``keep=N``: continue the existing log after its first N bytes; raises :class:`DamagedRun` naming the file
    when it is missing, not a regular file, or shorter than N."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    if keep is None:
        path.unlink(missing_ok=True)
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
    else:
        try:
            fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise DamagedRun(f"{path}: cannot continue the log ({exc.strerror}"
                             + (", a symlink" if path.is_symlink() else "") + ")") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size < keep:
            os.close(fd)
            raise DamagedRun(f"{path}: not a regular file or shorter ({info.st_size} bytes) than the checkpoint "
                             f"recorded ({keep})")
        os.ftruncate(fd, keep)
    return os.fdopen(fd, "a", buffering=1)


def open_regular(path: Path):
    """``path`` opened for reading (binary) if it is a regular file; a FIFO, device or directory raises
    :class:`DamagedRun` instead of blocking the reader (opened non-blocking, checked before reading)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DamagedRun(f"cannot read {path.name}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a directory with its own error
        os.close(fd)
        raise DamagedRun(f"{path.name} is not a regular file")
    return os.fdopen(fd, "rb")


def read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file; a FIFO, device or directory raises :class:`DamagedRun`
    instead of blocking a reader."""
    path = Path(path)
    with open_regular(path) as f:
        try:
            return f.read()
        except OSError as exc:
            raise DamagedRun(f"cannot read {path.name}: {exc.strerror}") from None


def read_json(path: Path, kind: type | None = dict):
    """JSON from a regular file, checked to be a ``kind`` (dict by default); :class:`DamagedRun` otherwise."""
    path = Path(path)
    try:
        data = json.loads(read_regular(path))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DamagedRun(f"unreadable {path.name}: {exc}") from None
    if kind is not None and not isinstance(data, kind):
        raise DamagedRun(f"{path.name} holds {type(data).__name__}, not a {kind.__name__}")
    return data


class RunBusy(Exception):
    """Another process holds the run directory's lock."""


def _lock_holder(fd: int) -> str:
    """The holder's "pid N on HOST" line; it writes that just after taking the lock, so wait briefly for it."""
    for _ in range(20):
        try:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        except OSError:
            return ""
        if holder:
            return holder
        time.sleep(0.01)
    return ""


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: bool = False):
    """Hold the run directory's OS lock (``flock`` on ``.lock``) for the ``with`` block: one writer per run.

    Non-blocking: raises :class:`RunBusy` naming the holder (``wait``: waits for the holder instead, for a
    lock held only for a moment, such as the sweep records'). The kernel drops the lock when its process
    dies (kill -9 included), so a lock is never stale; the file is removed on a clean exit."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    run_dir = Path(run_dir)
    path = run_dir / LOCK
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink put in its place: remove it, never lock through it
                path.unlink(missing_ok=True)
                continue
            raise _write_error(path, exc, "lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise RunBusy(holder or "another process") from None
        try:  # the file we locked may have been removed by its previous holder in between: lock the new one
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # still holding it: a waiting process then finds a fresh file
        os.close(fd)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_yaml(path: Path, obj) -> None:
    write_atomic(path, yaml.safe_dump(obj, sort_keys=False))


def save_state_dict(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    write_atomic(path, save(tensors, metadata=metadata))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file; :class:`DamagedRun` where ``path`` is not a regular file (a FIFO
    would block the reader, a directory give an internal error)."""
    from safetensors.torch import load_file

    open_regular(path).close()
    return load_file(str(path))


def save_training_state(path: Path, state: dict) -> None:
    """Write a dict of tensors, numbers, strings, lists and dicts (an optimizer's state_dict qualifies)
    atomically; :func:`load_training_state` reads it back without unpickling arbitrary objects."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def load_training_state(path: Path) -> dict:
    """The training state :func:`save_training_state` wrote (no arbitrary unpickling); :class:`DamagedRun`
    where ``path`` is not a regular file."""
    import pickle
    import warnings

    with open_regular(path) as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own advice (load with weights_only=False) is not for this file
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # torch's message: several lines of advice, then the cause
            import re

            named = re.search(r"GLOBAL ([\w.]+)", str(exc))
            if named:  # a pickled object other than tensors and plain values: a foreign or tampered file
                raise DamagedRun(f"{Path(path).name} holds objects other than tensors and plain values "
                                 f"({named.group(1)}): a foreign or tampered file, refused; nothing in it was run"
                                 ) from None
            raise DamagedRun(f"{Path(path).name} is unreadable (not a training state iclbench wrote)") from None
        except (EOFError, RuntimeError, ValueError, OSError) as exc:
            raise DamagedRun(f"{Path(path).name} is unreadable ({' '.join(str(exc).split())[:150]})") from None


def remove_file(path: Path) -> None:
    """Remove what is at ``path`` where a file of the run belongs (a file, a symlink, a FIFO, an empty
    directory), so that it can be written afresh; a directory with something in it is one line naming it."""
    from .errors import ICLBenchError

    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        try:
            path.rmdir()
        except OSError:
            raise ICLBenchError(f"{str(path)!r} is a directory where iclbench keeps a file; move it away and "
                                "rerun") from None
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise _write_error(path, exc, "remove") from None


def git_commit() -> str | None:
    """Commit of the source tree iclbench runs from, with '-dirty' when it has local changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return platform.processor() or platform.machine()
    return device.type


def provenance(device: torch.device) -> dict:
    from . import __version__

    return {
        "iclbench_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv,
    }


class DamagedRun(Exception):
    pass


def read_run(run_dir: Path) -> dict:
    """The metrics of a complete run; raises :class:`DamagedRun` saying what is wrong otherwise (never
    blocks on a FIFO or crashes on JSON of the wrong shape)."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS
    if not metrics.exists():
        if metrics.is_symlink():
            try:
                target = f" (to {os.readlink(metrics)!r})"
            except OSError:
                target = ""
            raise DamagedRun(f"metrics.json is a dangling link{target}; restore the file or rerun the run "
                             "(iclbench run --force)")
        status = run_dir / STATUS
        if status.exists():
            try:
                info = read_json(status)
            except DamagedRun:
                info = None
            if info is not None:
                state, message = info.get("status", "?"), info.get("message")
                if state == "complete":
                    raise DamagedRun("metrics.json is missing although status.json says the run completed; "
                                     "rerun it (iclbench run --force)")
                raise DamagedRun(f"run did not finish: {state}" + (f" ({message})" if message else ""))
        raise DamagedRun("no metrics.json (run incomplete or interrupted)")
    try:
        data = read_json(metrics)
    except DamagedRun as exc:
        raise DamagedRun(str(exc) if str(exc).startswith("unreadable") else f"unreadable metrics.json: {exc}") \
            from None
    for key in ("task", "model", "seed", "summary", "config"):
        if key not in data:
            raise DamagedRun(f"metrics.json lacks '{key}'")
    summary = data["summary"]
    if not isinstance(summary, dict) or not all(isinstance(v, dict) and "mean" in v for v in summary.values()) \
            or "model" not in summary:
        raise DamagedRun("metrics.json: 'summary' is not a table of predictors with a mean each")
    problem = record_problem(data)
    if problem:
        raise DamagedRun(f"metrics.json: {problem}")
    return data


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def record_problem(data: dict) -> str | None:
    """What is wrong with the shape of a run's recorded names and config (``task``, ``model``, ``seed`` and
    ``config`` of ``metrics.json``), which every reader takes for names, numbers and mappings; None if
    nothing."""
    for key in ("task", "model"):
        if not isinstance(data[key], str) or not data[key]:
            return f"'{key}' is {_shown(data[key])}, not a {key} name"
    if not isinstance(data["seed"], int) or isinstance(data["seed"], bool):
        return f"'seed' is {_shown(data['seed'])}, not an integer"
    config = data["config"]
    if not isinstance(config, dict):
        return f"the recorded config is {_shown(config)}, not a mapping of sections"
    for section in ("task", "model", "train", "eval"):
        if section not in config:
            continue
        value = config[section]
        if not isinstance(value, dict):
            return (f"the recorded config's '{section}' is {_shown(value)}, not a mapping of "
                    + (f"the {section}'s name and options" if section in ("task", "model") else "options"))
        if section in ("task", "model") and not isinstance(value.get("name"), str):
            return f"the recorded config's '{section}' has no {section} name (name: {_shown(value.get('name'))})"
    return None


#: a model error more than this many times the all-zeros predictor's (or 1.0, the prior mean's, whichever is
#: larger) is not a result but a broken run: training that the loss check did not stop (its loss stayed finite)
#: but that went astray, an lr far too high (lr=10 without clipping ended at 5.57). docs/training.md says when a
#: run is diverged, unstable or complete.
ABSURD_FACTOR = 3.0


def unstable_reason(metrics: dict) -> str | None:
    """Why a complete run's headline cannot be trusted (non-finite, or over :data:`ABSURD_FACTOR` times the
    zero predictor's error, unless the model trained on a pool of rules and is sound on them), with its final
    training loss where recorded; or None. Computed from the metrics each time, so a rule mended later applies
    to runs stored before (the ``unstable`` key a run stores says what the rule said then)."""
    import math

    try:
        err = float(metrics["summary"]["model"]["mean"])
    except (KeyError, TypeError, ValueError):
        return "no model error recorded"
    try:
        loss = float((metrics.get("train") or {}).get("final_loss"))
        loss = f"; final training loss {loss:.4g}"
    except (TypeError, ValueError):
        loss = ""
    if not math.isfinite(err):
        return f"model error is {err}{loss}"
    zero = (metrics.get("reference") or {}).get("zero") or {}
    try:
        ref = max(1.0, float(zero.get("mean", 1.0)))
    except (TypeError, ValueError, AttributeError):
        ref = 1.0
    if not math.isfinite(ref):
        ref = 1.0
    if err > ABSURD_FACTOR * ref and not recalls_its_pool(metrics, ABSURD_FACTOR * ref):
        return f"model error {err:.4g} is over {ABSURD_FACTOR:g}x the zero predictor's ({ref:.4g}){loss}"
    return None


def recalls_its_pool(metrics: dict, bound: float) -> bool:
    """Whether a model trained on a finite pool of rules (``task.pool``) is sound on the pool's own rules (its
    training distribution, the ``pool_rules`` evaluation): there, an absurd error on fresh rules is what
    memorising a few rules does, not a diverged run."""
    import math

    try:
        err = float(metrics["ood"]["pool_rules"]["summary"]["model"]["mean"])
    except (KeyError, TypeError, ValueError):
        return False
    return math.isfinite(err) and err <= bound
