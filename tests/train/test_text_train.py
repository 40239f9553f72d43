"""End-to-end tests of `loraforge train` on a tiny random Llama (built locally; nothing is downloaded).

The runs share one configuration so the uninterrupted smoke run is the reference that the
interrupted-and-resumed runs must reproduce bit for bit.
"""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loraforge.cli import main
from loraforge.train.checkpoint import list_checkpoints, load_checkpoint
from loraforge.train.config import TextTrainConfig, load_config
from loraforge.train.loop import LossNotFinite, train
from loraforge.train.text import TextTask

MAX_STEPS = 10


def run_args(env, out, **extra):
    args = {
        "base": env["base"],
        "data": env["train"],
        "eval_data": env["heldout"],
        "output_dir": out,
        "max_steps": MAX_STEPS,
        "batch_size": 4,
        "save_every": 3,
        "keep_last": 2,
        "log_every": 2,
        "eval_every": 4,
        "sample_every": 4,
        "sample_max_new_tokens": 4,
        "lora_dropout": 0.1,  # exercises the RNG state a resume must restore
        "learning_rate": 5e-3,
        "warmup_steps": 2,
        "max_length": 64,
        "threads": 1,
        "progress_bar": "false",
        "tensorboard": "false",
    }
    args.update(extra)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def cli(args, **kw):
    """The real command line in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "loraforge.cli", *args], capture_output=True, text=True, timeout=300, **kw
    )


def adapter_tensors(directory):
    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def assert_identical(a_dir, b_dir):
    a, b = adapter_tensors(a_dir), adapter_tensors(b_dir)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def metrics(out):
    with open(Path(out) / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def reference_run(text_env):
    """The uninterrupted run through the real CLI in a subprocess (also the smoke test's subject)."""
    out = text_env["root"] / "reference"
    proc = cli(["train", *run_args(text_env, out, tensorboard="true")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_smoke_cli_writes_everything(reference_run, text_env):
    out, proc = reference_run
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    # Resolved config beside the adapter, loadable back to the same values.
    saved = load_config(TextTrainConfig, out / "train_config.yaml")
    assert saved.max_steps == MAX_STEPS and saved.base == str(text_env["base"]) and saved.lora_dropout == 0.1
    # Metrics: a train row every 2 steps, an eval row every 4 steps and at the end.
    rows = metrics(out)
    train_steps = [int(r["step"]) for r in rows if r["loss"]]
    eval_steps = [int(r["step"]) for r in rows if r["eval_loss"]]
    assert train_steps == [2, 4, 6, 8, 10] and eval_steps == [0, 4, 8, 10]  # 0: before training
    assert all(float(r["tokens_per_s"]) > 0 for r in rows if r["loss"])
    from PIL import Image

    with Image.open(out / "loss.png") as img:
        assert img.size == (800, 450)
    # Checkpoints at 3, 6, 9 and the end; keep_last=2 leaves the newest two.
    assert [s for s, _ in list_checkpoints(out)] == [9, 10]
    assert (out / "checkpoints" / "step-10" / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-10.txt", "step-4.txt", "step-8.txt"]
    assert "### generation" in (out / "samples" / "step-4.txt").read_text()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # The end of the run says where the adapter is and how to use it.
    assert f"adapter: {adapter}" in proc.stdout
    assert "loraforge generate --base" in proc.stdout and "loraforge eval-text" in proc.stdout
    assert "resolved config:" in proc.stdout and "format prompt/completion, 40 examples" in proc.stdout


def test_adapter_loads_in_peft_with_same_outputs(reference_run, text_env):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge import LoraModel

    out, _ = reference_run
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(text_env["base"]), out / "adapter"
    ).eval()
    ours = LoraModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(text_env["base"]), out / "adapter"
    ).eval()
    bare = AutoModelForCausalLM.from_pretrained(text_env["base"]).eval()
    with torch.no_grad():
        a, b, c = peft_model(input_ids=ids).logits, ours(input_ids=ids).logits, bare(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-4  # the adapter changed something


def test_same_seed_gives_bit_identical_adapter(reference_run, text_env, tmp_path):
    out, _ = reference_run
    assert main(["train", *run_args(text_env, tmp_path / "again")]) == 0
    assert_identical(out / "adapter", tmp_path / "again" / "adapter")
    assert main(["train", *run_args(text_env, tmp_path / "other_seed", seed=1, max_steps=2)]) == 0
    a, b = (
        adapter_tensors(out / "checkpoints" / "step-10" / "adapter"),
        adapter_tensors(tmp_path / "other_seed" / "adapter"),
    )
    assert any(not torch.equal(a[k], b[k]) for k in a)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from loraforge.train import text
    original = text.TextTask.loss
    calls = [0]
    def loss(self, batch):
        calls[0] += 1
        if calls[0] == int(os.environ["STOP_AT"]):
            os.kill(os.getpid(), getattr(signal, os.environ["STOP_SIGNAL"]))
        return original(self, batch)
    text.TextTask.loss = loss
    from loraforge.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def train_until_signal(env, out, step, signal):
    """`loraforge train` in a fresh interpreter that sends itself `signal` in the forward of `step`."""
    return subprocess.run(
        [sys.executable, "-c", KILLER, "train", *run_args(env, out)],
        env={**os.environ, "STOP_AT": str(step), "STOP_SIGNAL": signal},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sigkill_then_resume_latest_is_bit_identical(reference_run, text_env, tmp_path):
    out = tmp_path / "killed"
    # SIGKILL arrives in the forward pass of step 8: steps 1-7 done, newest checkpoint step-6.
    proc = train_until_signal(text_env, out, 8, "SIGKILL")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(out)] == [3, 6]
    assert not (out / "adapter").exists()
    assert main(["train", *run_args(text_env, out, resume="latest")]) == 0
    assert_identical(reference_run[0] / "adapter", out / "adapter")
    # Metric rows logged after step 6 by the killed run were dropped, not duplicated.
    steps = [int(r["step"]) for r in metrics(out) if r["loss"]]
    assert steps == [2, 4, 6, 8, 10]


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(reference_run, text_env, tmp_path):
    out = tmp_path / "interrupted"
    proc = train_until_signal(text_env, out, 5, "SIGINT")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "interrupted at step 5/10" in proc.stdout and "--resume latest" in proc.stdout
    assert [s for s, _ in list_checkpoints(out)] == [3, 5]
    assert main(["train", *run_args(text_env, out, resume="latest")]) == 0
    assert_identical(reference_run[0] / "adapter", out / "adapter")


class NanAt(TextTask):
    def __init__(self, config, at):
        super().__init__(config, log=lambda *a: None)
        self.at, self.calls = at, 0

    def loss(self, batch):
        loss, n = super().loss(batch)
        self.calls += 1
        return (loss * float("nan") if self.calls == self.at else loss), n


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(text_env, tmp_path):
    out = tmp_path / "nan"
    config = load_config(
        TextTrainConfig,
        overrides={
            "base": str(text_env["base"]),
            "data": str(text_env["train"]),
            "output_dir": str(out),
            "max_steps": 10,
            "batch_size": 4,
            "save_every": 2,
            "threads": 1,
            "progress_bar": False,
            "tensorboard": False,
            "eval_data": "none",
        },
    )
    with pytest.raises(LossNotFinite, match=r"loss is nan at step 5 .*step-4.*--resume latest"):
        train(NanAt(config, at=5), config)
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    state = load_checkpoint(out / "checkpoints" / "step-4")
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in state["trainable"].values())
    assert all(
        torch.isfinite(t).all() for t in adapter_tensors(out / "checkpoints" / "step-4" / "adapter").values()
    )
    assert not (out / "adapter").exists()
    # Resuming from the intact checkpoint works (here the loss is fine again).
    config.resume = "latest"
    result = train(NanAt(config, at=0), config)
    assert result.steps == 10 and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_empty_dataset_fails_before_loading_the_model(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    # The base does not exist: reaching it would be a different error.
    rc = main(
        [
            "train",
            "--data",
            str(empty),
            "--base",
            str(tmp_path / "no-such-base"),
            "--output_dir",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "no usable examples" in err and "no-such-base" not in err
    assert not (tmp_path / "o").exists()


def test_strict_cli_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    rc = main(["train", "--data", str(data), "--strict", "--base", str(tmp_path / "none")])
    assert rc == 2 and f"{data}:2: missing field 'completion'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: unknown flag
        main(["train", "--data", str(data), "--lerning_rate", "1"])
    assert exc.value.code == 2


def test_config_errors_through_cli(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("batch_size: many\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "config key 'batch_size'" in capsys.readouterr().err


def test_packing_run_trains(text_env, tmp_path):
    out = tmp_path / "packed"
    rc = main(
        [
            "train",
            *run_args(text_env, out, packing="true", max_steps=3, sample_every=0, eval_every=0, save_every=0),
        ]
    )
    assert rc == 0
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["packing"] is True
    assert [int(r["step"]) for r in metrics(out) if r["loss"]] == [2, 3]


def test_ddp_two_gloo_processes_match_one_process_with_accumulation(text_env, tmp_path):
    common = dict(max_steps=4, lora_dropout=0.0, sample_every=0, eval_every=0, save_every=2, log_every=1)
    ddp_out, ref_out = tmp_path / "ddp", tmp_path / "single"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "loraforge.cli",
        "train",
        *run_args(text_env, ddp_out, **common),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 reports and writes: one summary, one row per step.
    assert proc.stdout.count("done: 4 steps") == 1
    assert [int(r["step"]) for r in metrics(ddp_out) if r["loss"]] == [1, 2, 3, 4]
    # 2 processes x 1 micro-batch == 1 process x 2 accumulated micro-batches, same data, same update.
    assert main(["train", *run_args(text_env, ref_out, grad_accum=2, **common)]) == 0
    a, b = adapter_tensors(ddp_out / "adapter"), adapter_tensors(ref_out / "adapter")
    # Checkpointing runs the generic autograd path, the plain run the fused kernels: the same maths in
    # another summation order, so float rounding differs slightly (and Adam divides by tiny gradients).
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    tokens = [[r["tokens"] for r in metrics(out) if r["loss"]] for out in (ddp_out, ref_out)]
    assert tokens[0] == tokens[1]


def test_other_architecture_gpt2_with_packing(text_env, tmp_path):
    """Any transformers causal LM: a tiny GPT-2 (Conv1D layers, learned positions) trains, packed."""
    from tiny_text import make_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer()
    base = tmp_path / "gpt2"
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, eos_token_id=2, bos_token_id=1
    )
    GPT2LMHeadModel(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    out = tmp_path / "run"
    args = run_args(
        text_env, out, base=base, packing="true", max_steps=2, eval_every=0, sample_every=0, save_every=0
    )
    assert main(["train", *args]) == 0
    config = (out / "adapter" / "adapter_config.json").read_text()
    assert "c_attn" in config and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_gradient_checkpointing_gives_the_same_update(text_env, tmp_path):
    common = dict(max_steps=2, lora_dropout=0.0, eval_every=0, sample_every=0, save_every=0)
    assert main(["train", *run_args(text_env, tmp_path / "plain", **common)]) == 0
    assert main(["train", *run_args(text_env, tmp_path / "gc", gradient_checkpointing="true", **common)]) == 0
    a, b = adapter_tensors(tmp_path / "plain" / "adapter"), adapter_tensors(tmp_path / "gc" / "adapter")
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it trained
    # Checkpointing runs the generic autograd path, the plain run the fused kernels: the same maths in
    # another summation order, so float rounding differs slightly (and Adam divides by tiny gradients).
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_embedded_base_learns_the_example_task(tmp_path):
    """The README's main job: the default config on the embedded tiny-llama and the packaged
    example data, then `eval-text` (the shipped evaluation) must show the issue's figures: held-out
    loss down by at least half, at least 90% of greedy answers in the taught format where the bare
    base has under 10%, and values taken from the prompt (the base copies; the bare base gets none).
    The whole default run (564 steps, about 80 s): 160 steps give the format but few right values,
    300 steps 39%; the issue's goals need the run the README gives."""
    out, report = tmp_path / "run", tmp_path / "eval.json"
    flags = ["--save_every", "0", "--sample_every", "0", "--eval_every", "0"]
    proc = cli(
        ["train", "--output_dir", str(out), *flags, "--progress_bar", "false", "--tensorboard", "false"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny-llama" in proc.stdout and "1500 examples" in proc.stdout
    proc = cli(["eval-text", "--adapter", str(out / "adapter"), "--max-examples", "40", "--out", str(report)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = yaml.safe_load(report.read_text())
    assert figures["loss_drop_percent"] >= 50
    assert figures["adapter"]["follow_rate"] >= 0.9 and figures["base"]["follow_rate"] < 0.1
    assert figures["adapter"]["value_rate"] >= 0.95 and figures["adapter"]["exact_rate"] >= 0.8
    assert figures["base"]["value_rate"] == 0
    assert figures["adapter"]["examples"] == 40
