"""The run directory: atomic writes, checkpoints, provenance.

Every file is written to a temporary name in the same directory and renamed into place, so an interrupted
run never leaves a half-written file; ``metrics.json`` is written last and marks a run as complete.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

METRICS, CONFIG, STATUS, LOG, CHECKPOINT = "metrics.json", "config.yaml", "status.json", "train.log", \
    "model.safetensors"
#: the whole training state of an unfinished run (model, optimizer, step, data RNG, log position); removed
#: when the run completes
TRAIN_STATE = "train_state.pt"


def write_atomic(path: Path, data: bytes | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_yaml(path: Path, obj) -> None:
    write_atomic(path, yaml.safe_dump(obj, sort_keys=False))


def save_state_dict(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    write_atomic(path, save(tensors, metadata=metadata))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_training_state(path: Path, state: dict) -> None:
    """Write a dict of tensors, numbers, strings, lists and dicts (an optimizer's state_dict qualifies)
    atomically; :func:`load_training_state` reads it back without unpickling arbitrary objects."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def load_training_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


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
    """The metrics of a complete run; raises :class:`DamagedRun` saying what is wrong otherwise."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS
    if not metrics.exists():
        status = run_dir / STATUS
        if status.exists():
            try:
                info = json.loads(status.read_text())
                raise DamagedRun(f"run did not finish: {info.get('status', '?')} ({info.get('message', '')})")
            except (ValueError, OSError):
                pass
        raise DamagedRun("no metrics.json (run incomplete or interrupted)")
    try:
        data = json.loads(metrics.read_text())
    except (ValueError, OSError) as exc:
        raise DamagedRun(f"unreadable metrics.json: {exc}") from None
    for key in ("task", "model", "seed", "summary", "config"):
        if key not in data:
            raise DamagedRun(f"metrics.json lacks '{key}'")
    return data
