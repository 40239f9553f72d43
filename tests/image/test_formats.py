"""Image adapter files: diffusers (read by diffusers itself), kohya (export + import, SGM names) and
cloneofsimo (import), each checked against the models' actual weights and generated images."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from loraforge.formats import detect_format, read_image_lora
from loraforge.formats.diffusers import EMBEDS_NAME, INFO_NAME, WEIGHTS_NAME, read_diffusers
from loraforge.formats.image_lora import ImageLora, ModuleLora, apply
from loraforge.formats.kohya import key_map, read_kohya, save_kohya
from loraforge.runtime import PipelineAdapters, apply_adapters, load_pipeline

PROMPT = "a circle, in the style of <s1><s2>"


def _np_image(pipe, prompt=PROMPT, seed=3, steps=3):
    result = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return result.images[0]


def _diffusers_pipe(base):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_tokens_into_diffusers(pipe, adapter_dir):
    info = json.loads((adapter_dir / INFO_NAME).read_text())
    embeds = load_file(adapter_dir / EMBEDS_NAME)
    pipe.load_textual_inversion([{t: embeds[t]} for t in info["tokens"]])


def test_diffusers_file_layout(trained):
    with safe_open(str(trained / WEIGHTS_NAME), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert any(
        k.startswith("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight")
        for k in keys
    )
    assert "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight" in keys
    with safe_open(str(trained / WEIGHTS_NAME), framework="pt") as f:
        conv_a = f.get_tensor("unet.down_blocks.0.resnets.0.conv1.lora_A.weight")
        conv_b = f.get_tensor("unet.down_blocks.0.resnets.0.conv1.lora_B.weight")
    assert conv_a.shape == (4, 16, 3, 3) and conv_b.shape == (16, 4, 1, 1)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A") for k in keys)
    assert all(
        k.split(".")[0] in ("unet", "text_encoder") and k.endswith((".lora_A.weight", ".lora_B.weight"))
        for k in keys
    )
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 4 and meta["text_encoder.r"] == 4
    embeds = load_file(trained / EMBEDS_NAME)
    assert sorted(embeds) == ["<s1>", "<s2>"] and embeds["<s1>"].shape == (32,)
    info = json.loads((trained / INFO_NAME).read_text())
    assert info["tokens"] == ["<s1>", "<s2>"] and info["rank"] == 4 and info["alpha"] == 4
    assert (trained / "validation.png").is_file()


def test_diffusers_own_loader_gives_the_same_image(trained, tiny_sd):
    ours = load_pipeline(tiny_sd)
    base_image = _np_image(ours)
    apply_adapters(ours, [(str(trained), 1.0)])
    ours_image = _np_image(ours)

    theirs = _diffusers_pipe(tiny_sd)
    theirs.load_lora_weights(str(trained))
    _load_tokens_into_diffusers(theirs, trained)
    theirs_image = _np_image(theirs)

    assert np.abs(ours_image - base_image).max() > 1e-3  # the adapter does something
    np.testing.assert_allclose(ours_image, theirs_image, atol=1e-5)


def test_kohya_export_and_import_round_trip(trained, tiny_sd, tmp_path):
    lora = read_diffusers(trained)
    out = tmp_path / "kohya"
    save_kohya(out / "style.safetensors", lora)
    (out / EMBEDS_NAME).write_bytes((trained / EMBEDS_NAME).read_bytes())
    (out / INFO_NAME).write_bytes((trained / INFO_NAME).read_bytes())
    tensors = load_file(out / "style.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert f"{name}.lora_down.weight" in tensors and f"{name}.lora_up.weight" in tensors
    assert tensors[f"{name}.alpha"].item() == 4.0
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in tensors
    assert detect_format(out) == "kohya"

    pipe = load_pipeline(tiny_sd)
    adapters = PipelineAdapters(pipe)
    back = read_image_lora(out, {c: m.model for c, m in adapters.models.items()})
    assert back.tokens == ["<s1>", "<s2>"]
    for component, modules in lora.components.items():
        assert set(back.components[component]) == set(modules)
        for module, m in modules.items():
            assert torch.equal(back.components[component][module].down, m.down)
            assert torch.equal(back.components[component][module].up, m.up)
            assert back.components[component][module].alpha == m.alpha

    apply_adapters(pipe, [(str(out / "style.safetensors"), 1.0)])
    from_kohya = _np_image(pipe)
    reference = load_pipeline(tiny_sd)
    apply_adapters(reference, [(str(trained), 1.0)])
    np.testing.assert_allclose(from_kohya, _np_image(reference), atol=1e-6)

    # diffusers reads the kohya file too (its A1111/kohya converter), with the same result.
    theirs = _diffusers_pipe(tiny_sd)
    theirs.load_lora_weights(str(out), weight_name="style.safetensors")
    _load_tokens_into_diffusers(theirs, out)
    np.testing.assert_allclose(from_kohya, _np_image(theirs), atol=1e-5)


def test_kohya_alpha_scales_the_update(tiny_sd, tmp_path):
    pipe = load_pipeline(tiny_sd)
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v"
    save_file(
        {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)},
        tmp_path / "civitai.safetensors",
    )
    adapters = apply_adapters(pipe, [(str(tmp_path / "civitai.safetensors"), 0.5)])
    layer = adapters.models["unet"].model.get_submodule(
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_v"
    )
    torch.testing.assert_close(layer.delta_weight("adapter0"), 2.0 / 4 * up @ down)
    assert layer.active == [("adapter0", 0.5)]


def test_kohya_unknown_or_lycoris_keys_are_errors(tiny_sd, tmp_path):
    pipe = load_pipeline(tiny_sd)
    models = {c: m.model for c, m in PipelineAdapters(pipe).models.items()}
    save_file(
        {
            "lora_unet_no_such_module.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_no_such_module.lora_up.weight": torch.zeros(4, 2),
        },
        tmp_path / "other.safetensors",
    )
    with pytest.raises(ValueError, match="no module for 'lora_unet_no_such_module'"):
        read_kohya(tmp_path / "other.safetensors", models)
    save_file(
        {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)},
        tmp_path / "loha.safetensors",
    )
    with pytest.raises(ValueError, match="LyCORIS"):
        read_kohya(tmp_path / "loha.safetensors", models)


def _sgm_attention_names(lpb=2):
    # The tiny SDXL UNet: down_blocks.1 and up_blocks.0 have attentions; layers_per_block 2.
    return {
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_5_1_transformer_blocks_0_attn2_to_k": "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
        "middle_block_1_transformer_blocks_0_attn1_to_out_0": "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "output_blocks_2_1_transformer_blocks_0_ff_net_2": "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2",
        "output_blocks_0_1_proj_in": "up_blocks.0.attentions.0.proj_in",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "output_blocks_4_0_emb_layers_1": "up_blocks.1.resnets.1.time_emb_proj",
    }


def test_kohya_sdxl_sgm_names_map_like_diffusers(tiny_sdxl, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = load_pipeline(tiny_sdxl)
    unet = pipe.unet
    torch.manual_seed(0)
    tensors = {}
    for sgm, module_name in _sgm_attention_names().items():
        module = unet.get_submodule(module_name)
        if isinstance(module, nn.Conv2d):
            down = torch.randn(2, module.in_channels, *module.kernel_size) * 0.3
            up = torch.randn(module.out_channels, 2, 1, 1) * 0.3
        else:
            down, up = torch.randn(2, module.in_features) * 0.3, torch.randn(module.out_features, 2) * 0.3
        tensors[f"lora_unet_{sgm}.lora_down.weight"] = down
        tensors[f"lora_unet_{sgm}.lora_up.weight"] = up
        tensors[f"lora_unet_{sgm}.alpha"] = torch.tensor(1.0)
    save_file(tensors, tmp_path / "sdxl.safetensors")

    adapters = PipelineAdapters(pipe)
    models = {c: m.model for c, m in adapters.models.items()}
    lora = read_image_lora(tmp_path / "sdxl.safetensors", models)
    assert set(lora.components["unet"]) == set(_sgm_attention_names().values())
    assert lora.components["unet"]["down_blocks.0.resnets.0.conv1"].alpha == 1.0
    names = key_map(models)
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    assert names["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == ("text_encoder", q)
    assert names["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"] == ("text_encoder_2", q)

    ours = load_pipeline(tiny_sdxl)
    apply_adapters(ours, [(str(tmp_path / "sdxl.safetensors"), 1.0)])
    theirs = DiffusionPipeline.from_pretrained(tiny_sdxl)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(tmp_path), weight_name="sdxl.safetensors")
    base = _np_image(load_pipeline(tiny_sdxl), "a square")
    a, b = _np_image(ours, "a square"), _np_image(theirs, "a square")
    assert np.abs(a - base).max() > 1e-3
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("prefix", ["lora_te1_", "lora_te_"])
def test_kohya_text_encoder_names_without_text_model(tiny_sd, tmp_path, prefix):
    """diffusers' `convert_state_dict_to_kohya`, given the PEFT state dict of transformers 5's flattened
    CLIPTextModel, names text-encoder modules without `text_model` (``lora_te1_encoder_layers_0_...``;
    other tools write ``lora_te_encoder_layers_0_...``). diffusers loads them; so does loraforge, the same."""
    from diffusers.utils import convert_state_dict_to_kohya

    theirs = _diffusers_pipe(tiny_sd)
    torch.manual_seed(0)
    state = {}
    for name, module in theirs.text_encoder.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            state[f"text_encoder.{name}.lora_A.weight"] = torch.randn(2, module.in_features) * 0.5
            state[f"text_encoder.{name}.lora_B.weight"] = torch.randn(module.out_features, 2) * 0.5
    unet_module = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    to_k = theirs.unet.get_submodule(unet_module)
    state[f"unet.{unet_module}.lora_A.weight"] = torch.randn(2, to_k.in_features) * 0.5
    state[f"unet.{unet_module}.lora_B.weight"] = torch.randn(to_k.out_features, 2) * 0.5
    tensors = {k.replace("lora_te1_", prefix): v for k, v in convert_state_dict_to_kohya(state).items()}
    assert f"{prefix}encoder_layers_0_self_attn_k_proj.lora_down.weight" in tensors
    path = tmp_path / "converted.safetensors"
    save_file(tensors, path)
    assert detect_format(path) == "kohya"

    ours = load_pipeline(tiny_sd)
    base = _np_image(ours, "a square")
    adapters = apply_adapters(ours, [(str(path), 1.0)])
    assert (
        "text_model.encoder.layers.1.self_attn.out_proj"
        in adapters.adapters[0].lora.components["text_encoder"]
    )
    theirs.load_lora_weights(str(tmp_path), weight_name=path.name)
    a, b = _np_image(ours, "a square"), _np_image(theirs, "a square")
    assert np.abs(a - base).max() > 1e-3
    np.testing.assert_allclose(a, b, atol=1e-5)


def _lora_diffusion_order(model, classes, kinds=(nn.Linear,)):
    """Module i of a lora_diffusion file: ancestors of the listed classes in model order, then each
    ancestor's matching sub-modules in order (written out here independently of the reader)."""
    names = []
    for ancestor_name, ancestor in model.named_modules():
        if type(ancestor).__name__ in classes:
            for sub_name, module in ancestor.named_modules():
                if isinstance(module, kinds):
                    names.append(f"{ancestor_name}.{sub_name}")
    return names


