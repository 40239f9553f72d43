"""`loraforge bases / inspect / mix / merge`, run as a user runs them: real subprocesses, real files."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM

from loraforge import LoraConfig, LoraModel, get_lora_model


def cli(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "loraforge.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def workspace(tmp_path):
    """A tiny base model directory and two adapters of different ranks trained on it (random B)."""
    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    for name, r, targets in [("a", 4, ["q_proj", "v_proj"]), ("b", 2, ["q_proj", "o_proj"])]:
        model = get_lora_model(
            tiny_llama(),
            LoraConfig(
                r=r,
                lora_alpha=2 * r,
                target_modules=targets,
                init_lora_weights=False,
                base_model_name_or_path=str(tmp_path / "base"),
            ),
        )
        with torch.no_grad():
            for layer in model.lora_layers():
                layer.base_layer.weight.copy_(
                    base.get_submodule(next(n for n, m in model.model.named_modules() if m is layer)).weight
                )
        model.save_pretrained(tmp_path / name)
    return tmp_path


def outputs_with(workspace, specs, ids):
    model = LoraModel(AutoModelForCausalLM.from_pretrained(workspace / "base"))
    names = []
    for i, (path, _) in enumerate(specs):
        names.append(f"x{i}")
        model.load_adapter(path, names[-1])
    model.set_adapters(names, [w for _, w in specs])
    with torch.no_grad():
        return model(ids).logits


def test_bases_lists_embedded_models():
    out = json.loads(cli("bases", "--json").stdout)
    assert {row["name"] for row in out} == {"tiny-llama", "tiny-sd"}
    assert all(row["path"] for row in out)


def test_inspect_reports_rank_alpha_targets_size_and_base(workspace):
    info = json.loads(cli("inspect", workspace / "a", "--json").stdout)
    assert info["rank"] == 4 and info["lora_alpha"] == 8 and info["targets"] == ["q_proj", "v_proj"]
    assert info["parameters"] == 2 * (4 * 32 + 32 * 4) + 2 * (
        4 * 32 + 16 * 4
    )  # q: 32->32, v: 32->16 (2 kv heads) and info["base_model"] == str(workspace / "base")
    assert info["file_size_bytes"] == (workspace / "a" / "adapter_model.safetensors").stat().st_size
    text = cli("inspect", workspace / "a").stdout
    assert "rank          4" in text and "q_proj, v_proj" in text


def test_inspect_bad_file_is_one_clear_error(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a file")
    proc = cli("inspect", tmp_path / "x.safetensors", check=False)
    assert (
        proc.returncode == 2
        and "not a readable safetensors file" in proc.stderr
        and "Traceback" not in proc.stderr
    )


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_mix_writes_an_adapter_equal_to_the_weighted_sum(workspace, method):
    cli(
        "mix",
        f"{workspace / 'a'}:0.7",
        f"{workspace / 'b'}:-0.5",
        "--method",
        method,
        "--rank",
        "6",
        "--out",
        workspace / "mix",
    )
    ids = torch.randint(0, 128, (2, 5))
    expected = outputs_with(workspace, [(workspace / "a", 0.7), (workspace / "b", -0.5)], ids)
    got = outputs_with(workspace, [(workspace / "mix", 1.0)], ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    config = json.loads((workspace / "mix" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(workspace / "base")


def test_mix_linear_rejects_different_ranks(workspace):
    proc = cli(
        "mix", workspace / "a", workspace / "b", "--method", "linear", "--out", workspace / "m", check=False
    )
    assert proc.returncode == 2 and "one rank" in proc.stderr


def test_merge_writes_sharded_standalone_model_matching_unmerged(workspace):
    out = workspace / "merged"
    proc = cli(
        "merge",
        "--adapter",
        f"{workspace / 'a'}:0.8",
        "--adapter",
        f"{workspace / 'b'}:0.5",
        "--out",
        out,
        "--max-shard-size",
        "100KB",
    )
    assert "saved standalone model" in proc.stdout
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert not any("lora" in k for s in shards for k in load_file(out / s))
    ids = torch.randint(0, 128, (2, 5))
    merged = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(
        got,
        outputs_with(workspace, [(workspace / "a", 0.8), (workspace / "b", 0.5)], ids),
        atol=1e-5,
        rtol=1e-5,
    )


def test_merge_refuses_missing_adapter_before_loading(workspace):
    proc = cli("merge", "--adapter", workspace / "nope", "--out", workspace / "m", check=False)
    assert proc.returncode == 2 and "not an adapter directory" in proc.stderr
    assert not (workspace / "m").exists()


def test_adapter_spec_weights_and_mistyped_weights(tmp_path):
    from loraforge.errors import UserError as CliError
    from loraforge.runtime import parse_adapter_spec

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert parse_adapter_spec(f"{adapter}:0.5") == (str(adapter), 0.5)
    assert parse_adapter_spec(f"{adapter}:-1") == (str(adapter), -1.0)
    assert parse_adapter_spec(str(adapter)) == (str(adapter), 1.0)
    colon = tmp_path / "a:b"  # a path with a colon in it stays a path
    colon.mkdir()
    assert parse_adapter_spec(str(colon)) == (str(colon), 1.0)
    with pytest.raises(CliError, match="must be a number, got 'x'"):
        parse_adapter_spec(f"{adapter}:x")
