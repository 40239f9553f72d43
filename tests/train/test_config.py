import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from loraforge.errors import ConfigError
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


# -- the LoRA section --------------------------------------------------------------------------------


def test_nested_lora_and_the_old_flat_keys_give_the_same_config(tmp_path):
    from loraforge.config import LoraConfig

    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yaml"
    nested.write_text("lora: {r: 4, lora_alpha: 8, lora_dropout: 0.1, target_modules: [q_proj, v_proj]}\n")
    flat.write_text("lora_r: 4\nlora_alpha: 8\nlora_dropout: 0.1\ntarget_modules: [q_proj, v_proj]\n")
    a, b = load_config(TextTrainConfig, nested), load_config(TextTrainConfig, flat)
    assert a == b
    assert a.lora == LoraConfig(
        r=4,
        lora_alpha=8.0,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
    )
    # The flat names stay readable (and settable) as attributes.
    assert (a.lora_r, a.lora_alpha, a.lora_dropout, a.target_modules) == (4, 8.0, 0.1, ["q_proj", "v_proj"])
    # The same through the command line: nested flags, the old flags, both spellings.
    for argv in (
        [
            "--lora.r",
            "4",
            "--lora.lora_alpha",
            "8",
            "--lora.lora-dropout",
            "0.1",
            "--lora.target_modules",
            "q_proj,v_proj",
        ],
        ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--target-modules", "q_proj,v_proj"],
        ["--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1", "--target_modules", "q_proj,v_proj"],
    ):
        assert _parse(argv) == a, argv
    # Overrides in any of the three forms; a flag over a YAML key of the other form.
    assert load_config(TextTrainConfig, flat, overrides={"lora.r": "16"}).lora.r == 16
    assert load_config(TextTrainConfig, nested, overrides={"lora_r": 16}).lora.r == 16
    assert (
        load_config(TextTrainConfig, overrides={"lora": {"r": 16}}).lora.lora_alpha == 16.0
    )  # defaults kept
    # Defaults per command: text alpha 16, image alpha 8; target_modules None = the task's default.
    from loraforge.train.image import ImageTrainConfig

    assert (TextTrainConfig().lora.r, TextTrainConfig().lora.lora_alpha) == (8, 16.0)
    assert ImageTrainConfig().lora.lora_alpha == 8.0 and ImageTrainConfig().lora.target_modules is None


def test_lora_section_errors_name_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    cases = [
        ("lora: {rank: 4}", "unknown config key 'lora.rank'"),
        (
            "lora: {r: 4, lora_alfa: 3}",
            r"unknown config key 'lora.lora_alfa'.*did you mean 'lora.lora_alpha'",
        ),
        ("lora: {r: four}", "config key 'lora.r'"),
        ("lora: {r: 0}", "config key 'lora.r': must be a positive integer"),
        ("lora: {lora_dropout: 1.5}", "config key 'lora.lora_dropout'"),
        ("lora: {bias: some}", "config key 'lora.bias'"),
        ("lora: {task_type: CAUSAL_LM}", "config key 'lora.task_type'.*sets it"),
        ("lora: 8", "config key 'lora'.*mapping"),
        ("lora_r: 4\nlora: {r: 8}", "'lora_r' and 'lora.r'.*both set"),
        ("lora_rank: 4", r"unknown config key 'lora_rank'.*did you mean 'lora_r'"),
    ]
    for text, message in cases:
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match=message):
            load_config(TextTrainConfig, path)
    with pytest.raises(ConfigError, match="unknown config key 'lora.rank'"):
        load_config(TextTrainConfig, overrides={"lora.rank": "4"})
    with pytest.raises(SystemExit):  # argparse: no such flag
        _parse(["--lora.rank", "4"])


def test_other_lora_fields_from_yaml_and_flags(tmp_path):
    config = _parse(
        [
            "--lora.rank-pattern",
            "{q_proj: 16}",
            "--lora.layers_to_transform",
            "0,1",
            "--lora.use-rslora",
            "--lora.init-lora-weights",
            "gaussian",
            "--lora.exclude-modules",
            "o_proj",
        ]
    )
    lora = config.lora
    assert lora.rank_pattern == {"q_proj": 16} and lora.layers_to_transform == [0, 1]
    assert (
        lora.use_rslora is True
        and lora.init_lora_weights == "gaussian"
        and lora.exclude_modules == ["o_proj"]
    )