def test_cloneofsimo_final_lora_import(tiny_sd, tmp_path):
    pipe = load_pipeline(tiny_sd)
    torch.manual_seed(0)
    unet_names = _lora_diffusion_order(pipe.unet, {"CrossAttention", "Attention", "GEGLU"})
    te_names = _lora_diffusion_order(pipe.text_encoder, {"CLIPAttention"})
    assert unet_names[:4] == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    ]
    assert any(n.endswith("ff.net.0.proj") for n in unet_names)
    tensors, meta, expected = {}, {}, {}
    for component, model, names, classes in (
        ("unet", pipe.unet, unet_names, ["CrossAttention", "Attention", "GEGLU"]),
        ("text_encoder", pipe.text_encoder, te_names, ["CLIPAttention"]),
    ):
        meta[component] = json.dumps(classes)
        for i, name in enumerate(names):
            module = model.get_submodule(name)
            up = (torch.randn(module.out_features, 2) * 0.2).half()
            down = (torch.randn(2, module.in_features) * 0.2).half()
            tensors[f"{component}:{i}:up"], tensors[f"{component}:{i}:down"] = up, down
            meta[f"{component}:{i}:rank"] = "2"
            expected[(component, name)] = (down.float(), up.float())
    vectors = {"<s1>": torch.randn(32), "<s2>": torch.randn(32)}
    for token, vector in vectors.items():
        tensors[token] = vector
        meta[token] = "<embed>"
    path = tmp_path / "final_lora.safetensors"
    save_file(tensors, path, metadata=meta)
    assert detect_format(path) == "cloneofsimo"

    adapters = apply_adapters(pipe, [(str(path), 1.0)])
    for (component, name), (down, up) in expected.items():
        layer = adapters.models[component].model.get_submodule(name)
        assert torch.equal(layer.lora_A["adapter0"], down) and torch.equal(layer.lora_B["adapter0"], up)
        assert layer.scaling["adapter0"] == 1.0  # lora_diffusion's up already carries the scale
    tokenizer, embedding = pipe.tokenizer, pipe.text_encoder.get_input_embeddings()
    for token, vector in vectors.items():
        assert torch.equal(embedding.weight[tokenizer.convert_tokens_to_ids(token)], vector)

    # A file for another model (one module short) is an error, not a silent misalignment.
    del tensors[f"unet:{len(unet_names) - 1}:up"], tensors[f"unet:{len(unet_names) - 1}:down"]
    save_file(tensors, tmp_path / "short.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="does not fit"):
        apply_adapters(load_pipeline(tiny_sd), [(str(tmp_path / "short.safetensors"), 1.0)])


def test_apply_checks_everything_before_changing_the_model(tiny_sd):
    pipe = load_pipeline(tiny_sd)
    adapters = PipelineAdapters(pipe)
    unet = adapters.models["unet"]
    good = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    modules = {
        good: ModuleLora(torch.zeros(2, 16), torch.zeros(16, 2), 2.0),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": ModuleLora(
            torch.zeros(2, 7), torch.zeros(16, 2), 2.0
        ),
    }
    with pytest.raises(ValueError, match="shape"):
        apply(unet, "x", modules)
    with pytest.raises(ValueError, match="no module"):
        apply(unet, "x", {"nope.to_q": ModuleLora(torch.zeros(2, 16), torch.zeros(16, 2), 2.0)})
    assert not unet.peft_config and not unet.lora_layers()


