"""PEFT's file format both ways, round trips, atomic writes, and loads that fail without side effects."""

import json
import os

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama

from loraforge import LoraConfig, LoraModel, get_lora_model
from loraforge.formats import io as io_module
from loraforge.layers import LoraLayer

CASES = {
    "llama": (
        tiny_llama,
        dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
        "CAUSAL_LM",
    ),
    "llama-all-linear-rslora": (
        tiny_llama,
        dict(target_modules="all-linear", use_rslora=True, rank_pattern={"o_proj": 2}),
        "CAUSAL_LM",
    ),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"]), "CAUSAL_LM"),
    "bert-head": (
        tiny_bert_classifier,
        dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
        "SEQ_CLS",
    ),
}


def inputs():
    return dict(input_ids=torch.randint(0, 128, (2, 6)))


def randomise(model):
    """Give B non-zero values (PEFT and loraforge both start B at zero) and perturb trained copies."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_here_with_same_outputs_and_gradients(case, tmp_path):
    build, kwargs, task = CASES[case]
    torch.manual_seed(1)
    base = build()
    x = inputs()
    peft_model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, task_type=task, **kwargs))
    randomise(peft_model)
    peft_model.save_pretrained(tmp_path)
    peft_out = peft_model(**x).logits
    peft_out.square().sum().backward()
    peft_grads = {
        n.replace(".default", ""): p.grad
        for n, p in peft_model.named_parameters()
        if p.requires_grad and "lora_" in n
    }

    torch.manual_seed(1)
    ours = LoraModel.from_pretrained(build(), tmp_path, is_trainable=True)
    out = ours(**x).logits
    torch.testing.assert_close(out, peft_out, atol=1e-5, rtol=0)
    out.square().sum().backward()
    grads = {}
    for name, module in ours.model.named_modules():
        if isinstance(module, LoraLayer):
            suffix = (
                ("lora_embedding_A", "lora_embedding_B")
                if "embed" in name
                else ("lora_A.weight", "lora_B.weight")
            )
            grads[f"base_model.model.{name}.{suffix[0]}"] = module.lora_A["default"].grad
            grads[f"base_model.model.{name}.{suffix[1]}"] = module.lora_B["default"].grad
    peft_grads = {"base_model.model." + k.split("base_model.model.", 1)[1]: v for k, v in peft_grads.items()}
    assert set(grads) == set(peft_grads)
    for k in grads:
        torch.testing.assert_close(grads[k], peft_grads[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_file_written_here_loads_in_peft_with_same_outputs(case, tmp_path):
    build, kwargs, task = CASES[case]
    torch.manual_seed(2)
    ours = get_lora_model(build(), LoraConfig(r=4, lora_alpha=8, task_type=task, **kwargs))
    randomise(ours)
    x = inputs()
    expected = ours(**x).logits
    ours.save_pretrained(tmp_path)
    torch.manual_seed(2)
    peft_model = PeftModel.from_pretrained(build(), tmp_path)
    torch.testing.assert_close(peft_model(**x).logits, expected, atol=1e-5, rtol=0)


def test_keys_follow_peft_naming(tmp_path):
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8


def test_extra_adapters_go_to_subfolders_and_round_trip(tmp_path, ids):
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("style", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (
        tmp_path / "style" / "adapter_model.safetensors"
    ).exists()
    model.set_adapter("style")
    expected = model(ids).logits
    loaded = LoraModel.from_pretrained(model.unload(), tmp_path / "style", adapter_name="style")
    torch.testing.assert_close(loaded(ids).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for n in before:
        assert torch.equal(after[n], before[n]), n


def test_shape_mismatch_names_key_and_both_shapes_and_leaves_model(tmp_path):
    get_lora_model(tiny_llama(hidden=32), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    other = LoraModel(tiny_llama(hidden=64))
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight.*\(8, 32\).*\(8, 64\)"):
        other.load_adapter(tmp_path)
    assert_unchanged(other, before)
    assert other.peft_config == {}


def test_missing_module_is_named(tmp_path):
    get_lora_model(tiny_llama(layers=3), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    other = LoraModel(tiny_llama(layers=2))
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"layers\.2\.self_attn\.q_proj.*no matching module"):
        other.load_adapter(tmp_path)
    assert_unchanged(other, before)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_a_clear_error(tmp_path, damage):
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00" + os.urandom(200))
    fresh = LoraModel(tiny_llama())
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fresh.load_adapter(tmp_path)
    assert_unchanged(fresh, before)


def test_pickle_refused_unless_allowed_then_weights_only(tmp_path, ids):
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path)
    torch.manual_seed(0)
    loaded = LoraModel.from_pretrained(model.unload(), tmp_path, allow_pickle=True)
    torch.testing.assert_close(loaded(ids).logits, expected)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="weights-only"):
        LoraModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)


def test_crash_during_save_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(io_module, "save_file", crash)
    with torch.no_grad():
        model.model.model.layers[0].self_attn.q_proj.lora_A["default"].add_(1)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_file_without_prefix_is_accepted(tmp_path, ids):
    model = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(
        {k.removeprefix("base_model.model."): v for k, v in tensors.items()},
        tmp_path / "adapter_model.safetensors",
    )
    loaded = LoraModel.from_pretrained(model.unload(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, expected)


BIAS_CASES = {
    # No task type: PEFT would add the classifier to modules_to_save for SEQ_CLS.
    "bert-lora_only": (tiny_bert_classifier, dict(target_modules=["query", "value"]), None, "lora_only"),
    "bert-all-head": (
        tiny_bert_classifier,
        dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
        "SEQ_CLS",
        "all",
    ),
    "gpt2-lora_only": (tiny_gpt2, dict(target_modules=["c_attn"]), "CAUSAL_LM", "lora_only"),
    "gpt2-all": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"]), "CAUSAL_LM", "all"),
}


def perturb_trained(model):
    """Moves everything the adapter trains (LoRA, trained biases, trained copies) away from its start."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("case", list(BIAS_CASES))
