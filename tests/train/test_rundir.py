"""Finished runs are never lost: what `train` does with a directory that already holds a run.

Real subprocesses of the command line on a tiny base, as a user meets these cases."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from loraforge.train.checkpoint import list_checkpoints

STEPS = 4


def train(env, out, *extra, **overrides):
    args = {
        "base": env["base"],
        "data": env["train"],
        "eval_data": env["heldout"],
        "out": out,
        "max_steps": STEPS,
        "batch_size": 4,
        "save_every": 2,
        "eval_every": 0,
        "sample_every": 0,
        "max_length": 64,
        "threads": 1,
        "progress_bar": "false",
        "tensorboard": "false",
    }
    args.update(overrides)
    argv = [x for k, v in args.items() for x in (f"--{k}", str(v))]
    return subprocess.run(
        [sys.executable, "-m", "loraforge.cli", "train", *argv, *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def snapshot(out):
    """Every file of a run directory with its bytes."""
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(text_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = train(text_env, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def interrupted(finished, tmp_path_factory):
    """The finished run as a run killed after its first checkpoint: the last checkpoint and the
    adapter gone."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "adapter")
    shutil.rmtree(list_checkpoints(out)[-1][1])
    return out


def copy_of(run, tmp_path):
    """A private copy of a module-scoped run, for a test that changes it."""
    return shutil.copytree(run, tmp_path / "run")


def test_a_new_run_into_a_finished_one_is_refused_and_changes_nothing(text_env, finished):
    before = snapshot(finished)
    proc = train(text_env, finished, learning_rate=1e-2)
    assert proc.returncode == 2
    error = proc.stderr.strip()
    assert len(error.splitlines()) == 1
    assert "already holds a run" in error and "--resume latest" in error and "--overwrite" in error
    assert snapshot(finished) == before


def test_resume_of_a_finished_run_says_so_and_exits_0(text_env, finished):
    before = snapshot(finished)
    proc = train(text_env, finished, resume="latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"already finished at step {STEPS} of {STEPS}" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert snapshot(finished) == before


@pytest.mark.parametrize(
    "change, key",
    [({"lora_r": 4}, "lora.r"), ({"batch_size": 2}, "batch_size"), ({"seed": 1}, "seed")],
)
def test_resume_with_other_settings_is_refused_naming_them(text_env, interrupted, tmp_path, change, key):
    out = copy_of(interrupted, tmp_path)
    before = snapshot(out)
    proc = train(text_env, out, resume="latest", **change)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot resume" in proc.stderr and key in proc.stderr
    assert snapshot(out) == before  # nothing written, not even the config


def test_resume_may_change_what_does_not_change_the_result(text_env, interrupted, tmp_path):
    out = copy_of(interrupted, tmp_path)
    proc = train(text_env, out, resume="latest", save_every=1, log_every=1, eval_every=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: 2 steps" in proc.stdout and f"steps 3-{STEPS} of {STEPS}" in proc.stdout


def test_overwrite_starts_over_removing_only_the_runs_files(text_env, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "notes.txt").write_text("mine")
    old = load_file(out / "adapter" / "adapter_model.safetensors")
    proc = train(text_env, out, "--overwrite", seed=7)
    assert proc.returncode == 0, proc.stderr[-2000:]
    new = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(not (old[k] == new[k]).all() for k in old)  # a new run, not the old adapter
    assert (out / "notes.txt").read_text() == "mine"
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]  # the old run's checkpoints are gone


def test_resume_and_overwrite_together_are_refused(text_env, finished):
    proc = train(text_env, finished, "--overwrite", resume="latest")
    assert proc.returncode == 2 and "contradict" in proc.stderr


def test_resume_with_more_steps_extends_a_finished_run(text_env, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    proc = train(text_env, out, resume="latest", max_steps=STEPS + 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"steps {STEPS + 1}-{STEPS + 2} of {STEPS + 2}" in proc.stdout
    assert list_checkpoints(out)[-1][0] == STEPS + 2
