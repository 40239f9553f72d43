"""`train_text` from Python, the `--out` flag, and resuming a run whose config has the old flat keys."""

import math

import pytest
import torch
import yaml

from loraforge import LoraConfig
from loraforge.cli import main
from loraforge.errors import ConfigError, DataError
from loraforge.train.checkpoint import STATE_NAME, list_checkpoints, load_checkpoint
from loraforge.train.loop import TrainResult
from loraforge.train.text import TextTrainConfig, train_text


def _quick(env, out, **extra) -> dict:
    """Config keys of a run of a few seconds on the tiny base."""
    keys = dict(
        base=str(env["base"]),
        data=str(env["train"]),
        eval_data=str(env["heldout"]),
        output_dir=str(out),
        max_steps=3,
        batch_size=4,
        max_length=64,
        eval_every=0,
        sample_every=0,
        save_every=2,
        sample_max_new_tokens=2,
        threads=1,
        progress_bar=False,
        tensorboard=False,
    )
    keys.update(extra)
    return keys


def test_train_text_from_python(text_env, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from loraforge import LoraModel

    out = tmp_path / "run"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config = TextTrainConfig(**_quick(text_env, out), lora=lora)
    result = train_text(config)
    assert isinstance(result, TrainResult)
    assert (result.steps, result.total_steps, result.interrupted) == (3, 3, False)
    assert result.adapter_dir == out / "adapter" and result.output_dir == out
    assert result.checkpoint == out / "checkpoints" / "step-3"
    assert result.checkpoints == [out / "checkpoints" / "step-2", out / "checkpoints" / "step-3"]
    assert math.isfinite(result.train_loss) and math.isfinite(result.eval_loss)
    assert result.tokens > 0 and result.elapsed_s > 0 and result.step_time_s > 0
    assert [row["step"] for row in result.history if row["loss"] is not None] == [3]
    # The adapter is a LoRA adapter of the configured shape that loads back.
    model = LoraModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(text_env["base"]), result.adapter_dir
    )
    saved = model.peft_config["default"]
    assert saved.r == 4 and saved.lora_alpha == 8 and sorted(saved.target_modules) == ["q_proj", "v_proj"]
    assert saved.task_type == "CAUSAL_LM" and saved.base_model_name_or_path == str(text_env["base"])
    # The resolved config is saved, lora nested; the caller's config object is left as it was.
    written = yaml.safe_load((out / "train_config.yaml").read_text())
    assert written["lora"]["r"] == 4 and "lora_r" not in written
    assert config.lora is lora
    # The API prints what training prints, not the command's summary.
    printed = capsys.readouterr().out
    assert (
        "format prompt/completion" in printed
        and "resolved config" not in printed
        and "use it:" not in printed
    )


def test_train_text_overrides_and_errors(text_env, tmp_path):
    # Keywords are config keys, old flat names included, applied over the given config.
    result = train_text(
        TextTrainConfig(**_quick(text_env, tmp_path / "a")), max_steps=1, lora_r=2, save_every=0
    )
    assert result.steps == 1 and result.task.lora.peft_config["default"].r == 2
    # Bad values name the key, before anything loads (the base does not exist).
    missing = str(tmp_path / "no-such-base")
    with pytest.raises(ConfigError, match="config key 'max_steps'"):
        train_text(base=missing, max_steps=-1)
    with pytest.raises(ConfigError, match="config key 'lora_r'"):
        train_text(base=missing, lora_r=0)
    with pytest.raises(ConfigError, match="unknown config key 'lora.rank'"):
        train_text(base=missing, lora={"rank": 4})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable examples"):
        train_text(base=missing, data=str(empty), output_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--out", "--output-dir", "--output_dir"])
def test_out_flag_and_its_long_names(text_env, tmp_path, flag, capsys):
    out = tmp_path / "run"
    keys = _quick(text_env, out, max_steps=2, save_every=0, eval_data="none")
    del keys["output_dir"]
    argv = ["train", flag, str(out)] + [
        x for k, v in keys.items() for x in (f"--{k.replace('_', '-')}", str(v))
    ]
    assert main(argv) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert f"adapter: {out / 'adapter'}" in capsys.readouterr().out


def test_resume_a_run_saved_with_the_old_flat_config(text_env, tmp_path):
    out = tmp_path / "old"
    keys = _quick(text_env, out, max_steps=3, save_every=2, eval_data="none", schedule="constant")
    assert (
        main(["train"] + [x for k, v in keys.items() for x in (f"--{k}", str(v))] + ["--max-steps", "2"]) == 0
    )
    # Make the run look like one of an earlier version: flat LoRA keys in train_config.yaml and in
    # the checkpoint's copy of the config.
    flat = {k: v for k, v in yaml.safe_load((out / "train_config.yaml").read_text()).items() if k != "lora"}
    flat.update(lora_r=8, lora_alpha=16.0, lora_dropout=0.0, target_modules=None)
    (out / "train_config.yaml").write_text(yaml.safe_dump(flat))
    [(step, checkpoint)] = list_checkpoints(out)
    state = load_checkpoint(checkpoint)
    state["config"] = {k: v for k, v in flat.items()}
    torch.save(state, checkpoint / STATE_NAME)
    argv = ["train", "--config", str(out / "train_config.yaml"), "--max-steps", "3", "--resume", "latest"]
    assert main(argv) == 0
    assert step == 2 and [s for s, _ in list_checkpoints(out)] == [2, 3]
    written = yaml.safe_load((out / "train_config.yaml").read_text())
    assert written["lora"]["r"] == 8 and "lora_r" not in written  # saved again in today's form


def test_low_memory_turns_on_returning_freed_memory_and_changes_no_weight(text_env, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import loraforge.runtime

    calls = []
    # The real call changes the process's allocator for good; what it does is tests/test_memory.py's.
    monkeypatch.setattr(loraforge.runtime, "return_freed_memory", lambda: calls.append(1))
    plain = train_text(TextTrainConfig(**_quick(text_env, tmp_path / "plain")))
    assert calls == []
    low = train_text(TextTrainConfig(**_quick(text_env, tmp_path / "low"), low_memory=True))
    assert calls == [1]
    a = load_file(plain.adapter_dir / "adapter_model.safetensors")
    b = load_file(low.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
