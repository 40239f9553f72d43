"""Fixtures of the image tests: tiny pipelines saved as diffusers directories (see tiny_pipelines.py)."""

from pathlib import Path

import pytest
import torch
from tiny_pipelines import build_tiny_sd, build_tiny_sdxl, make_style_images

# Tiny models: one thread is as fast, and spare OpenMP threads spin badly on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    return str(build_tiny_sd(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    return str(build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture
def style_dir(tmp_path) -> Path:
    return make_style_images(tmp_path / "style")


@pytest.fixture(scope="session")
def trained(tiny_sd, tmp_path_factory):
    """An adapter trained on tiny_sd with UNet LoRA (attention and convolutions), text-encoder LoRA and
    two learned tokens."""
    from tiny_pipelines import train_adapter

    root = tmp_path_factory.mktemp("trained")
    data = make_style_images(root / "data")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "ff.net.2"]
    result, task = train_adapter(
        tiny_sd, data, root / "run", train_text_encoder=True, max_steps=6, target_modules=targets
    )
    return result.adapter_dir
