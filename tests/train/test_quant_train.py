"""QLoRA end to end on CPU: train on the embedded tiny-llama quantized to 4 bits and to 8 bits, see the
held-out loss fall, then load the adapter on the full-precision base."""

import warnings

import pytest
import torch

from loraforge import TextTrainConfig, train_text
from loraforge.data.text import scan_text_file
from loraforge.runtime import load_text, load_text_model
from loraforge.train.text import EXAMPLES_DIR, TextDataset, dataset_loss

pytest.importorskip("bitsandbytes")


def heldout_loss(model, tokenizer) -> float:
    data = TextDataset(
        scan_text_file(EXAMPLES_DIR / "heldout.jsonl"), tokenizer, 256, "completion", False, 0, True
    )
    with torch.no_grad():
        return dataset_loss(model, data, 16)


@pytest.mark.parametrize(
    "quantize, optimizer", [("nf4", "adamw"), ("int8", "adamw8bit")], ids=["nf4", "int8-adamw8bit"]
)
def test_train_on_quantized_base_then_load_on_full_precision(quantize, optimizer, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_text(
            TextTrainConfig(
                output_dir=str(tmp_path / "run"),
                quantize=quantize,
                optimizer=optimizer,
                loraplus_lr_ratio=4.0,
                max_steps=12,
                warmup_steps=2,
                batch_size=8,
                eval_every=12,  # before training and at the end
                save_every=0,
                sample_max_new_tokens=2,
                threads=1,
                progress_bar=False,
                tensorboard=False,
            )
        )
    # The evaluation before training must not switch bitsandbytes to its inference kernel, through
    # which no gradient would flow (autograd warns when it backpropagates into such a kernel).
    assert not [w for w in caught if "backprop through it" in str(w.message)]
    assert f"linear layers quantized {quantize}" in capsys.readouterr().out
    evals = [row["eval_loss"] for row in result.history if row["eval_loss"] is not None]
    assert len(evals) == 2 and evals[-1] < evals[0] - 0.3, evals

    # The adapter is a plain PEFT adapter: it loads on the full-precision base and helps there too.
    base, tokenizer = load_text_model("tiny-llama")
    before = heldout_loss(base.eval(), tokenizer)
    rt = load_text(adapters=[str(result.adapter_dir)])
    assert not any("bitsandbytes" in type(m).__module__ for m in rt.model.modules())
    after = heldout_loss(rt.model, rt.tokenizer)
    assert after < before - 0.3, (before, after)
