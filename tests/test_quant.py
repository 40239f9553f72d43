"""A quantized frozen base (bitsandbytes 4-bit / 8-bit, on CPU): LoRA and DoRA against PEFT on the same
quantized base, training through the wrappers, merging, the 8-bit optimizer."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from tiny_models import randomise_adapters, tiny_llama

from loraforge import LoraConfig, LoraModel, UserError, get_lora_model
from loraforge.quant import is_quantized, model_quantization

pytest.importorskip("bitsandbytes")

# The LoRA part runs in float32 on both sides; the base output is bitsandbytes' own kernel on both
# sides, so only the order of float additions differs. Both sides must run the same kernel: on CPUs with
# AVX512-BF16, bitsandbytes switches a 4-bit layer to a repacked bf16 inference kernel at its first
# eval-mode forward without autograd, whose outputs differ from its training path by ~1e-3 here; so
# training-mode comparisons are made against training mode, inference against inference.
TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(hidden=64).save_pretrained(directory)
    return directory


def load(directory, quantize):
    from loraforge.runtime import load_text_model

    model, _ = load_text_model(str(directory), require_tokenizer=False, quantize=quantize)
    return model.eval()


@pytest.mark.parametrize("quantize", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapter_on_quantized_base_matches_peft_both_ways(base_dir, quantize, dora, tmp_path):
    ids = torch.randint(0, 128, (2, 7))
    base = load(base_dir, quantize)
    assert model_quantization(base) == ("8bit" if quantize == "int8" else "4bit")
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, PeftLoraConfig(**config))
    peft_model.train()
    randomise_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = peft_model(ids).logits
    expected.sum().backward()
    peft_grads = sorted(
        (n.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight"), p.grad)
        for n, p in peft_model.named_parameters()
        if p.grad is not None
    )

    ours = LoraModel.from_pretrained(load(base_dir, quantize), tmp_path / "peft", is_trainable=True)
    assert any(is_quantized(m.base_layer) for m in ours.lora_layers())
    ours.train()  # a training forward: the fused kernels must step aside for quantized layers
    got = ours(ids).logits
    torch.testing.assert_close(got, expected, **TOL)
    got.sum().backward()
    grads = sorted(
        (n.removeprefix("model.").replace(".default", ""), p.grad)
        for n, p in ours.named_parameters()
        if p.grad is not None
    )
    assert [n for n, _ in grads] == [n for n, _ in peft_grads]
    for (name, g), (_, pg) in zip(grads, peft_grads, strict=True):
        torch.testing.assert_close(g.reshape(-1), pg.reshape(-1), atol=1e-5, rtol=1e-4, msg=name)

    ours.save_pretrained(tmp_path / "ours")
    again = PeftModel.from_pretrained(load(base_dir, quantize), tmp_path / "ours")
    with torch.no_grad():
        ours.eval()
        inference = ours(ids).logits
        # Within the kernels' difference (see TOL) of the training path.
        torch.testing.assert_close(inference, got, atol=5e-3, rtol=0)
        if dora:
            # PEFT's DoRA dequantizes a repacked 4-bit weight as if it were not repacked (~0.08 off here
            # on AVX512-BF16 CPUs), so the file is checked in training mode, where both read it right.
            again.train()
            torch.testing.assert_close(again(ids).logits, expected, **TOL)
        else:
            again.eval()
            torch.testing.assert_close(again(ids).logits, inference, **TOL)


def test_merge_on_quantized_base_refuses_in_place_and_unloads_full_precision(base_dir, ids):
    model = get_lora_model(load(base_dir, "nf4"), LoraConfig(r=4, target_modules="all-linear"))
    randomise_adapters(model)
    model.train()  # bitsandbytes' training path: dequantize, then a float32 matmul (see TOL)
    with torch.no_grad():
        expected = model(ids).logits
    with pytest.raises(UserError, match="cannot merge into a quantized Linear4bit in place"):
        model.merge_adapter()
    assert not any(layer.merged for layer in model.lora_layers())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = model.merge_and_unload()
    assert any("full precision (float32)" in str(w.message) for w in caught)
    assert model_quantization(merged) is None and not hasattr(merged.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, **TOL)


def test_pissa_needs_full_precision_base(base_dir):
    with pytest.raises(UserError, match="pissa.*full-precision base"):
        get_lora_model(
            load(base_dir, "nf4"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
        )


def test_mixed_batch_on_quantized_base(base_dir):
    ids = torch.randint(0, 128, (2, 7))
    model = get_lora_model(load(base_dir, "nf4"), LoraConfig(r=4, target_modules="all-linear"))
    randomise_adapters(model)
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        mixed = model(ids, adapter_names=["default", "__base__"]).logits
        model.set_adapter("default")
        torch.testing.assert_close(mixed[0], model(ids[:1]).logits[0], **TOL)
        with model.disable_adapter():
            torch.testing.assert_close(mixed[1], model(ids[1:]).logits[0], **TOL)


def test_adamw8bit_steps_the_adapter():
    from loraforge.optim import make_optimizer

    model = get_lora_model(copy.deepcopy(tiny_llama()), LoraConfig(r=4, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer("adamw8bit", [{"params": params}], lr=1e-2)
    assert type(opt).__name__ == "AdamW8bit"
    ids = torch.randint(0, 128, (2, 7))
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_training_refuses_a_4bit_layer_repacked_for_inference_and_keeps_the_training_kernel(base_dir):
    # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer for its inference kernel at an
    # eval-mode forward and from then on uses that kernel, which has no backward, in training too: the
    # gradient reaching the layer's input would be silently dropped. Training such a layer is refused
    # (the repack is simulated here, so that this runs on any CPU); keep_4bit_training_kernel stops it.
    from loraforge.quant import keep_4bit_training_kernel, quant_kind, repacked_for_cpu_inference

    model = get_lora_model(load(base_dir, "nf4"), LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    layer = model.model.model.layers[1].self_attn.q_proj.base_layer
    ids = torch.randint(0, 128, (2, 6))
    layer.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(UserError, match="repacked by bitsandbytes"):
        model(input_ids=ids)
    with torch.no_grad():
        model(input_ids=ids)  # inference may use it
    layer.weight.quant_state.packing_format_for_cpu = False

    keep_4bit_training_kernel(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    four_bit = [m for m in model.modules() if quant_kind(m) == "4bit"]
    assert four_bit and not any(repacked_for_cpu_inference(m) for m in four_bit)
    model.train()
    model(input_ids=ids).logits.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4bit_training_forward_reuses_one_buffer_and_matches_bitsandbytes(dtype):
    """In CPU training a 4-bit base layer is dequantized into a reused buffer: same output and input
    gradient as the layer's own (bitsandbytes) path, and no new buffer from the second call on, nor
    for a smaller layer, which gets the front of the same buffer and still its own values."""
    import bitsandbytes as bnb

    from loraforge import quant

    torch.manual_seed(0)
    plain = torch.nn.Linear(128, 96, bias=True).to(dtype)
    layer = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=dtype, quant_type="nf4").to(dtype)
    layer.load_state_dict(plain.state_dict())
    layer = layer.to("cpu")  # quantizes
    layer.requires_grad_(False)
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)

    expected = layer(x)
    expected.float().square().sum().backward()
    expected_grad, x.grad = x.grad, None

    got = quant.reusing_linear(layer, x)
    assert got is not None
    buffer = quant._SCRATCH.buffers[dtype]
    assert buffer.numel() >= 96 * 128
    got.float().square().sum().backward()
    assert torch.equal(got, expected) and torch.equal(x.grad, expected_grad)
    again = quant.reusing_linear(layer, x.detach())
    assert torch.equal(again, expected) and quant._SCRATCH.buffers[dtype] is buffer

    small = bnb.nn.Linear4bit(128, 40, bias=False, compute_dtype=dtype, quant_type="nf4").to(dtype)
    small.load_state_dict(torch.nn.Linear(128, 40, bias=False).to(dtype).state_dict())
    small = small.to("cpu").requires_grad_(False)
    with torch.enable_grad():
        assert torch.equal(quant.reusing_linear(small, x.detach()), small(x.detach()))
    assert quant._SCRATCH.buffers[dtype] is buffer
    with torch.no_grad():  # inference keeps bitsandbytes' own kernels
        assert quant.reusing_linear(layer, x) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_training_forward_reuses_the_buffer_and_matches_bitsandbytes(dtype, monkeypatch):
    """In CPU training an 8-bit base layer is dequantized into the reused buffer, exactly as bitsandbytes'
    training path computes it: same output and input gradient, bit for bit (also when the weight goes
    through float32 in several chunks, the last one short); eval mode and inference keep bitsandbytes'
    own kernels."""
    import bitsandbytes as bnb

    from loraforge import quant

    monkeypatch.setattr(quant, "_INT8_CHUNK", 128 * 10)  # 96 rows: 10 chunks of 10 rows, the last of 6

    torch.manual_seed(0)
    plain = torch.nn.Linear(128, 96, bias=True)
    layer = bnb.nn.Linear8bitLt(128, 96, bias=True, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(plain.state_dict())
    layer = layer.to("cpu").requires_grad_(False).train()
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)

    expected = layer(x)  # the first call moves the int8 rows into the layer's state
    expected.float().square().sum().backward()
    expected_grad, x.grad = x.grad, None

    got = quant.reusing_linear(layer, x)
    assert got is not None and got.dtype == dtype
    buffer = quant._SCRATCH.buffers[dtype]
    got.float().square().sum().backward()
    assert torch.equal(got, expected) and torch.equal(x.grad, expected_grad)
    assert torch.equal(quant.reusing_linear(layer, x.detach()), expected)
    assert quant._SCRATCH.buffers[dtype] is buffer
    assert quant.reusing_linear(layer.eval(), x) is None
    with torch.no_grad():
        assert quant.reusing_linear(layer.train(), x) is None
