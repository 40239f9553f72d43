"""LoraModel behaviour: targeting, adapter management, merging, mixed batches, counts."""

import copy

import pytest
import torch
from tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_unet

from loraforge import LoraConfig, LoraModel, get_lora_model
from loraforge.layers import LoraLayer


def cfg(**kw):
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    kw.setdefault("init_lora_weights", False)
    return LoraConfig(**kw)


def targeted(model):
    return sorted(n for n, m in model.model.named_modules() if isinstance(m, LoraLayer))


def test_llama2_7b_trainable_count_line(capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        base = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=32000,
            )
        )
    model = get_lora_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    assert (
        capsys.readouterr().out.strip()
        == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"
    )


def test_only_adapters_train(llama):
    model = get_lora_model(llama, cfg())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["q_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
        (
            r"model\.layers\.1\.mlp\.(up|down)_proj",
            ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"],
        ),
    ],
)
def test_target_lists_and_regex(llama, targets, expected):
    assert targeted(get_lora_model(llama, cfg(target_modules=targets))) == expected


def test_all_linear_skips_output_head(llama):
    names = targeted(get_lora_model(llama, cfg(target_modules="all-linear")))
    assert len(names) == 2 * 7 and "lm_head" not in names


def test_exclude_and_layers_to_transform(llama):
    names = targeted(
        get_lora_model(
            llama,
            cfg(
                target_modules="all-linear",
                exclude_modules=["k_proj", "o_proj"],
                layers_to_transform=[1],
                layers_pattern="layers",
            ),
        )
    )
    assert names == [
        f"model.layers.1.{m}"
        for m in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.q_proj", "self_attn.v_proj")
    ]


def test_rank_and_alpha_pattern(llama):
    model = get_lora_model(
        llama,
        cfg(
            r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 16}
        ),
    )
    q0 = model.model.get_submodule("model.layers.0.self_attn.q_proj")
    v1 = model.model.get_submodule("model.layers.1.self_attn.v_proj")
    assert (q0.r["default"], q0.scaling["default"]) == (4, 4.0)
    assert (v1.r["default"], v1.scaling["default"]) == (2, 4.0)


