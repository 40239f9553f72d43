"""causal_lm_loss: the positions it skips must not change the loss or any gradient."""

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

import loraforge.train.text as text
from loraforge import LoraConfig, get_lora_model
from loraforge.data.text import IGNORE


def _batch(vocab: int):
    # Two right-padded rows; the loss covers a "completion" at a different place in each.
    ids = torch.randint(4, vocab, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.clone()
    labels[0, :7] = IGNORE
    labels[1, :4] = IGNORE
    labels[1, 9:] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(lora, batch):
    lora.zero_grad(set_to_none=True)
    loss, n = text.causal_lm_loss(lora, batch)
    loss.backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in lora.named_parameters() if p.requires_grad}


def _seen_lengths(module, record: list):
    return module.register_forward_pre_hook(lambda m, args: record.append(args[0].shape[1]))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_last_layer_restricted_to_loss_positions_changes_no_gradient(build, monkeypatch):
    model = build()  # eval mode: GPT-2 dropout would draw different random masks for 8 and 12 positions
    lora = get_lora_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    lora._gated_mlps = []  # no fused MLP kernel, so the MLP's projections run as modules
    batch = _batch(model.config.vocab_size)
    parts = text.last_layer_positionwise_parts(lora)
    last = (model.model.layers if hasattr(model, "model") else model.transformer.h)[-1]
    expected = [last.mlp, last.self_attn.o_proj] if hasattr(last, "self_attn") else [last.mlp]
    assert parts == expected

    seen: list[int] = []
    # The MLP's output projection: what runs inside the MLP, after the restriction.
    hook = _seen_lengths(last.mlp.down_proj if hasattr(last.mlp, "down_proj") else last.mlp.c_proj, seen)
    loss, n, grads = _loss_and_grads(lora, batch)
    # Positions 3..10 predict a labelled token in some row: 8 of the 12 positions reach the MLP.
    assert seen == [8]
    monkeypatch.setattr(text, "last_layer_positionwise_parts", lambda m: [])
    seen.clear()
    full_loss, full_n, full_grads = _loss_and_grads(lora, batch)
    hook.remove()
    assert seen == [12] and n == full_n == 5 + 5
    torch.testing.assert_close(loss, full_loss)
    assert grads.keys() == full_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], full_grads[k], atol=1e-6, rtol=1e-5, msg=k)
    assert not last.mlp._forward_hooks and not last.mlp._forward_pre_hooks  # the restriction is gone


def test_gradient_checkpointing_runs_every_position():
    # Checkpointing recomputes the forward during backward, outside the restriction: shapes must match.
    model = tiny_llama().train()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    lora = get_lora_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    seen: list[int] = []
    _seen_lengths(model.model.layers[-1].mlp.down_proj, seen)
    loss, _, grads = _loss_and_grads(lora, _batch(128))
    assert seen and set(seen) == {12}
    assert torch.isfinite(loss) and all(g.abs().sum() > 0 for g in grads.values())


def test_fused_mlp_and_restriction_change_no_gradient(monkeypatch):
    # The default training loss (every MLP fused, last layer restricted) against the plain model.
    model = tiny_llama(layers=3)
    lora = get_lora_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = _batch(128)
    kernels = []
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda m, args, out: kernels.append(type(out.grad_fn).__name__))
    loss, n, grads = _loss_and_grads(lora, batch)
    assert lora._gated_mlps == [layer.mlp for layer in model.model.layers]
    assert kernels[-3:] == ["GatedMLPWithLoraBackward"] * 3  # (before: the no-grad check that found them)
    lora._gated_mlps = []
    monkeypatch.setattr(text, "last_layer_positionwise_parts", lambda m: [])
    plain_loss, _, plain_grads = _loss_and_grads(lora, batch)
    torch.testing.assert_close(loss, plain_loss)
    for k in grads:
        torch.testing.assert_close(grads[k], plain_grads[k], atol=1e-6, rtol=1e-5, msg=k)
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)  # patches undone


def _plain_loss(lora, batch):
    """The loss from the model's full logits, as transformers computes them (no chunked head)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = lora(**kwargs, use_cache=False).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    wanted = targets != IGNORE
    return torch.nn.functional.cross_entropy(logits[wanted].float(), targets[wanted])


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        dict(target_modules="all-linear"),
        dict(target_modules=["q_proj", "v_proj", "lm_head"]),  # an adapter on the head itself
        dict(target_modules="all-linear", modules_to_save=["lm_head"]),  # a trained copy of the head
    ],
    ids=["body", "lora-head", "trained-head"],
)
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_chunked_head_loss_equals_full_logits_loss(build, lora_kwargs, monkeypatch):
    model = build()
    lora = get_lora_model(model, LoraConfig(r=4, init_lora_weights=False, **lora_kwargs))
    lora._gated_mlps = []
    monkeypatch.setattr(text, "last_layer_positionwise_parts", lambda m: [])
    batch = _batch(model.config.vocab_size)
    # 3 positions' logits per chunk: the 10 labelled positions take 4 chunks.
    monkeypatch.setattr(text, "HEAD_CHUNK_BYTES", 3 * 4 * model.config.vocab_size)
    calls = []
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    loss, n, grads = _loss_and_grads(lora, batch)
    handle.remove()
    # the model's own call (recorded), then the chunks
    assert n == 10 and calls[1:] == [3, 3, 3, 1]
    assert all(g.abs().sum() > 0 for g in grads.values())

    lora.zero_grad(set_to_none=True)
    plain = _plain_loss(lora, batch)
    (plain * 0.5).backward()  # a scaled loss (gradient accumulation) scales every gradient
    torch.testing.assert_close(loss, plain.detach())
    assert grads.keys() == {k for k, p in lora.named_parameters() if p.requires_grad}
    for k, p in lora.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(0.5 * grads[k], p.grad, atol=1e-6, rtol=1e-5, msg=k)

    lora.zero_grad(set_to_none=True)
    loss, _ = text.causal_lm_loss(lora, batch)
    (loss * 0.5).backward()
    for k, p in lora.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(0.5 * grads[k], p.grad, atol=1e-6, rtol=1e-5, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(text.causal_lm_loss(lora, batch)[0], _plain_loss(lora, batch))
    assert "forward" not in head.__dict__  # the head is itself again
    assert lora(input_ids=batch["input_ids"]).logits.shape[-1] == model.config.vocab_size


def test_head_with_logit_processing_keeps_full_logits():
    # A model family not known to return its head's output as-is keeps the plain loss.
    model = tiny_llama()
    lora = get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert text._plain_head(lora) is model.lm_head
    model.config.model_type = "gemma2"  # final_logit_softcapping follows its head
    assert text._plain_head(lora) is None
    loss, n = text.causal_lm_loss(lora, _batch(128))
    assert n == 10 and torch.isfinite(loss)