def test_python_configs_are_validated():
    from loraforge.config import LoraConfig

    config = TextTrainConfig(max_steps=20, lora=LoraConfig(r=4, lora_alpha=8))
    config.validate()
    assert config.lora.r == 4
    with pytest.raises(ConfigError, match="config key 'max_steps': expected an integer"):
        TextTrainConfig(max_steps="many").validate()
    with pytest.raises(ConfigError, match="config key 'lora'"):
        TextTrainConfig(lora=8).validate()
    bad = TextTrainConfig()
    bad.lora.r = -1  # changed after LoraConfig checked it
    with pytest.raises(ConfigError, match="config key 'lora.r'"):
        bad.validate()
    config = TextTrainConfig(lora={"r": 2, "target_modules": ["all-linear"]})
    config.validate()
    assert config.lora.r == 2 and config.lora.target_modules == "all-linear"


def test_saved_config_nests_lora_and_an_old_flat_one_still_loads(tmp_path):
    from loraforge.train.config import save_config

    config = load_config(TextTrainConfig, overrides={"lora_r": 4, "target_modules": "q_proj,v_proj"})
    path = tmp_path / "train_config.yaml"
    save_config(config, path)
    saved = yaml.safe_load(path.read_text())
    assert saved["lora"]["r"] == 4 and saved["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert not {"lora_r", "lora_alpha", "lora_dropout", "target_modules"} & saved.keys()
    assert "task_type" not in saved["lora"]  # the task fills that in
    assert load_config(TextTrainConfig, path) == config
    # What earlier versions saved: the four flat keys.
    old = {k: v for k, v in saved.items() if k != "lora"}
    old.update(lora_r=4, lora_alpha=16.0, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    path.write_text(yaml.safe_dump(old))
    assert load_config(TextTrainConfig, path) == config


def test_lora_fields_are_documented_in_help_and_example():
    from loraforge.train.config import lora_docs, lora_field_names

    docs = lora_docs(TextTrainConfig)
    assert all(docs.get(name) for name in lora_field_names())
    assert docs["r"] == "Rank of the update B·A."  # LoraConfig's own text, without its "Default 8."
    text = example_yaml(TextTrainConfig)
    assert "\nlora:\n  # Rank of the update B·A.\n  r: 8\n" in text
    assert "  # Names, suffixes or a regex of modules never to adapt.\n  exclude_modules: null\n" in text
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TextTrainConfig)
    assert "Scale numerator: the update is multiplied by" in parser.format_help()


def test_shipped_image_example_config_is_current():
    from loraforge.train.image import ImageTrainConfig

    shipped = ROOT / "examples" / "train_image.yaml"
    assert shipped.read_text() == example_yaml(ImageTrainConfig), (
        "examples/train_image.yaml is stale: regenerate with python -c 'from loraforge.train.config import "
        "example_yaml; from loraforge.train.image import ImageTrainConfig; "
        'print(example_yaml(ImageTrainConfig), end="")\' > examples/train_image.yaml'
    )
    assert "UNet modules that get LoRA" in shipped.read_text()


# -- the command line --------------------------------------------------------------------------------


def _sample_value(tp) -> str:
    import typing

    if tp is bool:
        return "true"
    if typing.get_origin(tp) is typing.Literal:
        return str(typing.get_args(tp)[0])
    return "1"


@pytest.mark.parametrize("command", ["text", "image"])
def test_every_flag_takes_dashes_and_underscores(command):
    import typing

    from loraforge.train.image import ImageTrainConfig

    cls = TextTrainConfig if command == "text" else ImageTrainConfig
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "lora":
            continue
        for flag in {f"--{f.name}", f"--{f.name.replace('_', '-')}"}:
            args = parser.parse_args([flag, _sample_value(hints[f.name])])
            assert f.name in vars(args), flag
    for flag in ("--out", "--output-dir", "--output_dir"):
        assert parser.parse_args([flag, "d"]).output_dir == "d"
    for flag in ("--lora-r", "--lora_r", "--lora.r"):
        assert vars(parser.parse_args([flag, "3"]))["lora.r"] == "3"
    for flag in ("--lora.use-rslora", "--lora.use_rslora"):
        assert vars(parser.parse_args([flag]))["lora.use_rslora"] == "true"


def test_image_help_talks_only_of_images(capsys):
    from loraforge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train-image", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--out DIR" in text and "--lora-r" in text and "--lora.rank-pattern" in text
    assert "tokens/s" not in text and "held-out" not in text.lower() and "token-weighted" not in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "tokens/s" in text and "held-out loss" in text  # the text command keeps its wording
