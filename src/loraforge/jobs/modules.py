"""The modules `loraforge run` knows, each with a declarative parameter table.

A module is a name, a version and a table of `Param`s (name, type, default, help, aliases); from that
one table come `loraforge run --list`, the checking of a job's parameters (unknown names and wrong
types are refused, naming the accepted ones) and the resolved parameters a job record holds.

    lora_training        images -> adapter (diffusers + cloneofsimo layouts), tokens, validation grid, metrics
    lora_inference       lora + prompt -> images/<seed>.png
    lora_training_text   data -> PEFT adapter, metrics
    lora_inference_text  lora + prompt -> completion.json

Parameters of type ``input`` (and each ``lora`` of a ``loras`` list) name content: a local path, or
the CID of an object in the store. The runner (`loraforge.jobs.runner`) adds local inputs to the store
and replaces them by their CIDs before the job runs, so a record names exactly what a job read, and
`verify` can run it again from the store alone.

What each module's `run` writes into the result directory is deterministic (no times, no host names,
no random state): the same parameters on the same machine give the same bytes, hence the same CID.
Times and throughput go to the record (the `timings` a module returns).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.errors import ConfigError, NotFound, UserError

REQUIRED = object()

TYPES = {
    "int": "integer",
    "float": "number",
    "str": "string",
    "bool": "true/false",
    "tokens": "list of strings, or one string split at '|'",
    "input": "path or CID",
    "loras": "path or CID, or a list of {lora, weight}",
}


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any
    help: str
    aliases: tuple[str, ...] = ()
    minimum: float | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe_default(self) -> str:
        if self.required:
            return "required"
        if self.default is None:
            return "-"
        return json.dumps(self.default)


@dataclass(frozen=True)
class Module:
    name: str
    version: str
    summary: str
    params: tuple[Param, ...]
    run: Callable = field(repr=False)
    """run(params, inputs, result_dir, scratch_dir) -> (metrics, timings): `params` resolved (inputs
    as CIDs), `inputs` the local paths of the input parameters."""
    check: Callable | None = field(default=None, repr=False)
    """check(params, inputs): the module's own checks of its inputs, before anything is written."""
    input_names: dict[str, str] = field(default_factory=dict)
    """How to name a file input when it is exported from the store (its suffix matters), by parameter."""
    complete: Callable | None = field(default=None, repr=False)
    """complete(params) -> params with the defaults that depend on other parameters filled in, so a
    record (and the result's job.json) shows the values used: `{seed: 3}` and `{seed: 3, steps: 1500}`
    are the same job."""

    @property
    def id(self) -> str:
        return f"{self.name}:{self.version}"

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if name == p.name or name in p.aliases:
                return p
        return None

    def accepted(self) -> str:
        return ", ".join(p.name for p in self.params)


# -- parameters ------------------------------------------------------------------------------------


def _type_error(param: Param, value) -> ConfigError:
    return ConfigError(
        f"parameter {param.name}: expected {TYPES[param.type]}, got {json.dumps(value)} ({type(value).__name__})"
    )


def _check_value(param: Param, value):
    """The value converted to the parameter's type; ConfigError naming the parameter otherwise."""
    kind = param.type
    if value is None:
        if param.default is None:
            return None
        raise _type_error(param, value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(param, value)
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(param, value)
        value = float(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise _type_error(param, value)
    elif kind in ("str", "input"):
        if not isinstance(value, str) or (kind == "input" and not value):
            raise _type_error(param, value)
    elif kind == "tokens":
        if isinstance(value, str):
            value = [t for t in value.split("|") if t]
        if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
            raise _type_error(param, value)
    elif kind == "loras":
        value = _loras(param, value)
    if param.minimum is not None and kind in ("int", "float") and value < param.minimum:
        raise ConfigError(f"parameter {param.name}: must be >= {param.minimum:g}, got {value}")
    return value


def _loras(param: Param, value) -> list[dict]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _type_error(param, value)
    out = []
    for item in items:
        if isinstance(item, str) and item:
            out.append({"lora": item, "weight": None})
            continue
        if not isinstance(item, dict):
            raise _type_error(param, value)
        unknown = set(item) - {"lora", "lora_cid", "weight"}
        if unknown:
            raise ConfigError(
                f"parameter {param.name}: unknown key {sorted(unknown)[0]!r}; use lora and weight"
            )
        source = item.get("lora", item.get("lora_cid"))
        weight = item.get("weight")
        if not isinstance(source, str) or not source:
            raise ConfigError(f"parameter {param.name}: each entry needs a lora (a path or CID)")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float)):
            raise ConfigError(f"parameter {param.name}: weight must be a number, got {json.dumps(weight)}")
        out.append({"lora": source, "weight": None if weight is None else float(weight)})
    return out


