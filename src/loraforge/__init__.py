"""loraforge: LoRA adapters for any PyTorch model, trained, mixed, merged and saved in the ecosystem's formats."""

from loraforge.config import LoraConfig
from loraforge.model import LoraModel, get_lora_model

__all__ = ["LoraConfig", "LoraModel", "get_lora_model"]
__version__ = "0.1.0"
