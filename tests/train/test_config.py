import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from loraforge.train.config import (
    TextTrainConfig,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    example_yaml,
    field_docs,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]


def _parse(argv, cls=TextTrainConfig):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(argv))


def test_every_field_is_documented():
    for cls in (TrainConfig, TextTrainConfig):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.001\nlerning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config key 'lerning_rate'.*did you mean 'learning_rate'"):
        load_config(TextTrainConfig, path)
    with pytest.raises(ValueError, match="unknown config key 'bogus'"):
        load_config(TextTrainConfig, overrides={"bogus": "1"})


@pytest.mark.parametrize(
    "text, key",
    [
        ("batch_size: eight", "batch_size"),
        ("batch_size: 2.5", "batch_size"),
        ("packing: 3", "packing"),
        ("learning_rate: [1]", "learning_rate"),
        ("schedule: exponential", "schedule"),
        ("target_modules: 5", "target_modules"),
        ("sample_prompts: hello", "sample_prompts"),
    ],
)
def test_wrong_type_is_an_error_naming_the_key(tmp_path, text, key):
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=rf"config key '{key}'"):
        load_config(TextTrainConfig, path)


def test_value_checks_name_the_key():
    with pytest.raises(ValueError, match="config key 'batch_size': must be > 0"):
        load_config(TextTrainConfig, overrides={"batch_size": 0})
    with pytest.raises(ValueError, match="config key 'lora_dropout'"):
        load_config(TextTrainConfig, overrides={"lora_dropout": "1.5"})
    with pytest.raises(ValueError, match="must be a YAML mapping|must hold a mapping"):
        bad = Path(__file__).parent / "__not_a_mapping.yaml"
        try:
            bad.write_text("- a\n- b\n")
            load_config(TextTrainConfig, bad)
        finally:
            bad.unlink()


def test_precedence_defaults_yaml_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.002\nbatch_size: 4\nmax_steps: 30\ntarget_modules: [q_proj, v_proj]\n")
    config = _parse(["--config", str(path), "--batch_size", "2", "--max-steps", "7", "--packing"])
    assert config.learning_rate == 0.002  # YAML over default
    assert config.batch_size == 2 and config.max_steps == 7  # flags over YAML (both spellings)
    assert config.packing is True  # bare boolean flag
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.seed == TextTrainConfig.seed  # untouched default
    config = _parse(
        [
            "--packing",
            "false",
            "--target_modules",
            "q_proj,k_proj",
            "--resume",
            "latest",
            "--learning_rate",
            "3e-4",
        ]
    )
    assert config.packing is False and config.target_modules == ["q_proj", "k_proj"]
    assert config.resume == "latest" and config.learning_rate == 3e-4
    config = _parse(["--target_modules", "all-linear", "--sample_prompts", "a, b", "--sample-prompts", "c"])
    assert config.target_modules == "all-linear" and config.sample_prompts == ["a, b", "c"]
    assert _parse(["--target_modules", "q_proj"]).target_modules == ["q_proj"]
    assert _parse(["--target_modules", r".*\.q_proj"]).target_modules == r".*\.q_proj"


def test_help_comes_from_docstrings():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TextTrainConfig)
    text = parser.format_help()
    assert "Peak learning rate of AdamW" in text
    assert "Pack several short examples" in text


def test_example_yaml_round_trips_to_defaults(tmp_path):
    text = example_yaml(TextTrainConfig)
    assert "# Peak learning rate of AdamW" in text
    path = tmp_path / "example.yaml"
    path.write_text(text)
    assert yaml.safe_load(text).keys() == {f.name for f in dataclasses.fields(TextTrainConfig)}
    assert load_config(TextTrainConfig, path) == TextTrainConfig()


def test_shipped_example_config_is_current():
    shipped = ROOT / "examples" / "train_text.yaml"
    assert shipped.read_text() == example_yaml(TextTrainConfig), (
        "examples/train_text.yaml is stale: regenerate with "
        "python -c 'from loraforge.train.config import *; print(example_yaml(TextTrainConfig), end=\"\")' > examples/train_text.yaml"
    )
