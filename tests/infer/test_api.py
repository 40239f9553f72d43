"""The Python API the command line is built on: `generate_text`, `load_text`, and the runtime's rules."""

import pytest
import torch

from loraforge import generate_text, load_text
from loraforge.errors import ConfigError, NotFound, UserError
from loraforge.runtime import AdapterSpec, adapter_name, choose_base, parse_adapter_spec


def test_generate_text_matches_the_command_line(infer_env, capsys):
    from loraforge.cli import main

    a, b = infer_env["adapters"]
    texts = generate_text(
        ["hello", "the dog"],
        base=str(infer_env["base"]),
        adapters=[f"{a}:0.7", AdapterSpec(str(b), 0.3)],
        greedy=True,
        max_new_tokens=4,
    )
    assert len(texts) == 2
    argv = ["generate", "--base", str(infer_env["base"]), "--adapter", f"{a}:0.7", "--adapter", f"{b}:0.3"]
    assert main([*argv, "--greedy", "--max-new-tokens", "4", "--prompt", "the dog", "--no-stream"]) == 0
    assert capsys.readouterr().out.strip() == texts[1].strip()


def test_generate_text_is_seeded_per_prompt(infer_env):
    kwargs = dict(base=str(infer_env["base"]), adapters=[infer_env["adapters"][0]], max_new_tokens=6, seed=3)
    alone = generate_text("the dog", **kwargs)
    after_another = generate_text(["hello", "the dog"], **kwargs)
    assert after_another[1] == alone[0]


def test_generate_text_checks_settings_before_loading(infer_env, monkeypatch):
    import loraforge.infer.text as infer_text

    monkeypatch.setattr(infer_text, "load_text", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match="top_p"):
        generate_text("x", base=str(infer_env["base"]), top_p=1.5)
    with pytest.raises(UserError, match="at least one prompt"):
        generate_text([], base=str(infer_env["base"]))


def test_load_text_names_adapters_by_position_and_sets_weights(infer_env):
    a, b = infer_env["adapters"]
    rt = load_text(str(infer_env["base"]), [f"{a}:0.5", f"{b}:-1"])
    assert [name for name, _ in rt.adapters] == [adapter_name(0), adapter_name(1)] == ["adapter0", "adapter1"]
    layer = rt.model.lora_layers()[0]
    assert dict(layer.active) == {"adapter0": 0.5} or dict(layer.active) == {"adapter1": -1.0}
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        mixed = rt.model(input_ids=ids).logits
        with rt.model.disable_adapter():
            bare = rt.model(input_ids=ids).logits
    assert (mixed - bare).abs().max() > 1e-4


def test_load_text_accepts_the_weights_file_of_an_adapter(infer_env):
    a, _ = infer_env["adapters"]
    from_dir = load_text(str(infer_env["base"]), [a])
    from_file = load_text(str(infer_env["base"]), [a / "adapter_model.safetensors"])
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(from_dir.model(input_ids=ids).logits, from_file.model(input_ids=ids).logits)


def test_image_adapter_given_to_a_text_command_points_to_generate_image(infer_env, tmp_path):
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="generate-image"):
        load_text(str(infer_env["base"]), [tmp_path])


def test_base_choice_rule(infer_env, tmp_path):
    a, _ = infer_env["adapters"]
    recorded = choose_base(None, [parse_adapter_spec(str(a))], "tiny-llama")
    assert recorded == load_text(adapters=[a]).base  # what every command loads
    assert choose_base("explicit", [parse_adapter_spec(str(a))], "tiny-llama") == "explicit"
    (tmp_path / "adapter_config.json").write_text("{}")  # records nothing
    assert choose_base(None, [parse_adapter_spec(str(tmp_path))], "tiny-llama") == "tiny-llama"
    with pytest.raises(NotFound, match="adapter not found"):
        choose_base(None, [parse_adapter_spec(str(tmp_path / "missing"))], "tiny-llama")


def test_eval_text_shows_its_own_progress(infer_env, capsys):
    from loraforge.cli import main

    argv = ["eval-text", "--base", str(infer_env["base"]), "--adapter", str(infer_env["adapters"][0])]
    assert main([*argv, "--data", str(infer_env["heldout"]), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "with adapter" in err and "bare base" in err and "6/6" in err and "prompt/s" in err
