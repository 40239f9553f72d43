"""`loraforge run` jobs end to end on the embedded tiny pipelines, with few steps: same job, same CID;
verify; bad input refused before anything is written; results usable by the next job; the store
consistent after SIGKILL and under concurrent jobs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loraforge.cli import main
from loraforge.errors import ConfigError, DataError, NotFound, UserError
from loraforge.jobs.cid import cid_of
from loraforge.jobs.modules import MODULES, parse_params
from loraforge.jobs.runner import run_job, verify
from loraforge.jobs.store import Store

SRC = Path(__file__).resolve().parents[2] / "src"
STYLE = SRC / "loraforge" / "examples" / "style"
SHORT = {"images": str(STYLE), "seed": 3, "steps": 2}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "home"))
    return Store()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two identical short lora_training jobs and one with another seed, in one store."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFORGE_HOME", str(home))
        store = Store()
        jobs = [run_job("lora_training", SHORT, quiet=True) for _ in range(2)]
        jobs.append(run_job("lora_training", {**SHORT, "seed": 4}, quiet=True))
    return home, store, jobs


def objects(store: Store) -> list:
    return sorted(p.name for _, p in store._objects()) + store.records() + store.pins()


def test_same_job_same_cid_other_seed_other_cid(trained):
    _, store, (a, b, c) = trained
    assert a.result == b.result
    assert a.record != b.record  # the records hold times
    assert c.result != a.result
    assert store.fsck() == []


def test_result_directory_and_record(trained, tmp_path):
    _, store, (a, _, _) = trained
    out = store.export_dir(a.result, tmp_path / "result")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "adapter/adapter_info.json",
        "adapter/learned_embeds.safetensors",
        "adapter/pytorch_lora_weights.safetensors",
        "final_lora.safetensors",
        "job.json",
        "metrics.csv",
        "metrics.json",
        "validation.png",
    ]
    header = next(csv.reader((out / "metrics.csv").open()))
    assert "elapsed_s" not in header and "tokens_per_s" not in header and "loss" in header
    job = json.loads((out / "job.json").read_text())
    assert job["module"] == "lora_training" and job["params"]["seed"] == 3
    record = store.get_record(a.record)
    images_cid = record["params"]["images"]
    assert record["inputs"] == {"images": images_cid} and store.verify_object(images_cid)
    assert job["params"]["images"] == images_cid
    assert record["result"] == a.result and record["module"] == "lora_training" and record["version"] == "1"
    env = record["environment"]
    assert env["device"] == "cpu" and env["deterministic"]["use_deterministic_algorithms"] is True
    assert {"torch", "diffusers", "transformers", "loraforge"} <= set(env)
    assert record["metrics"]["steps"] == 2
    assert record["timings"]["wall_s"] > 0 and record["timings"]["metrics_time_columns"]
    # The staged input holds the training files only (not the examples package's __init__.py).
    names = [n for n, _ in store._entries(images_cid)]
    assert "__init__.py" not in names and "00_circle.png" in names


def test_final_lora_reads_back_as_the_adapter(trained, tmp_path):
    """final_lora.safetensors (lora_pti's layout) holds the adapter's attention and GEGLU layers and the tokens."""
    from loraforge.formats import detect_format, read_image_lora
    from loraforge.runtime import load_pipeline

    _, store, (a, _, _) = trained
    out = store.export_dir(a.result, tmp_path / "r")
    assert detect_format(out / "final_lora.safetensors") == "cloneofsimo"
    pipe = load_pipeline("tiny-sd")
    pti = read_image_lora(
        out / "final_lora.safetensors", {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    )
    full = read_image_lora(out / "adapter")
    assert pti.tokens == full.tokens == ["<s1>", "<s2>"]
    assert set(pti.components["unet"]) < set(full.components["unet"])
    for name, m in pti.components["unet"].items():
        want = full.components["unet"][name]
        assert (m.up.float() @ m.down.float() * (m.alpha / m.rank)).allclose(
            want.up @ want.down * (want.alpha / want.rank), atol=2e-3
        )


def test_verify_reruns_the_job(trained, monkeypatch):
    home, store, (a, _, _) = trained
    monkeypatch.setenv("LORAFORGE_HOME", str(home))
    v = verify(a.result, store)
    assert v.ok and v.got == a.result and v.record in store.records()


def test_inference_from_the_training_cid(trained, monkeypatch, tmp_path, capsys):
    from PIL import Image

    home, store, (a, _, _) = trained
    monkeypatch.setenv("LORAFORGE_HOME", str(home))
    spec = f'{{lora: {a.result}, prompt: "a circle in the style of <s1><s2>", seed: 3, steps: 2}}'
    assert main(["run", "lora_inference", spec, "--quiet", "--out", str(tmp_path / "out")]) == 0
    cid = capsys.readouterr().out.strip()
    assert cid_of(tmp_path / "out") == cid
    image = Image.open(tmp_path / "out" / "images" / "3.png")
    meta = json.loads(image.text["loraforge"])
    assert meta["adapters"] == [{"path": a.result, "weight": 0.5}] and meta["seed"] == 3
    assert "Time" not in image.text and "date" not in str(image.info).lower()
    # Same again, and a list of {lora, weight}: the same adapter at weight 0.5 is the same job's output.
    again = run_job(
        "lora_inference",
        {
            "lora_cid": [{"lora": a.result, "weight": 0.5}],
            "prompt": "a circle in the style of <s1><s2>",
            "seed": 3,
            "steps": 2,
        },
        quiet=True,
    )
    assert again.result == cid


@pytest.mark.parametrize(
    "module, params, error, words",
    [
        ("lora_trainin", {}, ConfigError, "known modules: lora_training"),
        ("lora_training:7", {}, ConfigError, "lora_training:1"),
        ("lora_training", {"stepz": 3}, ConfigError, "accepted: images, seed, base, steps"),
        ("lora_training", {"seed": "3"}, ConfigError, "parameter seed: expected integer"),
        ("lora_training", {"seed": True}, ConfigError, "parameter seed"),
        ("lora_training", {"steps": 0}, ConfigError, "parameter steps: must be >= 1"),
        (
            "lora_training",
            {"images": "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"},
            NotFound,
            "not in the store",
        ),
        ("lora_training", {"images": "/no/such/folder"}, NotFound, "neither an existing path nor a CID"),
        ("lora_training", {"images": str(STYLE), "images_cid": str(STYLE)}, ConfigError, "given twice"),
        ("lora_inference", {"lora": "x"}, ConfigError, "needs the parameter prompt"),
        ("lora_inference", {"lora": [{"lora": "x", "weigth": 1}], "prompt": "p"}, ConfigError, "unknown key"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(store, module, params, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[")):
        run_job(module, params)
    assert objects(store) == []


def test_folder_without_images(store, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.md").write_text("no images here")
    with pytest.raises(DataError, match="no usable training image"):
        run_job("lora_training", {"images": str(tmp_path / "imgs")})
    assert objects(store) == []


def test_params_text():
    assert parse_params('{seed: 3, images_cid: "Qm123"}') == {"seed": 3, "images_cid": "Qm123"}
    assert parse_params('{"seed": 3}') == {"seed": 3}
    assert parse_params("") == {}
    for bad in ("{seed: 3", "[1, 2]", "seed"):
        with pytest.raises(ConfigError):
            parse_params(bad)


def test_cli_errors_exit_2_and_write_nothing(store, capsys):
    assert main(["run", "lora_training", "{seed: 3"]) == 2
    assert main(["run", "lora_training", "{bogus: 1}"]) == 2
    err = capsys.readouterr().err
    assert "malformed parameters" in err and "accepted: images, seed" in err
    params = store.root.parent / "params.yaml"
    params.write_text("seed: 3\nstepz: 5\n")
    assert main(["run", "lora_training", "--params-file", str(params)]) == 2
    assert "no parameter 'stepz'" in capsys.readouterr().err
    assert main(["run", "lora_training", "--set", "seed=x"]) == 2
    assert "parameter seed: expected integer" in capsys.readouterr().err
    assert main(["run", "lora_inference", "--param", "lora", "/nowhere", "--param", "prompt", "3"]) == 2
    assert "/nowhere is neither an existing path nor a CID" in capsys.readouterr().err
    assert objects(store) == []


def test_list_shows_every_parameter(capsys):
    assert main(["run", "--list"]) == 0
    out = capsys.readouterr().out
    for module in MODULES.values():
        assert module.id in out
        for p in module.params:
            assert p.name in out
    assert "finetune_weighting" in out and "0.5" in out


def test_store_commands(trained, monkeypatch, tmp_path, capsys):
    home, store, (a, _, c) = trained
    monkeypatch.setenv("LORAFORGE_HOME", str(home))
    assert main(["show", a.result]) == 0
    out = capsys.readouterr().out
    assert "lora_training:1" in out and a.result in out and '"seed": 3' in out
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert out.count("lora_training:1") >= 3 and c.result in out
    assert main(["export", a.result, str(tmp_path / "x")]) == 0
    assert cid_of(tmp_path / "x") == a.result
    assert main(["export", a.record, "--car", str(tmp_path / "x.car")]) == 0
    assert (tmp_path / "x.car").stat().st_size > 0
    assert main(["fsck"]) == 0
    assert main(["gc"]) == 0
    assert store.verify_object(a.result) and store.verify_object(c.result)
    capsys.readouterr()
    assert main(["show", "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"]) == 2


def test_tampered_result_is_reported(store):
    job = run_job("lora_training", {**SHORT, "steps": 1}, quiet=True)
    target = store._path(
        "files", cid_of(store.export_dir(job.result, store.root.parent / "e") / "metrics.json")
    )
    os.chmod(target, 0o644)
    target.write_text("{}")
    assert store.fsck() == [target.name]
    assert main(["fsck"]) == 1


def test_folder_holding_images_zip(store, tmp_path):
    """Lilypad's layout: the images input is a folder (or CID) holding images.zip."""
    import zipfile

    (tmp_path / "in").mkdir()
    with zipfile.ZipFile(tmp_path / "in" / "images.zip", "w") as z:
        for path in sorted(STYLE.glob("0[0-3]_*")):
            z.write(path, path.name)
    job = run_job("lora_training", {"images_cid": str(tmp_path / "in"), "seed": 3, "steps": 1}, quiet=True)
    images = job.data["params"]["images"]
    assert store._kind(images) == "files" and images == cid_of(tmp_path / "in" / "images.zip")
    folder = store.add(tmp_path / "in")
    assert (
        run_job("lora_training", {"images": folder, "seed": 3, "steps": 1}, quiet=True).result != job.result
    )


def test_cid_version_1(store):
    job = run_job("lora_training", {**SHORT, "steps": 1}, cid_version=1, quiet=True)
    assert job.result.startswith("bafy") and job.data["params"]["images"].startswith("bafy")


def test_text_pair(store, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}"}) + "\n" for i in range(8))
    )
    train = run_job("lora_training_text", {"data": str(data), "seed": 1, "steps": 2}, quiet=True)
    again = run_job("lora_training_text", {"data": str(data), "seed": 1, "steps": 2}, quiet=True)
    assert train.result == again.result
    params = {"lora": train.result, "prompt": "Q1:", "greedy": True, "max_new_tokens": 4}
    out = run_job("lora_inference_text", params, quiet=True)
    exported = store.export_dir(out.result, tmp_path / "o")
    assert json.loads((exported / "completion.json").read_text())["prompt"] == "Q1:"
    with pytest.raises(UserError):
        run_job("lora_training_text", {"data": str(tmp_path / "missing.jsonl")})


