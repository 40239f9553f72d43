"""The adapter registry: thousands registered cheaply, an LRU of loaded ones that never evicts what is
in use, store CIDs on first use, and the text host's checks (base, DoRA, shared weights)."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch
from server_fixtures import text_adapters

from loraforge.errors import IncompatibleAdapter, NotFound, UserError
from loraforge.serve.mixes import UnknownAdapter
from loraforge.serve.registry import AdapterRegistry, TextHost, same_base


class FakeHost:
    """Records loads and unloads; `in_use` plays the engine's running jobs."""

    def __init__(self, fail: set[str] = ()):
        self.loaded: list[str] = []
        self.log: list[str] = []
        self.in_use: set[str] = set()
        self.fail = set(fail)

    def check(self, path):
        if not path.exists():
            raise NotFound(str(path))

    def load(self, name, path):
        if name in self.fail:
            raise IncompatibleAdapter(f"{name} does not fit")
        self.loaded.append(name)
        self.log.append(f"+{name}")

    def unload(self, name):
        self.loaded.remove(name)
        self.log.append(f"-{name}")

    def adapters_in_use(self):
        return set(self.in_use)


@pytest.fixture
def fake(tmp_path):
    for name in "abcde":
        (tmp_path / name).mkdir()
    host = FakeHost(fail={"e"})
    registry = AdapterRegistry(host, max_loaded=2)
    assert registry.register_dir(tmp_path) == []
    return registry, host


def test_lru_evicts_the_least_recently_used_idle_adapter(fake):
    registry, host = fake
    registry.ensure_loaded(["a"])
    registry.ensure_loaded(["b"])
    registry.ensure_loaded(["a"])  # a is now more recent than b
    registry.ensure_loaded(["c"])
    assert host.log == ["+a", "+b", "-b", "+c"]
    assert registry.loaded() == ["a", "c"]


def test_never_evicts_pinned_or_running_adapters(fake):
    registry, host = fake
    lease = registry.acquire(["a"])
    registry.ensure_loaded(["b"])
    host.in_use = {"b"}  # a job of the engine still uses b
    with pytest.raises(TimeoutError):
        registry.acquire(["c"], timeout=0.2)
    assert sorted(host.loaded) == ["a", "b"]
    got = []
    waiter = threading.Thread(target=lambda: got.append(registry.acquire(["c"], timeout=10)))
    waiter.start()
    time.sleep(0.1)
    assert not got  # still waiting: both loaded adapters are busy
    lease.release()
    waiter.join(10)
    assert got and sorted(host.loaded) == ["b", "c"]  # a (released) went, b (running) stayed
    got[0].release()


def test_try_acquire_pins_only_what_is_loaded_without_waiting(fake):
    registry, host = fake
    assert registry.try_acquire(["a"]) is None and host.loaded == []  # never loads
    registry.ensure_loaded(["a", "b"])
    lease = registry.try_acquire(["a"])
    assert lease is not None and registry.loaded() == ["b", "a"]  # used: most recent
    with pytest.raises(TimeoutError):
        registry.acquire(["c", "d"], timeout=0.1)  # a is pinned: only one slot can be freed
    lease.release()
    registry.ensure_loaded(["c", "d"])
    assert sorted(host.loaded) == ["c", "d"]


def test_a_request_needs_all_its_adapters_at_once(fake):
    registry, host = fake
    with registry.acquire(["a", "b"]):
        assert sorted(host.loaded) == ["a", "b"]
    with pytest.raises(UserError, match="at most 2"):
        registry.acquire(["a", "b", "c"])


def test_failed_load_leaves_the_registry_usable(fake):
    registry, host = fake
    registry.ensure_loaded(["a"])
    with pytest.raises(IncompatibleAdapter):
        registry.acquire(["b", "e"])
    assert registry.loaded() == ["b"]  # a made room; b loaded fine and stays (unpinned); e did not
    registry.ensure_loaded(["c"])
    assert registry.loaded() == ["b", "c"]


def test_unknown_names_and_unregister(fake):
    registry, host = fake
    with pytest.raises(UnknownAdapter, match="the server has: a, b, c, d, e"):
        registry.acquire(["zzz"])
    lease = registry.acquire(["a"])
    registry.unregister("a")
    assert "a" not in registry and host.loaded == ["a"]  # still in use: unloaded when released
    lease.release()
    assert host.loaded == []
    with pytest.raises(UnknownAdapter):
        registry.unregister("a")


