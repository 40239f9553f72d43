"""loraforge: LoRA adapters for any PyTorch model, trained, mixed, merged and saved in the ecosystem's formats.

The engine (PEFT's names)::

    from loraforge import LoraConfig, LoraModel, get_lora_model

A Python call for every job (the command line is a thin layer over these)::

    from loraforge import TextTrainConfig, train_text, generate_text
    result = train_text(TextTrainConfig(max_steps=100, output_dir="runs/mine"))
    print(generate_text("Describe as JSON: Tom ran.", adapters=[result.adapter_dir], greedy=True))
    job = run_job("lora_training", {"seed": 3})      # `loraforge run`: job.result is a CID in the store

The jobs' modules load on first use, so ``import loraforge`` stays light.
"""

import logging
from importlib import import_module

from loraforge.config import LoraConfig
from loraforge.errors import UserError
from loraforge.model import LoraModel, get_lora_model

# name -> module that defines it; imported when first used.
_API = {
    "TextTrainConfig": "loraforge.train.config",
    "ImageTrainConfig": "loraforge.train.image",
    "TrainResult": "loraforge.train.loop",
    "train_text": "loraforge.train.text",
    "train_image": "loraforge.train.image",
    "SamplingSettings": "loraforge.infer.text",
    "generate_text": "loraforge.infer.text",
    "generate_images": "loraforge.infer.image",
    "load_text": "loraforge.runtime",
    "load_image": "loraforge.runtime",
    "run_job": "loraforge.jobs.runner",
    "verify_job": "loraforge.jobs.runner",
    "create_loraplus_optimizer": "loraforge.optim",
}

# bitsandbytes announces at import, on CPUs with AVX512-BF16, that it could not fetch an optional
# kernel from the Hugging Face hub; its built-in kernel is used instead. Nothing a user can act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage()
)

__all__ = ["LoraConfig", "LoraModel", "UserError", "get_lora_model", *_API]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
