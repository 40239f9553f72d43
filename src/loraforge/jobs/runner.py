"""Running a module as a job: checked parameters in, a result directory and a job record in the store.

    job = run_job("lora_training", {"images": "photos/", "seed": 3})
    job.result   # CID of the result directory (Qm…; bafy… with cid_version=1)
    job.record   # CID of the job record
    verify(job.result)   # runs it again from its record: same CID?

What a job does, in order:

1. **Check** (nothing written before this passes): the module and version exist; every parameter is
   known (else the accepted names are listed), of its type; each input (a path, or the CID of an
   object in the store) exists; the module's own checks pass (e.g. the images folder holds a usable
   image). Any failure is one `UserError`.
2. **Inputs**: a local path is added to the store (a folder of images as its image, caption and
   metadata files only, so stray files change nothing) and replaced by its CID in the parameters;
   the job then reads the store's copy, so the record names exactly what was read.
3. **Run** in a work directory inside the store (deleted afterwards, and by the next store user if the
   process dies), with the seed set, deterministic algorithms on, and the module's prints captured
   for the record. The module writes only deterministic files into ``result/`` plus ``job.json``
   (module, version, resolved parameters).
4. **Store**: the result directory is added (pinned) and the record written: module and version,
   parameters, input and result CIDs, environment fingerprint, metrics, log, timings. Both appear
   atomically: a job killed at any point leaves no partial object.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from loraforge.errors import ConfigError, NotFound, UserError
from loraforge.jobs.cid import cid_of, is_cid, parse_cid
from loraforge.jobs.modules import Module, find_module, images_source, resolve_params
from loraforge.jobs.store import Store

RECORD_FORMAT = "loraforge-job/1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
DATA_FILES = IMAGE_SUFFIXES | {".txt"}


@dataclass
class JobResult:
    result: str
    """CID of the result directory."""
    record: str
    """CID of the job record."""
    data: dict
    """The record itself."""


# -- inputs ----------------------------------------------------------------------------------------


def default_inputs(module: Module, params: dict) -> dict:
    """Fills the inputs a module defaults to (the packaged examples) with their paths."""
    from loraforge.examples import __file__ as examples_init

    examples = Path(examples_init).parent
    params = dict(params)
    if module.name == "lora_training" and params.get("images") is None:
        params["images"] = str(examples / "style")
    if module.name == "lora_training_text" and params.get("data") is None:
        params["data"] = str(examples / "text" / "train.jsonl")
        if params.get("eval_data") is None:
            params["eval_data"] = str(examples / "text" / "heldout.jsonl")
    return params


def input_sources(module: Module, params: dict) -> list[tuple[str, int | None, str]]:
    """(parameter, index in a lora list or None, source) for every input of the job."""
    out = []
    for p in module.params:
        value = params.get(p.name)
        if p.type == "input" and value is not None:
            out.append((p.name, None, value))
        elif p.type == "loras" and value is not None:
            out += [(p.name, i, item["lora"]) for i, item in enumerate(value)]
    return out


def _set_source(params: dict, name: str, index: int | None, value: str) -> None:
    if index is None:
        params[name] = value
    else:
        params[name][index] = {**params[name][index], "lora": value}


def check_inputs(store: Store, module: Module, params: dict) -> dict[tuple[str, int | None], Path]:
    """The local path of each input, checked to exist (a CID: in the store). NotFound otherwise."""
    paths = {}
    for name, index, source in input_sources(module, params):
        path = Path(source).expanduser()
        if path.exists():
            paths[(name, index)] = path
        elif is_cid(source):
            if not store.has(source) or source in store.records():
                raise NotFound(f"parameter {name}: {source} is not in the store {store.root}")
            paths[(name, index)] = store.materialize(source, module.input_names.get(name))
        else:
            raise NotFound(f"parameter {name}: {source} is neither an existing path nor a CID")
    return paths


def _stage_images(folder: Path, dest: Path) -> Path:
    """A copy of the image, caption and metadata files of `folder` (other files are not training data)."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") or part == "__MACOSX" for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() in DATA_FILES or path.name == "metadata.jsonl":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / rel)
    return dest


