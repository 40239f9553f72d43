"""The formats registry: one detection for every format (directories and single files), `describe`
for each, and a formats package whose modules import each other without cycles."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_llama

import loraforge.formats
from loraforge import LoraConfig, get_lora_model
from loraforge.errors import NotFound, UserError
from loraforge.formats import FORMATS, describe, detect_format
from loraforge.formats.diffusers import EMBEDS_NAME, save_diffusers, save_embeddings
from loraforge.formats.image_lora import ImageLora, ModuleLora
from loraforge.formats.kohya import save_kohya

FORMATS_DIR = Path(loraforge.formats.__file__).parent


def _image_lora():
    def module(r=2, n=8):
        return ModuleLora(torch.randn(r, n), torch.randn(n, r), float(r))

    return ImageLora(
        components={
            "unet": {"down_blocks.0.attn1.to_q": module(), "down_blocks.0.attn1.to_out.0": module()},
            "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": module()},
        }
    )


def _cloneofsimo_file(path):
    """Two UNet modules (ranks 2 and 4), one text-encoder module, two learned tokens."""
    tensors = {
        "unet:0:up": torch.randn(8, 2).half(),
        "unet:0:down": torch.randn(2, 6).half(),
        "unet:1:up": torch.randn(8, 4).half(),
        "unet:1:down": torch.randn(4, 8).half(),
        "text_encoder:0:up": torch.randn(8, 2).half(),
        "text_encoder:0:down": torch.randn(2, 8).half(),
        "<s1>": torch.randn(8),
        "<s2>": torch.randn(8),
    }
    meta = {
        "unet": json.dumps(["CrossAttention", "Attention", "GEGLU"]),
        "text_encoder": json.dumps(["CLIPAttention"]),
        "unet:0:rank": "2",
        "unet:1:rank": "4",
        "text_encoder:0:rank": "2",
        "<s1>": "<embed>",
        "<s2>": "<embed>",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=meta)
    return path


@pytest.fixture
def adapters(tmp_path):
    """One adapter per format, each as a directory; returns format -> (directory, weights file)."""
    out = {}
    peft_dir = tmp_path / "peft"
    get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(peft_dir)
    out["peft"] = (peft_dir, peft_dir / "adapter_model.safetensors")
    diffusers_dir = tmp_path / "diffusers"
    out["diffusers"] = (diffusers_dir, save_diffusers(diffusers_dir, _image_lora()))
    kohya_dir = tmp_path / "kohya"
    kohya_dir.mkdir()
    out["kohya"] = (kohya_dir, save_kohya(kohya_dir / "style.safetensors", _image_lora()))
    clone_dir = tmp_path / "cloneofsimo"
    out["cloneofsimo"] = (clone_dir, _cloneofsimo_file(clone_dir / "final_lora.safetensors"))
    return out


def test_registry_lists_the_four_formats():
    assert set(FORMATS) == {"peft", "diffusers", "kohya", "cloneofsimo"}
    assert {n: f.kind for n, f in FORMATS.items()} == {
        "peft": "text",
        "diffusers": "image",
        "kohya": "image",
        "cloneofsimo": "image",
    }
    assert all(f.read is not None for f in FORMATS.values())
    assert FORMATS["cloneofsimo"].write is None  # read only
    assert all(FORMATS[n].write is not None for n in ("peft", "diffusers", "kohya"))


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya", "cloneofsimo"])
def test_detect_format_directory_file_and_lone_file(adapters, fmt, tmp_path):
    directory, weights = adapters[fmt]
    assert detect_format(directory) == fmt
    assert detect_format(str(weights)) == fmt
    # The weights file alone, renamed, away from its side files: the keys alone decide.
    lone = tmp_path / "elsewhere" / "renamed.safetensors"
    lone.parent.mkdir()
    shutil.copyfile(weights, lone)
    assert detect_format(lone) == fmt


def test_detect_format_tokens_only_directory_is_diffusers(tmp_path):
    save_embeddings(tmp_path / EMBEDS_NAME, ["<s1>"], {"text_encoder": torch.randn(1, 8)})
    assert detect_format(tmp_path) == "diffusers"


def test_detect_format_errors_name_what_was_found(tmp_path):
    with pytest.raises(NotFound, match="not found"):
        detect_format(tmp_path / "missing.safetensors")
    with pytest.raises(NotFound, match="no adapter"):
        detect_format(tmp_path)  # an empty directory

    save_file(
        {"encoder.weight": torch.zeros(2, 2), "encoder.norm": torch.zeros(2)}, tmp_path / "model.safetensors"
    )
    with pytest.raises(UserError, match=r"not a LoRA adapter.*'encoder\.weight'") as e:
        detect_format(tmp_path / "model.safetensors")
    assert not isinstance(e.value, NotFound)

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"\.safetensors"):
        detect_format(tmp_path / "notes.txt")

    save_kohya(tmp_path / "second.safetensors", _image_lora())
    with pytest.raises(UserError, match="several adapter files"):
        detect_format(tmp_path)

    (tmp_path / "broken.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        detect_format(tmp_path / "broken.safetensors")


def test_read_image_lora_refuses_a_peft_adapter(adapters):
    with pytest.raises(UserError, match="PEFT adapter for a single model"):
        loraforge.formats.read_image_lora(adapters["peft"][0], {})


def test_describe_cloneofsimo_file(tmp_path):
    path = _cloneofsimo_file(tmp_path / "final_lora.safetensors")
    info = describe(path)
    assert info["format"] == "cloneofsimo" and info["path"] == str(path)
    assert info["rank"] == [2, 4] and info["lora_alpha"] == [2.0, 4.0]  # the up matrices carry the scale
    assert info["adapted_modules"] == 3
    assert info["targets"] == ["Attention", "CLIPAttention", "CrossAttention", "GEGLU"]
    assert info["learned_tokens"] == ["<s1>", "<s2>"]
    assert info["parameters"] == (8 * 2 + 2 * 6) + (8 * 4 + 4 * 8) + (8 * 2 + 2 * 8)  # tokens not counted
    assert info["dtypes"] == ["F16", "F32"]
    assert describe(tmp_path) == info  # its directory


def test_describe_every_format_has_the_same_keys(adapters):
    keys = None
    for fmt, (directory, _) in adapters.items():
        info = describe(directory)
        assert info["format"] == fmt
        keys = keys or set(info)
        assert set(info) == keys


# -- the package's structure -----------------------------------------------------------------------


def _formats_imports() -> dict[str, set[str]]:
    """Module name -> the loraforge.formats modules it imports (anywhere in it, lazily or not)."""
    modules = {p.stem: p for p in FORMATS_DIR.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target == "loraforge.formats":
                    edges.add("__init__")
                elif target.startswith("loraforge.formats."):
                    edges.add(target.split(".")[2])
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def test_formats_package_has_no_import_cycle():
    graph = _formats_imports()
    assert {"__init__", "io", "image_lora", "peft", "diffusers", "kohya", "cloneofsimo"} <= set(graph)
    for name in graph:
        if name != "__init__":
            assert "__init__" not in graph[name], f"{name} imports the registry"
    for name in ("kohya", "cloneofsimo"):
        assert graph[name] <= {"io", "image_lora"}, (name, graph[name])
    assert graph["image_lora"] <= {"io"} and graph["io"] == set()

    done, active = set(), []

    def visit(name):
        if name in active:
            raise AssertionError(f"import cycle: {' -> '.join([*active[active.index(name) :], name])}")
        if name in done:
            return
        active.append(name)
        for other in sorted(graph[name]):
            visit(other)
        active.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_each_formats_module_imports_alone():
    names = ["loraforge.formats"] + [f"loraforge.formats.{p.stem}" for p in sorted(FORMATS_DIR.glob("*.py"))]
    names.remove("loraforge.formats.__init__")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"import {name}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in names
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"import {name} failed:\n{out}"