def test_target_matching_nothing_lists_module_names(llama):
    with pytest.raises(ValueError, match="matched no module") as e:
        get_lora_model(llama, cfg(target_modules=["qkv"]))
    assert "q_proj" in str(e.value) and "down_proj" in str(e.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("r", 0),
        ("lora_alpha", -1),
        ("lora_dropout", 1.5),
        ("bias", "some"),
        ("target_modules", "(("),
        ("init_lora_weights", "orthogonal"),
        ("rank_pattern", {"q": 0}),
        ("layers_to_transform", "x"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}"):
        LoraConfig(**{"target_modules": ["q"], field: value})


def test_adapter_name_errors(llama, ids):
    model = get_lora_model(llama, cfg())
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", cfg())
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        model.set_adapters(["default", "default"], [1.0])
    with pytest.raises(ValueError, match="unknown adapter 'x'"):
        model(ids, adapter_names=["x", "default", "default"])


def test_disable_adapter_gives_base_output(llama, ids):
    reference = llama(ids).logits
    model = get_lora_model(llama, cfg())
    assert not torch.allclose(model(ids).logits, reference)
    with model.disable_adapter():
        assert torch.equal(model(ids).logits, reference)


def test_merge_matches_unmerged_and_unmerge_restores(llama, ids):
    model = get_lora_model(llama, cfg(target_modules="all-linear"))
    before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = model(ids).logits
    for _ in range(5):
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in before:
            assert (p - before[n]).abs().max() <= 1e-6, n


def test_merge_and_unload_returns_plain_model(llama, ids):
    model = get_lora_model(llama, cfg(target_modules="all-linear"))
    expected = model(ids).logits
    plain = model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert type(plain).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_unload_returns_untouched_base(llama, ids):
    reference = llama(ids).logits
    plain = get_lora_model(llama, cfg()).unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert torch.equal(plain(ids).logits, reference)


def test_delete_adapter_unwraps_layers_it_alone_used(llama, ids):
    reference = llama(ids).logits
    model = get_lora_model(llama, cfg(target_modules=["q_proj"]))
    model.add_adapter("b", cfg(target_modules=["q_proj", "k_proj"]))
    model.delete_adapter("b")
    assert targeted(model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    model.delete_adapter("default")
    assert targeted(model) == [] and torch.equal(model(ids).logits, reference)


def test_weighted_set_adapters_is_base_plus_weighted_deltas():
    base = torch.nn.Sequential(torch.nn.Linear(8, 8))
    model = get_lora_model(base, LoraConfig(target_modules=["0"], init_lora_weights=False, r=2, lora_alpha=4))
    model.add_adapter("b", LoraConfig(target_modules=["0"], init_lora_weights=False, r=3, lora_alpha=3))
    model.set_adapters(["default", "b"], weights=[0.7, -0.4])
    layer = model.model[0]
    x = torch.randn(5, 8)
    expected = layer.base_layer(x) + x @ (0.7 * layer.delta("default") - 0.4 * layer.delta("b")).T
    torch.testing.assert_close(model(x), expected)
    assert all(p.requires_grad for p in layer.lora_A.values())


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_mixed_batch_rows_equal_separate_runs(llama, grad):
    # Without autograd the update is added in place into the base output; with it, out of place.
    ids = torch.randint(0, 128, (5, 6))
    model = get_lora_model(llama, cfg(r=8, target_modules="all-linear"))
    model.add_adapter("small", cfg(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    model.add_adapter("other", cfg(r=4, target_modules=["o_proj"]))
    names = ["small", "default", "__base__", "other", "small"]
    with torch.set_grad_enabled(grad):
        mixed = model(ids, adapter_names=names).logits
    with torch.no_grad():
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(ids[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_mixed_batch_weighted_mix_rows_equal_set_adapters(llama, grad):
    # A row may carry a weighted mix of adapters of different ranks and targets, one with a trained
    # lm_head copy; each row must equal set_adapters(names, weights) run on that row alone.
    ids = torch.randint(0, 128, (6, 6))
    model = get_lora_model(llama, cfg(r=8, target_modules="all-linear"))
    model.add_adapter("small", cfg(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    model.add_adapter("head", cfg(r=4, target_modules=["o_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.model.lm_head.modules_to_save["head"].weight.mul_(1.5)  # the copy differs from the original
    rows = [
        (("default", 0.7), ("small", 0.3)),
        "head",
        (("small", -0.5), ("head", 0.25), ("default", 1.2)),
        "__base__",
        (),
        (("default", 0.7), ("small", 0.3)),
    ]
    with torch.set_grad_enabled(grad):
        mixed = model(ids, adapter_names=rows).logits
    with torch.no_grad():
        for row, entry in enumerate(rows):
            mix = ((entry, 1.0),) if isinstance(entry, str) else entry
            if entry in ("__base__", ()):
                with model.disable_adapter():
                    alone = model(ids[row : row + 1]).logits
            else:
                model.set_adapters([n for n, _ in mix], [w for _, w in mix])
                alone = model(ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[3])  # the mix does change the row


def test_mixed_batch_refuses_a_bad_mix(llama, ids):
    from loraforge.errors import UserError

    model = get_lora_model(llama, cfg())
    with pytest.raises(UserError, match="twice"):
        model(ids, adapter_names=[(("default", 0.5), ("default", 0.5))] * 3)
    with pytest.raises(UserError, match="'nope'"):
        model(ids, adapter_names=[(("nope", 0.5),)] * 3)


def test_mixed_batch_sees_every_weight_change(llama):
    # The stacked weights are cached between mixed forwards; each way of changing an adapter must show.
    ids = torch.randint(0, 128, (2, 6))
    model = get_lora_model(llama, cfg(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", cfg(r=2, target_modules=["q_proj"]))
    names = ["default", "b"]

    def check():
        with torch.no_grad():
            mixed = model(ids, adapter_names=names).logits
            for row, name in enumerate(names):
                model.set_adapter(name)
                torch.testing.assert_close(mixed[row : row + 1], model(ids[row : row + 1]).logits)

    check()
    layer = model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["b"].add_(0.5)  # an in-place update, as an optimizer step makes
    check()
    model.delete_adapter("b")  # replaced by a new adapter of the same name and another rank
    model.add_adapter("b", cfg(r=3, target_modules=["q_proj", "v_proj"]))
    check()
    model.load_state_dict({k: v + 0.1 for k, v in model.state_dict().items() if "lora_A" in k}, strict=False)
    check()


def test_mixed_batch_on_conv_unet():
    unet = tiny_unet()
    model = get_lora_model(
        unet, LoraConfig(target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False)
    )
    model.add_adapter("b", LoraConfig(target_modules=["to_k", "conv2"], r=2, init_lora_weights=False))
    x, t, ctx = torch.randn(3, 4, 8, 8), torch.tensor([10, 10, 10]), torch.randn(3, 3, 16)
    with torch.no_grad():
        mixed = model(x, t, ctx, adapter_names=["b", "default", (("b", 0.4), ("default", -0.8))]).sample
        model.set_adapter("default")
        torch.testing.assert_close(mixed[1:2], model(x[1:2], t[1:2], ctx[1:2]).sample, atol=1e-5, rtol=1e-5)
        model.set_adapter("b")
        torch.testing.assert_close(mixed[:1], model(x[:1], t[:1], ctx[:1]).sample, atol=1e-5, rtol=1e-5)
        model.set_adapters(["b", "default"], [0.4, -0.8])
        torch.testing.assert_close(mixed[2:], model(x[2:], t[2:], ctx[2:]).sample, atol=1e-5, rtol=1e-5)


def test_mixed_batch_refuses_merged_adapters(llama, ids):
    model = get_lora_model(llama, cfg())
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge"):
        model(ids, adapter_names=["default"] * 3)


def test_gpt2_conv1d_targets_and_merges():
    gpt2 = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 5))
    model = get_lora_model(gpt2, LoraConfig(target_modules=["c_attn", "c_proj"], init_lora_weights=False))
    out = model(ids).logits
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain(ids).logits, out, atol=1e-5, rtol=1e-5)


def test_modules_to_save_trains_a_copy_of_the_head():
    bert = tiny_bert_classifier()
    ids = torch.randint(0, 128, (2, 5))
    original_head = copy.deepcopy(bert.classifier.state_dict())
    model = get_lora_model(
        bert, LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.classifier.modules_to_save.default.weight" in trainable
    model(ids).logits.sum().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    with model.disable_adapter():
        assert torch.equal(
            model.model.classifier(torch.ones(1, 32)),
            torch.ones(1, 32) @ original_head["weight"].T + original_head["bias"],
        )
    merged = model.merge_and_unload()
    assert not torch.equal(merged.classifier.weight, original_head["weight"])


@pytest.mark.parametrize(
    "bias, expected", [("none", set()), ("lora_only", {"q_proj", "v_proj"}), ("all", "every")]
)
def test_bias_modes(bias, expected):
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    model = get_lora_model(bert, LoraConfig(target_modules=["query", "value"], bias=bias))
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    all_biases = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    if expected == "every":
        assert trained == all_biases
    elif expected:
        assert trained == {n for n in all_biases if ".base_layer." in n} and len(trained) == 2
    else:
        assert trained == set()


def test_pissa_keeps_output_and_moves_principal_directions(llama, ids):
    reference = llama(ids).logits
    model = get_lora_model(llama, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    torch.testing.assert_close(model(ids).logits, reference, atol=1e-4, rtol=1e-4)
    layer = model.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_B["default"].abs().sum() > 0


def test_wrapper_forwards_attributes(llama):
    model = get_lora_model(llama, cfg())
    assert model.config is llama.config and isinstance(model, LoraModel)