def resolve_params(module: Module, given: dict) -> dict:
    """The module's parameters: given values (by name or alias) checked and converted, defaults for the
    rest, in table order. ConfigError for an unknown or repeated name, a wrong type, a missing value."""
    if not isinstance(given, dict):
        raise ConfigError(f"parameters must be a mapping such as {{seed: 3}}, got {type(given).__name__}")
    values: dict[str, Any] = {}
    for key, value in given.items():
        param = module.param(str(key))
        if param is None:
            raise ConfigError(f"{module.name} has no parameter {key!r}; accepted: {module.accepted()}")
        if param.name in values:
            raise ConfigError(f"parameter {param.name} given twice (as {key!r} too)")
        values[param.name] = _check_value(param, value)
    out = {}
    for p in module.params:
        if p.name in values:
            out[p.name] = values[p.name]
        elif p.required:
            raise ConfigError(f"{module.name} needs the parameter {p.name} ({p.help})")
        else:
            out[p.name] = p.default
    return module.complete(out) if module.complete else out


def parse_params(text: str | None) -> dict:
    """A JSON object or a YAML flow mapping (``{seed: 3, images: "…"}``) -> dict."""
    import yaml

    if text is None or not text.strip():
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"malformed parameters{at}: {problem}; write a mapping such as '{{seed: 3}}'"
        ) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"parameters must be a mapping such as '{{seed: 3}}', got {text!r}")
    return value


def parse_assignments(module: Module, items: list[str]) -> dict:
    """``NAME=VALUE`` pairs (``--set``) -> parameters. A string or path parameter takes VALUE as it is
    (a prompt such as ``3 cats`` stays text); other types read VALUE as YAML (``seed=3``, ``greedy=true``)."""
    import yaml

    out = {}
    for item in items:
        name, eq, text = item.partition("=")
        if not eq or not name:
            raise ConfigError(f"--set {item!r}: write NAME=VALUE")
        param = module.param(name)
        if param is None:
            raise ConfigError(f"{module.name} has no parameter {name!r}; accepted: {module.accepted()}")
        if param.type in ("str", "input", "loras", "tokens"):
            out[name] = text
        else:
            try:
                out[name] = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError:
                out[name] = text  # reported as a wrong type, with the parameter's name
    return out


# -- helpers shared by the modules -----------------------------------------------------------------

TIME_COLUMNS = ("tokens_per_s", "elapsed_s")


