"""The local store: exact round trips, integrity checks, gc, and safety against SIGKILL and concurrent writers
(real subprocesses)."""

from __future__ import annotations

import filecmp
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loraforge.errors import DataError, NotFound, UserError
from loraforge.jobs.cid import CHUNK_SIZE, cid_of, is_cid
from loraforge.jobs.store import Store, loraforge_home

SRC = Path(__file__).resolve().parents[2] / "src"


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a) for p in a.rglob("*"))
    if names != sorted(p.relative_to(b) for p in b.rglob("*")):
        return False
    return all((a / n).is_dir() or filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def rand(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


@pytest.fixture
def content(tmp_path):
    return make_tree(
        tmp_path / "content",
        {
            "adapter_model.safetensors": rand(3 * CHUNK_SIZE + 5, 1),
            "adapter_config.json": b'{"r": 8}',
            "logs/train.log": b"step 1 loss 2.0\n",
            "logs/empty": b"",
            "ünïcödé name.txt": b"u",
        },
    )


def child(script: str, store_root: Path, *args: str) -> subprocess.Popen:
    """A separate Python process running `script` with `root` and `args` in sys.argv."""
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    code = "import sys\nfrom loraforge.jobs.store import Store\n" + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code, str(store_root), *args], env=env)


@pytest.mark.parametrize("version", [0, 1])
def test_add_and_export(store, content, tmp_path, version):
    cid = store.add(content, cid_version=version)
    assert cid == cid_of(content, cid_version=version)
    assert store.has(cid) and store.verify_object(cid) and cid in store.pins()
    out = store.export_dir(cid, tmp_path / "out" / "copy")
    assert same_tree(content, out)
    file_cid = store.add(content / "adapter_model.safetensors", cid_version=version)
    store.export_dir(file_cid, tmp_path / "one.safetensors")
    assert (tmp_path / "one.safetensors").read_bytes() == (content / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        store.export_dir(cid, out)
    assert [p.name for p in out.parent.iterdir()] == ["copy"]  # no temporary left beside it
    assert store.fsck() == []


def test_missing_objects(store, tmp_path):
    unknown = cid_of(make_tree(tmp_path / "x", {"a": b"never added"}))
    assert not store.has(unknown) and not store.verify_object(unknown)
    with pytest.raises(NotFound):
        store.export_dir(unknown, tmp_path / "out")
    with pytest.raises(NotFound):
        store.pin(unknown)
    with pytest.raises(NotFound):
        store.get_record(unknown)


def test_names_must_be_cids(store, tmp_path):
    (tmp_path / "victim").write_text("keep")
    for bad in ["../../victim", "bafy", "BAFKREIHDWDCEFGH4DQKJV67UZCMW7OJEE6XEDZDETOJUZJEVTENXQUVYKU"]:
        with pytest.raises(DataError, match="not a CID"):
            store.unpin(bad)
        with pytest.raises(DataError):
            store.remove_record(bad)
        with pytest.raises(DataError):
            store.has(bad)
    assert (tmp_path / "victim").read_text() == "keep"
    with pytest.raises(UserError, match="JSON"):
        store.put_record({"x": object()})


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAFORGE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert loraforge_home() == tmp_path / "cache" / "loraforge"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert loraforge_home() == tmp_path / "home" / ".cache" / "loraforge"
    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "lf"))
    assert Store().root == tmp_path / "lf" / "store"
    assert (tmp_path / "lf" / "store" / "files").is_dir()


def test_records(store, content):
    inputs = store.add(content)
    with store.workdir() as work:
        result = make_tree(work / "result", {"adapter.safetensors": b"weights", "metrics.json": b"{}"})
        result_cid = store.add(result, pin=False)
        record = {
            "module": "train-text",
            "version": "1",
            "params": {"r": 8, "lr": 1e-4},
            "inputs": {"data": inputs},
            "result": result_cid,
            "environment": {"python": sys.version, "torch": "x"},
            "metrics": {"loss": 0.5},
            "log": "line 1\nline 2 ✓\n",
            "timings": {"total_s": 1.5},
        }
        record_cid = store.put_record(record)
    assert not work.exists()
    assert record_cid.startswith("bafkrei") and store.records() == [record_cid]
    assert store.get_record(record_cid) == record
    assert (
        store.put_record(dict(reversed(record.items()))) == record_cid
    )  # canonical: key order is irrelevant
    assert store.gc() == []  # the record keeps the unpinned result
    assert store.verify_object(result_cid)


