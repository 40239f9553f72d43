import pytest
from tiny_text import make_base, task_rows, write_jsonl


@pytest.fixture(scope="session")
def infer_env(tmp_path_factory):
    """A tiny saved Llama base, two random adapters for it, and a small held-out file."""
    from transformers import AutoModelForCausalLM

    from loraforge import LoraConfig, get_lora_model

    root = tmp_path_factory.mktemp("infer_env")
    base = make_base(root / "base")
    adapters = []
    for i, targets in enumerate((["q_proj", "v_proj"], ["up_proj", "down_proj"])):
        model = AutoModelForCausalLM.from_pretrained(base)
        # Random A and B (not the usual zero B) so each adapter visibly changes the model.
        lora = get_lora_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        )
        lora.save_pretrained(root / f"adapter{i}")
        adapters.append(root / f"adapter{i}")
    heldout = write_jsonl(root / "heldout.jsonl", task_rows(6))
    return {"base": base, "adapters": adapters, "heldout": heldout}