def deterministic_metrics(csv_path: Path, dest: Path) -> list[dict]:
    """Copies metrics.csv without its time columns (they go to the record); returns the removed ones."""
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8"))) if csv_path.is_file() else []
    columns = [c for c in (rows[0].keys() if rows else []) if c not in TIME_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    dest.write_text(buffer.getvalue(), encoding="utf-8")
    return [
        {"step": r.get("step"), **{c: r[c] for c in TIME_COLUMNS if r.get(c)}}
        for r in rows
        if r.get("elapsed_s")
    ]


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _train_summary(result) -> tuple[dict, dict]:
    metrics = {"steps": result.steps, "train_loss": result.train_loss, "eval_loss": result.eval_loss}
    timings = {"train_s": round(result.elapsed_s, 3), "step_time_s": round(result.step_time_s, 3)}
    if result.step_time_s:
        timings["throughput_per_s"] = round(result.tokens / result.step_time_s, 3)
    return metrics, timings


# -- lora_training ---------------------------------------------------------------------------------

SD15_NAMES = (
    "runwayml/stable-diffusion-v1-5",
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd15",
    "sd-1.5",
)
# lora_diffusion's lora_pti adapts every nn.Linear under these classes; training exactly those layers
# makes final_lora.safetensors hold the whole adapter.
LORA_PTI_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"]
LORA_PTI_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def is_sd15(base: str) -> bool:
    return base.lower().rstrip("/") in SD15_NAMES or base.rstrip("/").endswith("stable-diffusion-v1-5")


def complete_training(params: dict) -> dict:
    """steps, rank and resolution from the recipe of the base (see image_train_config) when not given."""
    from loraforge.train.image import native_resolution

    p = dict(params)
    sd15 = is_sd15(p["base"])
    p["steps"] = p["steps"] or (2000 if sd15 else 1500)
    p["rank"] = p["rank"] or (1 if sd15 else 8)
    if not p["resolution"]:
        try:
            p["resolution"] = 512 if sd15 else native_resolution(p["base"])
        except Exception:  # noqa: BLE001 - an unreadable base is reported by the module's check
            pass
    return p


def image_train_config(params: dict, data: str | None, output_dir: str):
    """The ImageTrainConfig of a lora_training job: train-image's defaults on the embedded pipeline,
    Lilypad's lora_pti recipe when `base` names SD 1.5: 512 px, rank 1 on lora_pti's layers (UNet
    attention + GEGLU, text-encoder attention), lr 1e-4 / text 1e-5 / tokens 5e-4, batch 1 x 4,
    weight decay 1e-3, linear schedule, tokens <s1>|<s2>. lora_pti first learns the tokens alone
    (1000 steps) and then tunes LoRA with them (1000); loraforge's pivotal tuning learns both
    together, so the recipe is one phase of 2000 steps. No colour jitter."""
    from loraforge.config import LoraConfig
    from loraforge.train.image import ImageTrainConfig

    p = params
    common = dict(
        output_dir=output_dir,
        base=p["base"],
        data=data,
        seed=p["seed"],
        validation_seed=p["seed"],
        placeholder_tokens=list(p["placeholder_tokens"]),
        tensorboard=False,
        progress_bar=False,
        save_every=0,
        keep_last=1,
    )
    if is_sd15(p["base"]):
        rank = p["rank"] or 1
        return ImageTrainConfig(
            **common,
            max_steps=p["steps"] or 2000,
            resolution=p["resolution"] or 512,
            lora=LoraConfig(r=rank, lora_alpha=float(rank), target_modules=LORA_PTI_UNET_TARGETS),
            train_text_encoder=True,
            text_encoder_target_modules=LORA_PTI_TEXT_TARGETS,
            learning_rate=1e-4,
            text_encoder_learning_rate=1e-5,
            token_learning_rate=5e-4,
            batch_size=1,
            grad_accum=4,
            weight_decay=1e-3,
            schedule="linear",
            instance_prompt="a picture in the style of {tokens}",
        )
    rank = p["rank"] or 8
    return ImageTrainConfig(
        **common,
        max_steps=p["steps"] or 1500,
        resolution=p["resolution"] or 0,
        lora=LoraConfig(r=rank, lora_alpha=float(rank)),
    )


def images_source(path: Path) -> Path:
    """The training images of an `images` input: the folder or zip itself, or the one .zip of a folder
    that holds no image (Lilypad's convention: the images CID holds ``images.zip``)."""
    if path.is_dir():
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        zips = [p for p in entries if p.suffix.lower() == ".zip"]
        if len(zips) == 1 and not any(
            p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp") for p in entries
        ):
            return zips[0]
    return path


def check_training(params: dict, inputs: dict[str, Path]) -> None:
    from loraforge.train.image import load_data

    config = image_train_config(params, str(images_source(inputs["images"])), "unused")
    config.validate()
    load_data(config)  # DataError when the folder or zip holds no usable image


def run_training(params: dict, inputs: dict[str, Path], result: Path, scratch: Path):
    from loraforge.formats import write_image_lora
    from loraforge.formats.cloneofsimo import save_lora_pti
    from loraforge.train.image import train_image

    config = image_train_config(params, str(images_source(inputs["images"])), str(scratch / "train"))
    started = time.perf_counter()
    out = train_image(config)  # what `loraforge train-image` runs
    train_call_s = time.perf_counter() - started
    task = out.task
    adapter = result / "adapter"
    lora = task.image_lora()
    info = task.adapter_info()
    info["base"] = params["base"]
    write_image_lora(adapter, lora, "diffusers", info)
    components = {c: m for c, m in (("unet", task.unet_lora), *task.te_loras.items())}
    held = save_lora_pti(result / "final_lora.safetensors", lora, components)
    if task.last_grid is not None and Path(task.last_grid).is_file():
        shutil.copyfile(task.last_grid, result / "validation.png")
    timing_rows = deterministic_metrics(scratch / "train" / "metrics.csv", result / "metrics.csv")
    metrics, timings = _train_summary(out)
    metrics["final_lora_classes"] = held
    _write_json(result / "metrics.json", metrics)
    timings["train_image_s"] = round(train_call_s, 3)
    timings["metrics_time_columns"] = timing_rows
    return metrics, timings


# -- lora_inference --------------------------------------------------------------------------------


def _adapter_specs(params: dict, inputs: dict[str, Path], default_weight: float) -> list:
    """AdapterSpecs of the store's copies of the `lora` inputs, at their weights."""
    from loraforge.runtime import AdapterSpec

    return [
        AdapterSpec(str(inputs[f"lora[{i}]"]), default_weight if item["weight"] is None else item["weight"])
        for i, item in enumerate(params["lora"])
    ]


def check_inference(params: dict, inputs: dict[str, Path]) -> None:
    from loraforge.infer.image import generate_images  # noqa: F401 - import errors before work

    if not params["prompt"].strip():
        raise ConfigError("parameter prompt: must not be empty")


def run_inference(params: dict, inputs: dict[str, Path], result: Path, scratch: Path):
    from loraforge.infer.image import generate_images
    from loraforge.runtime import load_image

    specs = _adapter_specs(params, inputs, params["finetune_weighting"])
    start = time.perf_counter()
    rt = load_image(params["base"], specs)
    loaded = time.perf_counter()
    images = generate_images(
        params["prompt"],
        negative_prompt=params["negative_prompt"] or None,
        seed=params["seed"],
        steps=params["steps"],
        guidance=params["guidance"],
        num_images=params["num_images"],
        runtime=rt,
    )
    # The adapters as the job names them (CIDs), not where this machine keeps their copies.
    described = [{"path": item["lora"], "weight": s.weight} for item, s in zip(params["lora"], specs)]
    (result / "images").mkdir()
    names = []
    for g in images:
        name = f"{g.seed}.png"
        g.image.save(result / "images" / name, pnginfo=g.png_info(rt.base, described))
        names.append(name)
    timings = {"load_s": round(loaded - start, 3), "generate_s": round(time.perf_counter() - loaded, 3)}
    return {"images": names, "base": rt.base}, timings


# -- the text pair ---------------------------------------------------------------------------------


def text_train_config(params: dict, inputs: dict[str, Path], output_dir: str):
    from loraforge.config import LoraConfig
    from loraforge.train.config import TextTrainConfig

    p = params
    return TextTrainConfig(
        output_dir=output_dir,
        base=p["base"],
        data=str(inputs["data"]),
        eval_data=str(inputs["eval_data"]) if "eval_data" in inputs else "none",
        seed=p["seed"],
        max_steps=p["steps"] or 0,
        learning_rate=p["learning_rate"],
        max_length=p["max_length"],
        lora=LoraConfig(r=p["rank"], lora_alpha=2.0 * p["rank"]),
        tensorboard=False,
        progress_bar=False,
        save_every=0,
        keep_last=1,
    )


def check_training_text(params: dict, inputs: dict[str, Path]) -> None:
    from loraforge.data.text import scan_text_file

    config = text_train_config(params, inputs, "unused")
    config.validate()
    scan_text_file(config.data)  # DataError when no row is usable
    if "eval_data" in inputs:
        scan_text_file(inputs["eval_data"])


def run_training_text(params: dict, inputs: dict[str, Path], result: Path, scratch: Path):
    from loraforge.train.text import train_text

    config = text_train_config(params, inputs, str(scratch / "train"))
    out = train_text(config)
    out.task.save_adapter(result / "adapter")
    timing_rows = deterministic_metrics(scratch / "train" / "metrics.csv", result / "metrics.csv")
    metrics, timings = _train_summary(out)
    _write_json(result / "metrics.json", metrics)
    timings["metrics_time_columns"] = timing_rows
    return metrics, timings


def check_inference_text(params: dict, inputs: dict[str, Path]) -> None:
    from loraforge.infer.text import SamplingSettings

    SamplingSettings(
        max_new_tokens=params["max_new_tokens"],
        greedy=params["greedy"],
        temperature=params["temperature"],
        top_p=params["top_p"],
        seed=params["seed"],
    ).validate()


def run_inference_text(params: dict, inputs: dict[str, Path], result: Path, scratch: Path):
    from loraforge.infer.text import SamplingSettings, complete
    from loraforge.runtime import load_text

    specs = _adapter_specs(params, inputs, 1.0)
    settings = SamplingSettings(
        max_new_tokens=params["max_new_tokens"],
        greedy=params["greedy"],
        temperature=params["temperature"],
        top_p=params["top_p"],
        seed=params["seed"],
    )
    start = time.perf_counter()
    rt = load_text(params["base"], specs)
    completion = complete(rt, [params["prompt"]], settings)[0]
    _write_json(result / "completion.json", {"prompt": params["prompt"], "completion": completion})
    return {"completion": completion}, {"generate_s": round(time.perf_counter() - start, 3)}


# -- the table -------------------------------------------------------------------------------------

_SEED = Param("seed", "int", 0, "seed of every random choice (data order, noise, initialisation, sampling)")

MODULES: dict[str, Module] = {
    m.name: m
    for m in (
        Module(
            "lora_training",
            "1",
            "teach a Stable Diffusion pipeline a style from images (LoRA + learned tokens)",
            (
                Param(
                    "images",
                    "input",
                    None,
                    "training images: a folder, a .zip, or a store CID of either (or of a folder holding one "
                    ".zip, as Lilypad's); default: the packaged example style set",
                    aliases=("images_cid",),
                ),
                _SEED,
                Param(
                    "base",
                    "str",
                    "tiny-sd",
                    "pipeline: embedded name, diffusers directory or hub id "
                    "(runwayml/stable-diffusion-v1-5 selects Lilypad's lora_pti recipe)",
                ),
                Param(
                    "steps",
                    "int",
                    None,
                    "training steps (default: 1500; for SD 1.5 2000, lora_pti's 1000 inversion + 1000 tuning steps run as one joint phase)",
                    minimum=1,
                ),
                Param("rank", "int", None, "LoRA rank (default: 8; 1 for SD 1.5)", minimum=1),
                Param("placeholder_tokens", "tokens", ["<s1>", "<s2>"], "learned tokens ('<s1>|<s2>')"),
                Param(
                    "resolution",
                    "int",
                    None,
                    "training size in pixels (default: native; 512 for SD 1.5)",
                    minimum=8,
                ),
            ),
            run_training,
            check_training,
            {"images": "images.zip"},
            complete_training,
        ),
        Module(
            "lora_inference",
            "1",
            "generate images with one or more LoRA adapters",
            (
                Param(
                    "lora",
                    "loras",
                    REQUIRED,
                    "adapter: a CID (e.g. a lora_training result) or path, or a list of {lora, weight}",
                    aliases=("lora_cid",),
                ),
                Param("prompt", "str", REQUIRED, "the prompt (name the learned tokens: <s1><s2>)"),
                _SEED,
                Param(
                    "finetune_weighting", "float", 0.5, "weight of each adapter given without one (Lilypad's)"
                ),
                Param("steps", "int", 25, "denoising steps", minimum=1),
                Param("guidance", "float", 5.0, "classifier-free guidance scale", minimum=0),
                Param("negative_prompt", "str", "", "what to steer away from"),
                Param("num_images", "int", 1, "images; image k uses seed + k", minimum=1),
                Param("base", "str", None, "pipeline (default: the one the adapter records)"),
            ),
            run_inference,
            check_inference,
        ),
        Module(
            "lora_training_text",
            "1",
            "fine-tune a language model with LoRA on JSONL or text data",
            (
                Param(
                    "data",
                    "input",
                    None,
                    "training data: .jsonl or .txt file, or a store CID (default: the packaged example task)",
                    aliases=("data_cid",),
                ),
                Param(
                    "eval_data",
                    "input",
                    None,
                    "held-out data (default: the example's, with the example data)",
                ),
                _SEED,
                Param("base", "str", "tiny-llama", "base model: embedded name, directory or hub id"),
                Param("steps", "int", None, "training steps (default: 3 epochs)", minimum=1),
                Param("rank", "int", 8, "LoRA rank", minimum=1),
                Param("learning_rate", "float", 5e-3, "peak learning rate", minimum=0),
                Param("max_length", "int", 256, "longest sequence in tokens", minimum=2),
            ),
            run_training_text,
            check_training_text,
            {"data": "data", "eval_data": "eval_data"},
        ),
        Module(
            "lora_inference_text",
            "1",
            "complete a prompt with one or more text LoRA adapters",
            (
                Param(
                    "lora",
                    "loras",
                    REQUIRED,
                    "adapter: a CID or path, or a list of {lora, weight}",
                    aliases=("lora_cid",),
                ),
                Param("prompt", "str", REQUIRED, "the prompt"),
                _SEED,
                Param("max_new_tokens", "int", 64, "tokens to generate", minimum=1),
                Param("greedy", "bool", False, "the most likely token each step (no sampling)"),
                Param("temperature", "float", 0.8, "sampling temperature"),
                Param("top_p", "float", 0.95, "nucleus sampling mass"),
                Param("base", "str", None, "base model (default: the one the adapter records)"),
            ),
            run_inference_text,
            check_inference_text,
        ),
    )
}


def find_module(spec: str) -> Module:
    """``NAME[:VERSION]`` -> the module; ConfigError listing the known ones otherwise."""
    name, _, version = str(spec).partition(":")
    module = MODULES.get(name.strip())
    if module is None:
        raise ConfigError(
            f"unknown module {name!r}; known modules: {', '.join(MODULES)} (loraforge run --list)"
        )
    if version and version.lstrip("v") != module.version:
        raise ConfigError(f"{name} has no version {version!r}; this loraforge has {module.id}")
    return module


def describe_modules() -> str:
    """What `loraforge run --list` prints: each module, then NAME TYPE DEFAULT HELP per parameter."""
    lines = []
    for m in MODULES.values():
        lines.append(f"{m.id}  {m.summary}")
        width = max(len(p.name) for p in m.params)
        for p in m.params:
            alias = f" (alias: {', '.join(p.aliases)})" if p.aliases else ""
            default = p.describe_default()
            lines.append(f"    {p.name:<{width}}  {p.type:<6}  {default:<18}  {p.help}{alias}")
        lines.append("")
    lines.append("types: " + "; ".join(f"{k}: {v}" for k, v in TYPES.items()))
    lines.append(
        "default -: chosen by the module (see the help); loraforge show ID shows the values a job used"
    )
    return "\n".join(lines) + "\n"


__all__ = [
    "MODULES",
    "Module",
    "Param",
    "REQUIRED",
    "NotFound",
    "UserError",
    "describe_modules",
    "find_module",
    "parse_params",
    "resolve_params",
]
