"""Resumable checkpoints: ``<output_dir>/checkpoints/step-N/``.

A checkpoint holds everything needed to continue a run as if it had never stopped::

    step-N/
      adapter/               the adapter so far, in PEFT's format (usable with `loraforge generate`)
      trainer_state.pt       trainable weights, optimizer, scheduler, grad scaler, RNG states of
                             python/numpy/torch of every process, data position, task extra state
      state.json             step, epoch, data position and last loss, human-readable

It is written into a temporary directory that is renamed to ``step-N`` only when complete, so a
crash or SIGKILL while saving never leaves a half-written checkpoint under a real name: `latest`
is always a whole one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraforge.errors import NotFound

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.pt"
INFO_NAME = "state.json"
ADAPTER_DIR = "adapter"
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and (child / STATE_NAME).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint directory `resume` ("latest", a path, or None) points at; an error if there is none."""
    if not resume:
        return None
    if resume == "latest":
        latest = find_latest(output_dir)
        if latest is None:
            raise NotFound(f"--resume latest: no checkpoint under {checkpoints_dir(output_dir)}")
        return latest
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise NotFound(f"--resume {resume}: not a checkpoint directory (no {STATE_NAME})")
    return path


# -- RNG -------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- save / load -----------------------------------------------------------------------------------


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    state: dict[str, Any],
    save_adapter: Callable[[Path], None] | None = None,
    info: dict[str, Any] | None = None,
    keep_last: int = 0,
) -> Path:
    """Writes ``checkpoints/step-<step>/`` atomically and prunes to the newest `keep_last` (0: keep all).

    `state` is whatever must come back on resume (it is `torch.save`d); `save_adapter(dir)` writes the
    adapter's files into `dir`; `info` goes to state.json. Call on the main process only.
    """
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if save_adapter is not None:
        save_adapter(tmp / ADAPTER_DIR)
    torch.save(state, tmp / STATE_NAME)
    (tmp / INFO_NAME).write_text(json.dumps({"step": step, **(info or {})}, indent=2, default=str) + "\n")
    _fsync_tree(tmp)
    if final.exists():
        # Re-saving a step (e.g. the final step of a resumed run): move the old one aside first so the
        # name never points at a partial directory.
        old = root / f".old-step-{step}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    prune_checkpoints(output_dir, keep_last)
    _remove_stale_temporaries(root)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The `state` dictionary saved by `save_checkpoint`."""
    # weights_only=False: the state holds numpy RNG state and python tuples, written by us.
    return torch.load(Path(path) / STATE_NAME, map_location="cpu", weights_only=False)


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Deletes all but the newest `keep_last` checkpoints (0 keeps everything); returns the deleted."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(output_dir)
    doomed = [p for _, p in found[:-keep_last]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _remove_stale_temporaries(root: Path) -> None:
    # Left behind by a process killed while saving; never a real checkpoint.
    for child in root.iterdir():
        if child.name.startswith((".tmp-step-", ".old-step-")):
            pid = child.name.rsplit("-", 1)[-1]
            if pid != str(os.getpid()):
                shutil.rmtree(child, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for child in path.rglob("*"):
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
