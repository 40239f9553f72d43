"""The run directory: what a finished or interrupted run left there, and when training may write there.

A run directory holds ``adapter/``, ``checkpoints/step-N/``, ``metrics.csv``, ``train_config.yaml``,
``loss.png``, ``samples/`` and ``tensorboard/``. The rules, checked before anything is written:

* a new run (no `resume`) into a directory that holds a run is refused, naming ``--resume latest``
  and ``--overwrite`` (which removes that run's files, and only those, first);
* ``--resume`` of a run whose newest checkpoint is its last step and whose adapter is there: nothing
  to do, the run is reported as finished (exit status 0, nothing touched), unless the resume asks
  for a longer run (another max_steps or epochs), which continues it;
* ``--resume`` with settings that would change the result (rank, targets, data, batch size,
  schedule, seed ...) is refused, naming the keys that differ. The fields a config class lists in
  `RESUME_FREE` (how often to log, evaluate, sample and save; the progress bar ...) may differ.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.errors import ConfigError, UserError
from loraforge.train.checkpoint import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
)

CONFIG_NAME = "train_config.yaml"
# Everything a run writes at the top of its directory (what --overwrite removes).
RUN_FILES = (ADAPTER_DIR, CHECKPOINTS_DIR, "metrics.csv", CONFIG_NAME, "loss.png", "samples", "tensorboard")


@dataclass
class Finished:
    """A run that is already complete: its newest checkpoint is the last step and its adapter exists."""

    adapter_dir: Path
    checkpoint: Path
    step: int
    total_steps: int
    loss: float | None


def holds_a_run(out: Path) -> list[str]:
    """What in `out` belongs to an earlier run (empty: nothing)."""
    found = []
    if (out / ADAPTER_DIR).is_dir() and any((out / ADAPTER_DIR).iterdir()):
        found.append(f"{ADAPTER_DIR}/")
    found += [f"{CHECKPOINTS_DIR}/{path.name}" for _, path in list_checkpoints(out)[-1:]]
    if (out / "metrics.csv").is_file():
        found.append("metrics.csv")
    return found


def prepare(config, main: bool = True) -> Finished | None:
    """Applies the rules above to `config.output_dir` before a run starts. Returns `Finished` when a
    resumed run has nothing left to do; raises UserError when the run must not start."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out} is a file")
    overwrite = getattr(config, "overwrite", False)
    if config.resume:
        if overwrite:
            raise ConfigError("resume and overwrite contradict each other: continue the run, or start over")
        checkpoint = resolve_resume(out, config.resume)
        state = load_checkpoint(checkpoint)
        _check_same_settings(config, state.get("config") or {}, checkpoint)
        adapter = out / ADAPTER_DIR
        total = state.get("total_steps")
        saved = state.get("config") or {}
        same_length = all(
            saved.get(k, getattr(config, k)) == getattr(config, k) for k in ("max_steps", "epochs")
        )
        done = total is not None and state["step"] >= total and same_length
        if done and adapter.is_dir() and any(adapter.iterdir()):
            loss = _last_loss(checkpoint)
            return Finished(adapter, checkpoint, state["step"], total, loss)
        return None
    earlier = holds_a_run(out)
    if earlier and not overwrite:
        raise UserError(
            f"{out} already holds a run ({', '.join(earlier)}); continue it with --resume latest, "
            "start over with --overwrite, or choose another --out"
        )
    if earlier and main:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return None


def _last_loss(checkpoint: Path) -> float | None:
    import json

    try:
        return json.loads((checkpoint / "state.json").read_text()).get("loss")
    except (OSError, ValueError):
        return None


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key == "lora":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _check_same_settings(config, saved: dict[str, Any], checkpoint: Path) -> None:
    from loraforge.train.config import config_to_dict, resolve_config

    if not saved:
        return  # a checkpoint from before configs were stored: nothing to compare
    try:
        previous = resolve_config(type(config), None, dict(saved, resume=None))
    except UserError:
        return  # written by another version with keys this one does not know: not comparable
    free = set(getattr(config, "RESUME_FREE", ()))
    now, then = _flat(config_to_dict(config)), _flat(config_to_dict(previous))
    differ = sorted(
        k for k in set(now) | set(then) if k.split(".")[0] not in free and now.get(k) != then.get(k)
    )
    if differ:
        shown = ", ".join(f"{k} ({then.get(k)!r} in the checkpoint, {now.get(k)!r} now)" for k in differ[:6])
        raise ConfigError(
            f"cannot resume {checkpoint}: these settings differ from the run's and would change its result: "
            f"{shown}. Resume with the run's settings, or start a new run (another --out, or --overwrite)"
        )