# -- faults and concurrency -------------------------------------------------------------------------


def child(script: str, home: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        LORAFORGE_HOME=str(home),
    )
    code = "import sys, json\nfrom loraforge.jobs.runner import run_job\n" + textwrap.dedent(script)
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )


def assert_consistent(store: Store) -> None:
    assert store.fsck() == []
    for name in store.records():
        record = store.get_record(name)
        assert store.verify_object(record["result"]), name
    for pin in store.pins():
        assert store.verify_object(pin), pin


def test_sigkill_while_the_result_is_written(store):
    """Killed while the result directory is being added (object writes slowed down): no record, no
    partial object, fsck clean; the same job then completes and dead temporaries are gone."""
    marker = store.root.parent / "adding"
    script = f"""
        import time
        from pathlib import Path
        from loraforge.jobs import store as module
        add, publish = module.Store.add, module.Store._publish
        def slow_publish(self, tmp, path):
            time.sleep(0.3)
            publish(self, tmp, path)
        def add_result(self, path, *a, **k):
            if Path(path).name == "result":
                Path({str(marker)!r}).touch()
                module.Store._publish = slow_publish
            return add(self, path, *a, **k)
        module.Store.add = add_result
        run_job("lora_training", json.loads({json.dumps(json.dumps({**SHORT, "steps": 1}))}), quiet=True)
    """
    proc = child(script, store.root.parent)
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.8)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert marker.exists() and store.records() == []
    assert os.listdir(store.root / "tmp")  # the dead job's work directory, not an object
    assert_consistent(store)  # (fsck also clears dead temporaries)
    job = run_job("lora_training", {**SHORT, "steps": 1}, quiet=True)
    assert store.verify_object(job.result)
    assert os.listdir(store.root / "tmp") == []
    assert_consistent(store)