def test_trained_biases_written_here_load_in_peft(case, tmp_path):
    build, kwargs, task, bias = BIAS_CASES[case]
    torch.manual_seed(3)
    ours = get_lora_model(build(), LoraConfig(r=4, lora_alpha=8, task_type=task, bias=bias, **kwargs))
    perturb_trained(ours)
    x = inputs()
    expected = ours(**x).logits
    ours.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    adapted = "base_model.model." + (
        "bert.encoder.layer.0.attention.self.query" if "bert" in case else "transformer.h.0.attn.c_attn"
    )
    assert f"{adapted}.base_layer.bias" in keys and f"{adapted}.bias" not in keys  # PEFT's spelling
    torch.manual_seed(3)
    base = build()
    peft_model = PeftModel.from_pretrained(base, tmp_path)
    got = peft_model(**x).logits
    assert (got - expected).abs().max().item() <= 1e-5
    with torch.no_grad():
        untrained = build()
    assert (untrained(**x).logits - expected).abs().max().item() > 1e-3  # the biases matter


@pytest.mark.parametrize("case", list(BIAS_CASES))
def test_trained_biases_written_by_peft_load_here(case, tmp_path):
    build, kwargs, task, bias = BIAS_CASES[case]
    torch.manual_seed(4)
    peft_model = get_peft_model(
        build(), PeftLoraConfig(r=4, lora_alpha=8, task_type=task, bias=bias, **kwargs)
    )
    perturb_trained(peft_model)
    x = inputs()
    expected = peft_model(**x).logits
    peft_model.save_pretrained(tmp_path)
    assert any(k.endswith(".base_layer.bias") for k in load_file(tmp_path / "adapter_model.safetensors"))
    torch.manual_seed(4)
    ours = LoraModel.from_pretrained(build(), tmp_path)
    assert (ours(**x).logits - expected).abs().max().item() <= 1e-5
    # ... and a file from before this fix (biases under `<path>.bias`) still loads the same way.
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(
        {k.replace(".base_layer.bias", ".bias"): v for k, v in tensors.items()},
        tmp_path / "adapter_model.safetensors",
    )
    torch.manual_seed(4)
    old = LoraModel.from_pretrained(build(), tmp_path)
    assert (old(**x).logits - expected).abs().max().item() <= 1e-5


def test_failed_load_restores_the_biases_it_overwrote(tmp_path, monkeypatch):
    torch.manual_seed(5)
    ours = get_lora_model(tiny_bert_classifier(), LoraConfig(target_modules=["query"], bias="all"))
    perturb_trained(ours)
    ours.save_pretrained(tmp_path)
    fresh = LoraModel(tiny_bert_classifier())
    before = snapshot(fresh)
    calls = []

    def failing_copy(self, src, *args, **kwargs):
        calls.append(1)
        if len(calls) == 20:  # once, after some base biases were written
            raise KeyboardInterrupt
        return original(self, src, *args, **kwargs)

    original = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(KeyboardInterrupt):
        fresh.load_adapter(tmp_path)
    monkeypatch.undo()
    assert_unchanged(fresh, before)
    assert fresh.peft_config == {}
