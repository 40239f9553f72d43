"""DoRA (use_dora=True) against PEFT's implementation, both ways: outputs, gradients, files; merging."""

import copy

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import randomise_adapters, tiny_gpt2, tiny_llama
from torch import nn

from loraforge import LoraConfig, LoraModel, UserError, get_lora_model
from loraforge.layers import LoraLayer

TOL = dict(atol=1e-5, rtol=0)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, pixel_values):
        h = torch.relu(self.conv(pixel_values))
        return self.head(self.proj(h).flatten(1))


CASES = {
    "llama": (
        tiny_llama,
        dict(target_modules="all-linear"),
        lambda: dict(input_ids=torch.randint(0, 128, (2, 6))),
    ),
    "gpt2-conv1d": (
        tiny_gpt2,
        dict(target_modules=["c_attn", "c_fc"]),
        lambda: dict(input_ids=torch.randint(0, 128, (2, 6))),
    ),
    "conv2d": (
        ConvNet,
        dict(target_modules=["conv", "proj"]),
        lambda: dict(pixel_values=torch.randn(2, 3, 6, 6)),
    ),
}


def output(model, x):
    out = model(**x)
    return out if isinstance(out, torch.Tensor) else out.logits


def dora_grads(model) -> dict[str, torch.Tensor]:
    """module path + (A | B | m) -> gradient, for a PEFT model or a LoraModel."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        path = (
            name.removeprefix("base_model.model.")
            if name.startswith("base_model.")
            else name.removeprefix("model.")
        )
        for key, short in (("lora_A", "A"), ("lora_B", "B"), ("lora_magnitude_vector", "m")):
            if f".{key}." in path:
                out[path.split(f".{key}.")[0] + "." + short] = p.grad.reshape(-1)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_peft_dora_file_loads_here_with_same_outputs_and_gradients(case, tmp_path):
    build, kwargs, make_x = CASES[case]
    torch.manual_seed(1)
    base = build()
    x = make_x()
    peft_model = get_peft_model(
        copy.deepcopy(base), PeftLoraConfig(r=4, lora_alpha=8, use_dora=True, **kwargs)
    )
    randomise_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    expected = output(peft_model, x)
    expected.square().sum().backward()

    ours = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    got = output(ours, x)
    torch.testing.assert_close(got, expected, **TOL)
    got.square().sum().backward()
    peft_grads, grads = dora_grads(peft_model), dora_grads(ours)
    assert set(grads) == set(peft_grads) and any(k.endswith(".m") for k in grads)
    for k in grads:
        torch.testing.assert_close(grads[k], peft_grads[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_dora_file_written_here_loads_in_peft_with_same_outputs(case, tmp_path):
    build, kwargs, make_x = CASES[case]
    torch.manual_seed(2)
    base = build()
    x = make_x()
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, use_dora=True, **kwargs))
    # A fresh DoRA adapter changes nothing: m starts at the rows' norms and B at zero.
    torch.testing.assert_close(output(ours, x), output(base, x), **TOL)
    randomise_adapters(ours)
    expected = output(ours, x)
    ours.save_pretrained(tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert peft_model.peft_config["default"].use_dora
    torch.testing.assert_close(output(peft_model, x), expected, **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_dora_merge_equals_unmerged_and_cycles_do_not_drift(case):
    build, kwargs, make_x = CASES[case]
    torch.manual_seed(3)
    base = build()
    x = make_x()
    model = get_lora_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True, **kwargs))
    before = {n: p.detach().clone() for n, p in model.base_parameters()}
    randomise_adapters(model)
    with torch.no_grad():
        expected = output(model, x)
        for _ in range(5):
            model.merge_adapter()
            torch.testing.assert_close(output(model, x), expected, **TOL)
            model.unmerge_adapter()
        torch.testing.assert_close(output(model, x), expected, **TOL)
        for n, p in model.base_parameters():
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
        merged = model.merge_and_unload()
        torch.testing.assert_close(output(merged, x), expected, **TOL)


def test_dora_merge_matches_peft_merge():
    torch.manual_seed(4)
    base = tiny_llama()
    peft_model = get_peft_model(
        copy.deepcopy(base), PeftLoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear")
    )
    randomise_adapters(peft_model)
    ours = get_lora_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear")
    )
    with torch.no_grad():
        for (_, layer), (_, peft_layer) in zip(
            [(n, m) for n, m in ours.model.named_modules() if isinstance(m, LoraLayer)],
            [
                (n, m)
                for n, m in peft_model.base_model.model.named_modules()
                if hasattr(m, "lora_magnitude_vector") and m.lora_magnitude_vector
            ],
            strict=True,
        ):
            layer.lora_A["default"].copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B["default"].copy_(peft_layer.lora_B["default"].weight)
            layer.lora_magnitude_vector["default"].copy_(peft_layer.lora_magnitude_vector["default"].weight)
    theirs = peft_model.merge_and_unload().state_dict()
    mine = ours.merge_and_unload().state_dict()
    assert set(mine) == set(theirs)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], **TOL)


def test_dora_adapter_weight_scales_its_whole_part_and_merges_at_that_weight(ids):
    torch.manual_seed(5)
    base = tiny_llama()
    with torch.no_grad():
        plain = base(ids).logits
    model = get_lora_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"))
    randomise_adapters(model)
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        model.set_adapters(["default"], [0.0])
        torch.testing.assert_close(model(ids).logits, plain, **TOL)
        model.set_adapters(["default", "lora"], [0.5, 0.7])
        expected = model(ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, expected, **TOL)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, expected, **TOL)


def test_dora_refusals(ids):
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(UserError, match="not defined for DoRA"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="cat")
    with pytest.raises(UserError, match="DoRA adapter, which mixed-batch"):
        model(ids, adapter_names=["default", "__base__"])
    with pytest.raises(UserError, match="not supported on Embedding"):
        get_lora_model(tiny_llama(), LoraConfig(r=4, use_dora=True, target_modules=["embed_tokens"]))


def test_dora_trains_magnitude_and_loraplus_puts_it_with_b():
    from loraforge import create_loraplus_optimizer

    model = get_lora_model(tiny_llama(), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    names = {id(p): n for n, p in model.named_parameters()}
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    lrs = {names[id(p)].split(".")[-2]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs == {"lora_A": 1e-3, "lora_B": 16e-3, "lora_magnitude_vector": 16e-3}
