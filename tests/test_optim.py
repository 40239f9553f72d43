"""LoRA+ learning rates, as PEFT's create_loraplus_optimizer groups them; the 8-bit optimizer option."""

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.optimizers import create_loraplus_optimizer as peft_loraplus
from tiny_models import tiny_llama

from loraforge import LoraConfig, UserError, create_loraplus_optimizer, get_lora_model
from loraforge.optim import loraplus_groups, make_optimizer


def lr_by_shape(optimizer) -> list[tuple[tuple, float]]:
    return sorted((tuple(p.shape), g["lr"]) for g in optimizer.param_groups for p in g["params"])


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "embed_tokens"]])
def test_loraplus_learning_rates_match_peft(targets):
    config = dict(r=4, lora_alpha=8, target_modules=targets)
    theirs = peft_loraplus(
        get_peft_model(tiny_llama(), PeftLoraConfig(**config)),
        torch.optim.AdamW,
        lr=1e-3,
        loraplus_lr_ratio=16,
    )
    ours = create_loraplus_optimizer(
        get_lora_model(tiny_llama(), LoraConfig(**config)), torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16
    )
    assert lr_by_shape(ours) == lr_by_shape(theirs)
    assert {lr for _, lr in lr_by_shape(ours)} >= {1e-3, 16e-3}


def test_loraplus_keeps_a_groups_own_rate_and_refuses_a_bad_ratio():
    model = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = loraplus_groups(model, [{"params": params, "lr": 2e-4}], 1e-3, 8)
    assert sorted(g["lr"] for g in groups) == [2e-4, 16e-4]
    with pytest.raises(UserError, match="loraplus_lr_ratio"):
        loraplus_groups(model, [{"params": params}], 1e-3, 0)
    with pytest.raises(UserError, match="optimizer 'sgd'"):
        make_optimizer("sgd", [{"params": params}], 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fused", "foreach"])
def test_adamw_state_made_up_front_trains_exactly_as_lazy_state(dtype):
    torch.manual_seed(0)
    start = [torch.randn(5, 3, dtype=dtype), torch.randn(7, dtype=dtype)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    runs = []
    for build in (make_optimizer, None):
        params = [p.clone().requires_grad_() for p in start]
        groups = [{"params": params[:1]}, {"params": params[1:], "lr": 3e-3}]
        if build is None:
            optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, fused=dtype == torch.float32)
            assert not optimizer.state
        else:
            optimizer = build("adamw", groups, 1e-2, weight_decay=0.1)
            # the moments exist before the first step, as zeros, at step 0
            assert all(float(optimizer.state[p]["step"]) == 0 for p in params)
            assert all(not optimizer.state[p]["exp_avg_sq"].any() for p in params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        runs.append(([p.detach() for p in params], optimizer.state_dict()["state"]))
    (ours, our_state), (lazy, lazy_state) = runs
    for a, b in zip(ours, lazy):
        assert torch.equal(a, b)
    for i in lazy_state:
        assert float(our_state[i]["step"]) == float(lazy_state[i]["step"]) == 3
        assert torch.equal(our_state[i]["exp_avg"], lazy_state[i]["exp_avg"])