def test_sigkill_at_random_moments_and_concurrent_jobs(store):
    """Two jobs at once in one store (one of them killed at a random moment, one finishing): the
    store stays consistent, the finished job's result is whole, and the killed one left no record."""
    script = """
        job = run_job("lora_training", json.loads(sys.argv[1]), quiet=True)
        print(job.result, flush=True)
    """
    params = json.dumps({**SHORT, "steps": 1})
    env = dict(
        os.environ,
        PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        LORAFORGE_HOME=str(store.root.parent),
    )
    code = "import sys, json\nfrom loraforge.jobs.runner import run_job\n" + textwrap.dedent(script)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, p], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        for p in (params, params, json.dumps({**SHORT, "steps": 1, "seed": 9}))
    ]
    time.sleep(12 + (os.getpid() % 10))  # somewhere in loading, training or adding
    procs[2].send_signal(signal.SIGKILL)
    results = [p.communicate(timeout=600)[0].decode().strip() for p in procs[:2]]
    assert procs[2].wait() in (-signal.SIGKILL, 0)  # 0 only if it was done before the signal
    assert [p.returncode for p in procs[:2]] == [0, 0]
    assert results[0] == results[1] and store.verify_object(results[0])
    kept = [store.get_record(r)["params"]["seed"] for r in store.records()]
    assert kept.count(3) == 2 and len(kept) in (2, 3)
    assert_consistent(store)