def test_format_detection_and_diffusers_spellings(tmp_path):
    def pair():
        return torch.randn(2, 8), torch.randn(8, 2)

    (d1, u1), (d2, u2), (d3, u3) = pair(), pair(), pair()
    save_file(
        {
            "unet.a.b.to_q.lora.down.weight": d1,
            "unet.a.b.to_q.lora.up.weight": u1,
            "text_encoder.t.q_proj.lora_linear_layer.down.weight": d2,
            "text_encoder.t.q_proj.lora_linear_layer.up.weight": u2,
            "a.attn1.processor.to_out_lora.down.weight": d3,
            "a.attn1.processor.to_out_lora.up.weight": u3,
        },
        tmp_path / WEIGHTS_NAME,
    )
    assert detect_format(tmp_path) == "diffusers"
    lora = read_diffusers(tmp_path)
    assert set(lora.components["unet"]) == {"a.b.to_q", "a.attn1.to_out.0"}
    assert set(lora.components["text_encoder"]) == {"t.q_proj"}
    assert lora.components["unet"]["a.b.to_q"].alpha == 2.0  # no alpha information: scale 1
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "missing.safetensors")
    assert isinstance(lora, ImageLora)


def test_inspect_reads_image_adapters_in_both_layouts(trained, tmp_path):
    from loraforge.tools import describe

    info = describe(trained)  # the directory: weights, info and learned tokens, not the embeddings file
    assert info["path"].endswith(WEIGHTS_NAME) and info["format"] == "diffusers"
    assert info["rank"] == 4 and info["lora_alpha"] == 4.0 and info["base_model"]
    assert {"to_out.0", "ff.net.2", "conv1", "q_proj"} <= set(info["targets"])
    assert info["learned_tokens"] == ["<s1>", "<s2>"]

    kohya = tmp_path / "style.safetensors"
    save_kohya(kohya, read_diffusers(trained))
    k = describe(kohya)
    assert k["format"] == "kohya" and k["rank"] == 4 and k["lora_alpha"] == 4.0
    assert set(k["targets"]) == set(info["targets"]) and k["adapted_modules"] == info["adapted_modules"]
    assert k["parameters"] == info["parameters"]  # alpha scalars are not parameters