def test_register_refuses_missing_sources_and_name_clashes(fake, tmp_path):
    registry, _ = fake
    with pytest.raises(NotFound):
        registry.register("x", tmp_path / "nope")
    registry.register("a", tmp_path / "a")  # same source again: fine
    with pytest.raises(UserError, match="already registered"):
        registry.register("a", tmp_path / "b")
    with pytest.raises(UserError, match="invalid adapter name"):
        registry.register("a.b", tmp_path / "b")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry_adapters")
    return text_adapters(
        root,
        {
            "plain": {},
            "dora": {"use_dora": True},
            "biased": {"bias": "all"},
            "head": {"modules_to_save": ["lm_head"], "perturb_copies": True},
            "embed": {"target_modules": ["embed_tokens", "q_proj"]},
        },
    )


def test_thousands_registered_without_loading_any(adapters, tmp_path):
    folder = tmp_path / "many"
    for i in range(2000):
        (folder / f"a{i:04d}").mkdir(parents=True)
        shutil.copy(adapters["plain"] / "adapter_config.json", folder / f"a{i:04d}")
    host = FakeHost()
    host.check = TextHost(None, "tiny-llama").check  # the real check: a PEFT config for this base
    registry = AdapterRegistry(host, max_loaded=4)
    start = time.perf_counter()
    assert registry.register_dir(folder) == []
    print(f"registered 2000 adapters in {time.perf_counter() - start:.2f} s")
    assert len(registry) == 2000 and host.loaded == []
    registry.ensure_loaded(["a1234"])
    assert host.loaded == ["a1234"]


class Holder:
    """The two things TextHost takes from a TextEngine: the model and its step lock."""

    def __init__(self, model):
        self.model, self.lock = model, threading.RLock()

    def adapters_in_use(self):
        return set()


@pytest.fixture(scope="module")
def text_host():
    from loraforge.runtime import load_text

    return TextHost(Holder(load_text("tiny-llama").model), "tiny-llama")


def test_text_host_refuses_what_mixed_batches_cannot_serve(text_host, adapters):
    with pytest.raises(IncompatibleAdapter, match="DoRA"):
        text_host.check(adapters["dora"])
    with pytest.raises(IncompatibleAdapter, match="trains biases"):
        text_host.check(adapters["biased"])


def test_text_host_loads_heads_and_embeddings_and_unloads(text_host, adapters):
    model = text_host.model
    text_host.load("head", adapters["head"])
    text_host.load("embed", adapters["embed"])
    assert {"head", "embed"} <= set(model.peft_config)
    assert model.adapter_copies("head")  # the trained lm_head copy is there, per adapter
    ids = torch.tensor([[1, 5, 9, 11]])
    base = model(ids, adapter_names=["__base__"]).logits
    mixed = model(ids.repeat(3, 1), adapter_names=["__base__", "head", "embed"]).logits
    assert torch.allclose(mixed[0], base[0], atol=1e-5)
    assert not torch.allclose(mixed[1], base[0], atol=1e-3) and not torch.allclose(
        mixed[2], base[0], atol=1e-3
    )
    text_host.unload("head")
    text_host.unload("embed")
    assert "head" not in model.peft_config and not model.adapter_copies("head")


def test_text_host_refuses_an_adapter_that_replaces_base_weights(text_host, adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    resized = tmp_path / "resized"
    shutil.copytree(adapters["plain"], resized)
    tensors = load_file(resized / "adapter_model.safetensors")
    weight = dict(text_host.model.base_parameters())["model.embed_tokens.weight"]
    tensors["base_model.model.model.embed_tokens.weight"] = weight.detach() + 1.0
    save_file(tensors, resized / "adapter_model.safetensors")
    with pytest.raises(IncompatibleAdapter, match="replaces the base weight model.embed_tokens.weight"):
        text_host.load("resized", resized)
    assert "resized" not in text_host.model.peft_config
    tensors["base_model.model.model.embed_tokens.weight"] = weight.detach().clone()  # unchanged: harmless
    save_file(tensors, resized / "adapter_model.safetensors")
    text_host.load("resized", resized)
    text_host.unload("resized")


def test_adapter_for_another_base_is_refused(text_host, adapters, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(adapters["plain"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "tiny-sd"
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleAdapter, match="made for base 'tiny-sd'"):
        text_host.check(other)
    assert same_base("tiny-llama", "tiny-llama") is True
    assert same_base("tiny-llama", "tiny-sd") is False
    assert same_base("meta-llama/Llama-2-7b-hf", "tiny-llama") is None  # shapes decide at load time


def test_store_cid_registers_on_first_use(adapters, tmp_path, monkeypatch):
    from loraforge.jobs.store import Store

    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "home"))
    cid = Store().add(adapters["plain"])
    registry = AdapterRegistry(FakeHost(), max_loaded=2)
    assert cid not in registry
    assert registry.knows(cid) and cid in registry
    registry.ensure_loaded([cid])
    assert registry.host.loaded == [cid]
    assert not registry.knows("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG")  # a CID the store lacks