def add_inputs(store: Store, module: Module, params: dict, paths: dict, cid_version: int) -> None:
    """Adds each local input to the store and puts its CID in `params` (in place)."""
    for (name, index), path in paths.items():
        source = params[name] if index is None else params[name][index]["lora"]
        if is_cid(source) and not Path(source).exists():
            continue
        if module.name == "lora_training" and name == "images" and images_source(path).is_dir():
            with tempfile.TemporaryDirectory(prefix="loraforge-stage-") as tmp:
                cid = store.add(_stage_images(path, Path(tmp) / "images"), cid_version)
        elif module.name == "lora_training" and name == "images":
            cid = store.add(images_source(path), cid_version)  # a .zip, or the one .zip of a folder
        else:
            cid = store.add(path, cid_version)
        _set_source(params, name, index, cid)


def local_inputs(store: Store, module: Module, params: dict) -> dict[str, Path]:
    """Parameter (``lora[0]`` ... for a list) -> the store's copy of each input."""
    out = {}
    for name, index, source in input_sources(module, params):
        key = name if index is None else f"{name}[{index}]"
        out[key] = store.materialize(source, module.input_names.get(name, "adapter.safetensors"))
    return out


# -- environment -----------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


@contextlib.contextmanager
def deterministic():
    """Deterministic algorithms on (warn-only where an op has none), cuDNN autotuning off; restored after."""
    import torch

    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def environment() -> dict:
    """What a result may depend on besides the parameters: versions, device, threads, settings."""
    import torch

    import loraforge

    cuda = torch.cuda.is_available()
    return {
        "loraforge": loraforge.__version__,
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "threads": torch.get_num_threads(),
        "processes": int(
            os.environ.get("WORLD_SIZE", "1")
        ),  # > 1: a DDP launch (verify under the same launch)
        "deterministic": {
            "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        },
    }


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


# -- running ---------------------------------------------------------------------------------------


def prepare(module_spec: str, params: dict | None, store: Store) -> tuple[Module, dict, dict]:
    """Step 1: (module, resolved parameters, input paths), or a UserError; writes no object."""
    module = find_module(module_spec)
    resolved = default_inputs(module, resolve_params(module, params or {}))
    for p in module.params:  # an adapter given without a weight gets the module's default weight
        if p.type == "loras":
            default = resolved.get("finetune_weighting", 1.0)
            resolved[p.name] = [
                {**x, "weight": default if x["weight"] is None else x["weight"]} for x in resolved[p.name]
            ]
    paths = check_inputs(store, module, resolved)
    single = {name: path for (name, index), path in paths.items() if index is None}
    module.check(resolved, single) if module.check else None
    return module, resolved, paths


def _execute(store: Store, module: Module, params: dict, cid_version: int, add: bool, quiet: bool):
    """Runs the module on the store's inputs in a work directory; (result CID, metrics, timings, log)."""
    import torch

    log = io.StringIO()
    shown = sys.stderr if not quiet else io.StringIO()
    with store.workdir() as work, deterministic():
        result, scratch = work / "result", work / "scratch"
        result.mkdir()
        scratch.mkdir()
        inputs = local_inputs(store, module, params)
        torch.manual_seed(params.get("seed", 0))
        started = time.perf_counter()
        with contextlib.redirect_stdout(_Tee(shown, log)):
            metrics, timings = module.run(params, inputs, result, scratch)
        timings = {"run_s": round(time.perf_counter() - started, 3), **timings}
        job = {"module": module.name, "version": module.version, "params": params}
        (result / "job.json").write_text(json.dumps(job, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        shutil.rmtree(scratch)
        started = time.perf_counter()
        cid = store.add(result, cid_version) if add else cid_of(result, cid_version)
        timings["store_s"] = round(time.perf_counter() - started, 3)
        env = environment()
    return cid, metrics, timings, log.getvalue(), env


def is_main_process() -> bool:
    """False in the processes other than rank 0 of an `accelerate launch` / `torchrun` job."""
    return int(os.environ.get("RANK", "0")) == 0


def run_job(
    module_spec: str,
    params: dict | None = None,
    *,
    store: Store | None = None,
    cid_version: int = 0,
    quiet: bool = False,
) -> JobResult:
    """Runs `module_spec` (``NAME[:VERSION]``) with `params`; see the module docstring. The result and
    record are in `store` (default: the one under $LORAFORGE_HOME); UserError for bad input, raised
    before anything is written. Under `accelerate launch` / `torchrun` every process trains and only
    rank 0 adds the result and writes the record (the others return `record` "")."""
    if cid_version not in (0, 1):
        raise ConfigError(f"cid_version must be 0 or 1, got {cid_version}")
    store = store or Store()
    begun = time.time()
    t0 = time.perf_counter()
    module, resolved, paths = prepare(module_spec, params, store)
    add_inputs(store, module, resolved, paths, cid_version)
    inputs = {f"{n}" if i is None else f"{n}[{i}]": s for n, i, s in input_sources(module, resolved)}
    prepare_s = round(time.perf_counter() - t0, 3)
    if not is_main_process():  # a multi-process launch: the other processes train, rank 0 stores
        cid, *_ = _execute(store, module, resolved, cid_version, False, True)
        return JobResult(cid, "", {})
    cid, metrics, timings, log, env = _execute(store, module, resolved, cid_version, True, quiet)
    record = {
        "format": RECORD_FORMAT,
        "module": module.name,
        "version": module.version,
        "params": resolved,
        "inputs": inputs,
        "result": cid,
        "cid_version": cid_version,
        "environment": env,
        "metrics": metrics,
        "log": log,
        "timings": {
            "started": datetime.fromtimestamp(begun, UTC).isoformat(timespec="seconds"),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - t0, 3),
            "prepare_s": prepare_s,
            **timings,
        },
    }
    return JobResult(cid, store.put_record(record), record)


# -- records ---------------------------------------------------------------------------------------


def find_records(store: Store, cid: str) -> list[tuple[str, dict]]:
    """(record CID, record) for `cid` itself when it is a record, else every record whose result it is
    (oldest first)."""
    parse_cid(cid)
    if cid in store.records():
        return [(cid, store.get_record(cid))]
    found = []
    for name in store.records():
        with contextlib.suppress(UserError, ValueError):
            record = store.get_record(name)
            if record.get("result") == cid:
                found.append((name, record))
    found.sort(key=lambda item: item[1].get("timings", {}).get("started", ""))
    return found


@dataclass
class Verification:
    record: str
    expected: str
    got: str
    intact: bool
    """Whether the stored result is present and matches its CID."""

    @property
    def ok(self) -> bool:
        return self.expected == self.got and self.intact


def verify(cid: str, store: Store | None = None, quiet: bool = True) -> Verification:
    """Runs the job of record `cid` (or of the newest record whose result is `cid`) again from the
    store's inputs and compares the new result's CID with the recorded one. Nothing is added."""
    store = store or Store()
    records = find_records(store, cid)
    if not records:
        if store.has(cid):
            raise NotFound(f"{cid} is in the store but no job record names it as its result")
        raise NotFound(f"{cid} is not in the store {store.root}")
    name, record = records[-1]
    module = find_module(f"{record['module']}:{record['version']}")
    params = resolve_params(module, record["params"])
    check_inputs(store, module, params)
    got, *_ = _execute(store, module, params, record.get("cid_version", 0), False, quiet)
    return Verification(name, record["result"], got, store.verify_object(record["result"]))


verify_job = verify  # the name `loraforge` exports
