"""The Lilypad modules' contract, without Docker: the module template, rendered as Lilypad renders it
(Go text/template), gives a Bacalhau Docker job whose entrypoint is `loraforge run`; run here on a
directory laid out as /inputs, it writes /outputs whose CID equals the same job run locally."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from loraforge.cli import main
from loraforge.jobs.cid import cid_of
from loraforge.jobs.runner import run_job

ROOT = Path(__file__).resolve().parents[2]
STYLE = ROOT / "src" / "loraforge" / "examples" / "style"


def js(text: str) -> str:
    """Go's template `js` function (JSEscapeString)."""
    out = {
        "\\": "\\\\",
        "'": "\\'",
        '"': '\\"',
        "<": "\\u003C",
        ">": "\\u003E",
        "&": "\\u0026",
        "=": "\\u003D",
    }
    return "".join(out.get(c, c) for c in text)


def render(template: str, values: dict[str, str]) -> str:
    """As Lilypad renders a module: Go text/template with each input JSON-encoded (inputs are strings).
    The forms the modules use: {{ .X }} and {{ if .X }}{{ .X }}{{ else }}"default"{{ end }}."""

    def cond(m):
        return json.dumps(values[m[1]]) if values.get(m[1]) else m[2]

    text = re.sub(r"\{\{ if \.(\w+) \}\}\{\{ \.\1 \}\}\{\{ else \}\}(.*?)\{\{ end \}\}", cond, template)
    text = re.sub(r"\{\{ \.(\w+) \}\}", lambda m: json.dumps(values[m[1]]), text)
    assert "{{" not in text
    return text


def job_spec(module: str, values: dict[str, str], digest: str = "0" * 64) -> dict:
    template = (ROOT / "lilypad" / module / "lilypad_module.json.tmpl").read_text()
    spec = json.loads(render(template.replace("${LORAFORGE_IMAGE_DIGEST}", digest), values))
    return spec


def entrypoint_run(spec: dict, inputs: Path, outputs: Path) -> int:
    docker = spec["job"]["Spec"]["Docker"]
    mounts = {m["path"]: m for m in spec["job"]["Spec"]["inputs"] + spec["job"]["Spec"]["outputs"]}
    assert set(mounts) == {"/inputs", "/outputs"}
    argv = docker["Entrypoint"]
    assert argv[:2] == ["loraforge", "run"]
    argv = [a.replace("/inputs", str(inputs)).replace("/outputs", str(outputs)) for a in argv]
    return main(argv[1:])


def test_templates_pin_the_image_by_digest():
    for module in ("lora-training", "lora-inference"):
        raw = (ROOT / "lilypad" / module / "lilypad_module.json.tmpl").read_text()
        assert "@sha256:${LORAFORGE_IMAGE_DIGEST}" in raw
        spec = job_spec(module, {"ImagesCID": "Qm1", "LoraCID": "Qm2", "Prompt": "x"}, "ab" * 32)
        assert re.fullmatch(r"[\w./-]+@sha256:[0-9a-f]{64}", spec["job"]["Spec"]["Docker"]["Image"])
        assert spec["job"]["Spec"]["Network"]["Type"] == "None"


def test_entrypoint_gives_the_local_runs_cid(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "home"))
    # Lilypad's convention: the images CID holds images.zip.
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    with zipfile.ZipFile(inputs / "images.zip", "w") as z:
        for path in sorted(STYLE.glob("0[0-3]_*")):
            z.write(path, path.name)
    values = {"ImagesCID": "unused", "Seed": "3", "Base": "tiny-sd", "Steps": "2"}
    assert entrypoint_run(job_spec("lora-training", values), inputs, outputs) == 0
    local = run_job(
        "lora_training", {"images": str(inputs / "images.zip"), "seed": 3, "steps": 2}, quiet=True
    )
    assert cid_of(outputs) == local.result
    assert capsys.readouterr().out.strip() == local.result

    # The inference module reads that result mounted at /inputs.
    lora_inputs, image_outputs = tmp_path / "lora_inputs", tmp_path / "image_outputs"
    shutil.copytree(outputs, lora_inputs)
    image_outputs.mkdir()
    prompt = "a circle in the style of <s1><s2>"
    values = {"LoraCID": local.result, "Prompt": prompt, "Seed": "3", "Steps": "2"}
    assert entrypoint_run(job_spec("lora-inference", values), lora_inputs, image_outputs) == 0
    params = {"lora": local.result, "prompt": prompt, "seed": 3, "steps": 2}
    assert cid_of(image_outputs) == run_job("lora_inference", params, quiet=True).result
    assert (image_outputs / "images" / "3.png").is_file()


@pytest.mark.parametrize("prompt", ['say "hi" & it\'s <s1>=x \\ {a: b}', "3"])
def test_prompt_survives_the_template(prompt):
    from loraforge.jobs.modules import MODULES, parse_assignments

    argv = job_spec("lora-inference", {"LoraCID": "Qm", "Prompt": prompt})["job"]["Spec"]["Docker"][
        "Entrypoint"
    ]
    i = argv.index("prompt")
    assert argv[i - 1 : i + 2] == ["--param", "prompt", prompt]
    assert parse_assignments(MODULES["lora_inference"], [f"prompt={prompt}"]) == {"prompt": prompt}
