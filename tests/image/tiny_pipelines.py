"""Builders of tiny Stable Diffusion pipelines (SD 1.x layout and SDXL layout), built from configs and saved as
normal diffusers directories so every test goes through `DiffusionPipeline.from_pretrained`.

Images are 16x16 (VAE factor 2, latents 4x8x8); the tokenizer is byte-level with no merges, so
any text tokenizes and new placeholder tokens can be added.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_SIZE = 16
TEXT_HIDDEN = 32


def _byte_chars() -> list[str]:
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"), model_max_length=40
    )


def _text_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=40,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_tiny_sd(directory: Path, prediction_type: str = "epsilon") -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = make_tokenizer(directory / "_tok")
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return directory


def build_tiny_sdxl(directory: Path) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    tokenizer = make_tokenizer(directory / "_tok")
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_HIDDEN,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + TEXT_HIDDEN,
        transformer_layers_per_block=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    )
    pipe.save_pretrained(directory)
    return directory


def make_style_images(directory: Path, count: int = 4, size: int = IMAGE_SIZE, captions: bool = True) -> Path:
    """Small striped images (a style) with same-name .txt captions."""
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        yy, xx = np.mgrid[0:size, 0:size]
        stripes = ((xx + yy + i) // 4) % 2
        colour_a, colour_b = np.array([235, 20, 185]), np.array([255, 145, 20])
        pixels = np.where(stripes[..., None] == 1, colour_a, colour_b) + rng.integers(-5, 5, (size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(directory / f"img{i}.png")
        if captions:
            (directory / f"img{i}.txt").write_text(["a circle", "a square"][i % 2])
    return directory


def train_adapter(base: str, data: Path, out: Path, **overrides):
    """Trains an adapter in-process through the shared loop; returns (TrainResult, task)."""
    from accelerate.state import AcceleratorState

    from loraforge.train.config import load_config
    from loraforge.train.image import ImageTask, ImageTrainConfig, load_data
    from loraforge.train.loop import train

    settings = {
        "base": base,
        "data": str(data),
        "output_dir": str(out),
        "max_steps": 4,
        "batch_size": 2,
        "learning_rate": 1e-2,
        "schedule": "constant",
        "validation_steps": 2,
        "progress_bar": False,
        "tensorboard": False,
        "save_every": 0,
        "lora_r": 4,
        "lora_alpha": 4,
    }
    settings.update(overrides)
    config = load_config(ImageTrainConfig, overrides=settings)
    # accelerate keeps one global state per process; each run here may want other settings.
    AcceleratorState._reset_state(reset_partial_state=True)
    records, _ = load_data(config)
    task = ImageTask(config, records)
    task.log = lambda *a, **k: None
    return train(task, config), task