def test_result_cid_equals_kubos(trained, tmp_path):
    """The exported result directory, added by the real kubo (`ipfs add -r`), has the job's CID."""
    import kubo as kubo_oracle

    _, store, (a, _, c) = trained
    (tmp_path / "kubo").mkdir()
    node = kubo_oracle.Kubo(tmp_path / "kubo" / "repo")
    try:
        for job in (a, c):
            out = store.export_dir(job.result, tmp_path / job.result)
            assert node.add(out) == job.result
    finally:
        node.close()


def test_runtime_resolves_a_stored_cid(trained, monkeypatch):
    """Any adapter argument takes a CID: a training result's CID names its adapter/."""
    from loraforge.runtime import AdapterSpec, locate_adapter, parse_adapter_spec, recorded_base

    home, store, (a, _, _) = trained
    monkeypatch.setenv("LORAFORGE_HOME", str(home))
    spec = parse_adapter_spec(f"{a.result}:0.7")
    assert spec == AdapterSpec(a.result, 0.7)
    path = locate_adapter(spec)
    assert path.name == "adapter" and (path / "pytorch_lora_weights.safetensors").is_file()
    assert recorded_base(path) == "tiny-sd"
    with pytest.raises(NotFound, match="not an adapter in the store"):
        locate_adapter(AdapterSpec(a.record))
