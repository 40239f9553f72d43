import random

import numpy as np
import pytest
import torch

from loraforge.train.checkpoint import (
    capture_rng_state,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)


def _save(out, step, keep_last=0):
    def write_adapter(directory):
        directory.mkdir(parents=True)
        (directory / "adapter_config.json").write_text("{}")

    return save_checkpoint(
        out, step, {"step": step, "w": torch.full((2,), float(step))}, write_adapter, {"loss": 1.0}, keep_last
    )


def test_save_load_and_latest(tmp_path):
    assert find_latest(tmp_path) is None
    for step in (5, 10, 15):
        _save(tmp_path, step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10, 15]
    latest = find_latest(tmp_path)
    assert latest.name == "step-15"
    assert (latest / "adapter" / "adapter_config.json").is_file()
    state = load_checkpoint(latest)
    assert state["step"] == 15 and torch.equal(state["w"], torch.full((2,), 15.0))
    assert resolve_resume(tmp_path, "latest") == latest
    assert resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step-5")).name == "step-5"
    assert resolve_resume(tmp_path, None) is None


def test_keep_last_k(tmp_path):
    for step in range(1, 8):
        _save(tmp_path, step, keep_last=3)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 6, 7]
    _save(tmp_path, 8, keep_last=0)  # 0 keeps everything
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 6, 7, 8]


def test_partial_checkpoints_are_never_latest(tmp_path):
    _save(tmp_path, 4)
    # What a process killed mid-save leaves: a temp dir, and a step dir without its state file.
    (tmp_path / "checkpoints" / ".tmp-step-9-99999").mkdir()
    (tmp_path / "checkpoints" / "step-12").mkdir()
    assert find_latest(tmp_path).name == "step-4"
    _save(tmp_path, 6)
    assert not (tmp_path / "checkpoints" / ".tmp-step-9-99999").exists()  # cleaned up by the next save


def test_resaving_a_step_replaces_it(tmp_path):
    _save(tmp_path, 3)
    save_checkpoint(tmp_path, 3, {"step": 3, "new": True})
    assert load_checkpoint(find_latest(tmp_path))["new"] is True
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-3"]


def test_resume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        resolve_resume(tmp_path, "latest")
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        resolve_resume(tmp_path, str(tmp_path))


def test_rng_state_round_trip():
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