@pytest.mark.parametrize("kind", ["files", "dirs", "records"])
def test_fsck_reports_exactly_the_damaged_object(store, content, tmp_path, kind):
    cid = store.add(content)
    store.put_record({"inputs": cid})
    victim = {
        "files": cid_of(content / "adapter_model.safetensors"),
        "dirs": cid_of(content / "logs"),
        "records": store.records()[0],
    }[kind]
    path = store._path(kind, victim)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert store.fsck() == [victim]
    if kind == "records":
        with pytest.raises(DataError, match="damaged"):
            store.get_record(victim)
        return
    assert not store.verify_object(cid)
    with pytest.raises(DataError, match="damaged"):
        store.export_dir(cid, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Adding the same content again does not rewrite a block it believes present: remove it first.
    assert store.fsck(remove=True) == [victim]
    assert store.add(content) == cid
    assert store.fsck() == [] and store.verify_object(cid)


def test_gc_keeps_pinned_and_recorded(store, tmp_path):
    trees = {
        name: make_tree(tmp_path / name, {"own.bin": rand(2 * CHUNK_SIZE, seed), "shared.txt": b"shared"})
        for seed, name in enumerate(["pinned", "unpinned", "recorded", "nested"])
    }
    cids = {name: store.add(path, pin=False) for name, path in trees.items()}
    store.pin(cids["pinned"])
    record = store.put_record({"result": cids["recorded"], "inputs": {"deep": [cids["nested"]]}})
    removed = store.gc()
    assert removed == sorted([cids["unpinned"], cid_of(trees["unpinned"] / "own.bin")])  # shared.txt is kept
    assert not store.has(cids["unpinned"])
    for name in ("pinned", "recorded", "nested"):
        assert store.verify_object(cids[name])
    assert store.get_record(record)["result"] == cids["recorded"]
    store.unpin(cids["pinned"])
    store.remove_record(record)
    store.gc()
    assert list(store._objects()) == []
    assert store.fsck() == []


def test_sigkill_mid_add(store, tmp_path):
    """A process killed at an arbitrary moment of a big add leaves only whole blocks; fsck is clean
    and the next add finishes the job."""
    big = make_tree(tmp_path / "big", {f"part{i}/shard.bin": rand(8 * CHUNK_SIZE, i) for i in range(40)})
    script = """
        import time
        from loraforge.jobs import store as module
        write = module._Sink.write
        def slow(self, chunk):  # makes the add last long enough to be killed in the middle of a file
            write(self, chunk)
            time.sleep(0.002)
        module._Sink.write = slow
        Store(sys.argv[1]).add(sys.argv[2])
    """
    proc = child(script, store.root, str(big))
    deadline = time.time() + 120
    while sum(1 for _ in store._objects()) < 10 and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert store.pins() == []  # it really was killed mid-add
    assert 10 <= sum(1 for _ in store._objects()) < 81
    assert len(os.listdir(store.root / "tmp")) == 1  # the file it was copying, never visible as an object
    assert store.fsck() == []
    cid = store.add(big)
    assert cid == cid_of(big) and store.verify_object(cid)
    assert os.listdir(store.root / "tmp") == []


def test_sigkill_before_rename(store, content):
    """Killed with a finished temporary not yet renamed: the block is not visible, and the next writer
    that finds itself alone deletes the temporary."""
    script = """
        import os, signal
        store = Store(sys.argv[1])
        replace, calls = os.replace, []
        def killed_on_third(src, dst):
            calls.append(dst)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst)
        os.replace = killed_on_third
        store.add(sys.argv[2])
    """
    proc = child(script, store.root, str(content))
    assert proc.wait(60) == -signal.SIGKILL
    assert len(os.listdir(store.root / "tmp")) == 1
    assert sum(1 for _ in store._objects()) == 2 and store.fsck() == []
    assert os.listdir(store.root / "tmp") == []  # fsck cleared it
    cid = store.add(content)
    assert store.verify_object(cid)


def test_killed_workdir_is_cleaned(store):
    script = """
        import os, signal
        store = Store(sys.argv[1])
        with store.workdir() as work:
            (work / "half-written").write_bytes(b"x")
            os.kill(os.getpid(), signal.SIGKILL)
    """
    assert child(script, store.root).wait(60) == -signal.SIGKILL
    assert len(os.listdir(store.root / "tmp")) == 1
    with store.workdir() as mine:
        assert os.listdir(store.root / "tmp") == [mine.parent.name]  # the dead one is gone, ours kept
        store.put_record({"x": 1})  # another writer meanwhile keeps it too
        assert mine.exists()


def test_concurrent_adds_and_gc(store, tmp_path):
    """Two processes add overlapping trees at once while a third collects garbage: nothing is corrupted
    and nothing pinned is lost."""
    shared = {f"shared{i}.bin": rand(4 * CHUNK_SIZE, 100 + i) for i in range(6)}
    a = make_tree(tmp_path / "a", shared | {"only_a.bin": rand(5 * CHUNK_SIZE, 1)})
    b = make_tree(tmp_path / "b", shared | {"only_b.bin": rand(5 * CHUNK_SIZE, 2)})
    adder = """
        store = Store(sys.argv[1])
        for _ in range(3):
            print(store.add(sys.argv[2]), flush=True)
    """
    collector = """
        import time
        store = Store(sys.argv[1])
        end = time.time() + 1.5
        while time.time() < end:
            store.gc()
    """
    procs = [child(adder, store.root, str(a)), child(adder, store.root, str(b)), child(collector, store.root)]
    assert [p.wait(300) for p in procs] == [0, 0, 0]
    assert store.fsck() == []
    for tree in (a, b):
        cid = cid_of(tree)
        assert cid in store.pins() and store.verify_object(cid)
        out = store.export_dir(cid, tmp_path / f"out-{tree.name}")
        assert same_tree(tree, out)
    assert all(is_cid(p) for p in store.pins())
