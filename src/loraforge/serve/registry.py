"""Which adapters a server knows (thousands: only name -> source in memory) and which are loaded.

    registry = AdapterRegistry(TextHost(engine, base="tiny-llama"), max_loaded=64)
    registry.register_dir("adapters/")          # each sub-directory is an adapter named after it
    with registry.acquire(["style", "tone"]):   # loaded (LRU, evicting idle ones) and pinned
        handle = engine.submit(job)             # ... until the request is done

A *host* puts adapters on the served model: `check(path)` (cheap: right kind, right base; raises
UserError), `load(name, path)`, `unload(name)` and `adapters_in_use()`. `TextHost` and `ImageHost`
are the two real ones. At most `max_loaded` adapters are loaded at once; loading one more evicts the
least recently used adapter that no request has pinned and no engine job references. When every
loaded adapter is busy, `acquire` waits for one to be released (a request needs all its adapters at
once, so waiting cannot deadlock). A store CID nobody registered is registered on first use.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path

import torch

from loraforge.errors import IncompatibleAdapter, NotFound, UserError
from loraforge.serve.mixes import UnknownAdapter

log = logging.getLogger("loraforge.serve")


class AdapterRegistry:
    def __init__(self, host, max_loaded: int = 64):
        if max_loaded < 1:
            raise UserError(f"max_loaded must be >= 1, got {max_loaded}")
        self.host = host
        self.max_loaded = max_loaded
        self._sources: dict[str, str] = {}
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._loading: set[str] = set()
        self._pins: Counter[str] = Counter()
        self._cond = threading.Condition()

    # -- what is known -----------------------------------------------------------------------------

    def register(self, name: str, source: str | Path, check: bool = True) -> None:
        """Adds `name` -> `source` (a path or a store CID). With `check`, the source must exist and be
        an adapter of the served kind for the served base (UserError otherwise)."""
        source = str(source)
        if not isinstance(name, str) or not name or name.strip() != name or "." in name or "/" in name:
            raise UserError(
                f"invalid adapter name {name!r}: a non-empty name without dots, slashes or edge spaces"
            )
        if name == getattr(self.host, "base", None):
            raise UserError(f"invalid adapter name {name!r}: it is the base model's name")
        with self._cond:
            old = self._sources.get(name)
        if old is not None:
            if old == source:
                return
            raise UserError(f"an adapter named {name!r} is already registered (from {old}); unload it first")
        if check:
            self.host.check(locate(source))
        with self._cond:
            self._sources.setdefault(name, source)

    def register_dir(self, directory: str | Path) -> list[str]:
        """Registers every sub-directory of `directory` under its own name. Returns one line per
        sub-directory skipped (not an adapter, or for another base), so a large folder still serves."""
        directory = Path(directory)
        if not directory.is_dir():
            raise NotFound(f"adapters directory not found: {directory}")
        skipped = []
        for sub in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                self.register(sub.name, sub)
            except UserError as e:
                skipped.append(f"{sub.name}: {e}")
        return skipped

    def unregister(self, name: str) -> None:
        """Forgets `name`; it is unloaded now, or when the last request using it finishes."""
        with self._cond:
            if name not in self._sources:
                raise UnknownAdapter(name, list(self._sources))
            del self._sources[name]
            if name in self._loaded and not self._busy(name):
                self._evict(name)
            self._cond.notify_all()

    def __contains__(self, name) -> bool:
        with self._cond:
            return name in self._sources

    def __len__(self) -> int:
        return len(self._sources)

    def names(self) -> list[str]:
        with self._cond:
            return sorted(self._sources)

    def source(self, name: str) -> str:
        with self._cond:
            return self._sources[name]

    def knows(self, name: str) -> bool:
        """Whether `name` is registered; a store CID the store holds is registered now."""
        with self._cond:
            if name in self._sources:
                return True
        from loraforge.jobs.cid import is_cid

        if not is_cid(name):
            return False
        try:
            self.register(name, name)
        except NotFound:
            return False
        return True

    def loaded(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        with self._cond:
            return list(self._loaded)

    # -- loading -----------------------------------------------------------------------------------

    def acquire(self, names, timeout: float | None = None) -> Lease:
        """Loads `names` (evicting idle adapters as needed) and pins them until the lease is released.
        UnknownAdapter for a name never registered; the host's UserError if one cannot load."""
        names = list(dict.fromkeys(names))
        if len(names) > self.max_loaded:
            raise UserError(
                f"a request uses {len(names)} adapters but the server loads at most {self.max_loaded}"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                for name in names:
                    if name not in self._sources:
                        raise UnknownAdapter(name, list(self._sources))
                if not any(n in self._loading for n in names):
                    missing = [n for n in names if n not in self._loaded]
                    if self._make_room(len(missing), keep=set(names)):
                        break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"no room to load {', '.join(names)}: every loaded adapter is in use")
                self._cond.wait(0.05)  # engine jobs finishing free adapters without notifying
            self._pins.update(names)
            self._loading.update(missing)
            sources = {n: self._sources[n] for n in missing}
        done = []
        try:
            for name in missing:
                self.host.load(name, locate(sources[name]))
                done.append(name)
        except BaseException:
            with self._cond:
                self._loading.difference_update(missing)
                self._loaded.update(dict.fromkeys(done))
                self._unpin(names)
                self._cond.notify_all()
            raise
        with self._cond:
            self._loading.difference_update(missing)
            for name in names:
                self._loaded[name] = None
                self._loaded.move_to_end(name)
            self._cond.notify_all()
        return Lease(self, names)

    def try_acquire(self, names) -> Lease | None:
        """`acquire` without waiting or loading: a Lease if every name is loaded now (and the registry's
        lock is free), else None. Lets the event loop skip a thread hop on the common path."""
        names = list(dict.fromkeys(names))
        if not self._cond.acquire(blocking=False):
            return None
        try:
            if not all(n in self._loaded and n in self._sources for n in names):
                return None
            self._pins.update(names)
            for name in names:
                self._loaded.move_to_end(name)
        finally:
            self._cond.release()
        return Lease(self, names)

    def ensure_loaded(self, names) -> None:
        """Loads `names` now (as `acquire`, without keeping them pinned)."""
        self.acquire(names).release()

    def _busy(self, name: str) -> bool:
        return self._pins[name] > 0 or name in self._loading or name in self.host.adapters_in_use()

    def _make_room(self, count: int, keep: set[str]) -> bool:
        """Evicts idle adapters (LRU first) until `count` more fit; False if not possible now."""
        excess = len(self._loaded) + len(self._loading) + count - self.max_loaded
        if excess <= 0:
            return True
        in_use = self.host.adapters_in_use()
        idle = [n for n in self._loaded if n not in keep and self._pins[n] == 0 and n not in in_use]
        if len(idle) < excess:
            return False
        for name in idle[:excess]:
            self._evict(name)
        return True

    def _evict(self, name: str) -> None:
        self.host.unload(name)
        del self._loaded[name]

    def _unpin(self, names) -> None:
        for name in names:
            self._pins[name] -= 1
            if self._pins[name] <= 0:
                del self._pins[name]
                if name not in self._sources and name in self._loaded and not self._busy(name):
                    self._evict(name)  # unregistered while in use
        self._cond.notify_all()


class Lease:
    """Pins adapters loaded until `release()` (idempotent; also a context manager)."""

    def __init__(self, registry: AdapterRegistry, names: list[str]):
        self.registry, self.names, self._held = registry, names, True

    def release(self) -> None:
        with self.registry._cond:
            if self._held:
                self._held = False
                self.registry._unpin(self.names)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def locate(source: str) -> Path:
    from loraforge.runtime import AdapterSpec, locate_adapter

    return locate_adapter(AdapterSpec(source))


# -- the base an adapter was made for --------------------------------------------------------------


def check_base(path: Path, served: str) -> None:
    """IncompatibleAdapter if the adapter at `path` records a base that is not `served`. A recorded
    hub id against a local directory cannot be compared here; loading then checks every shape."""
    from loraforge.runtime import recorded_base

    recorded = recorded_base(path)
    if recorded and same_base(recorded, served) is False:
        raise IncompatibleAdapter(
            f"{path.name} was made for base {recorded!r}, but this server serves {served!r}"
        )


def same_base(a: str, b: str) -> bool | None:
    """True/False when two base names surely are / are not the same model; None when unknown."""
    ka, kb = _identity(a), _identity(b)
    if ka == kb:
        return True
    if ka[0] == kb[0] == "dir":
        return _model_config(ka[1]) == _model_config(kb[1])  # a copy of the same base is the same base
    return None


def _identity(name: str) -> tuple[str, object]:
    from loraforge.bases import EMBEDDED_BASES

    if name in EMBEDDED_BASES:
        return "dir", EMBEDDED_BASES[name][1].resolve()
    path = Path(name).expanduser()
    if path.is_dir():
        parts = path.resolve().parts
        for i, part in enumerate(parts):  # the hub cache's models--org--name/snapshots/<rev>
            if part.startswith("models--") and i + 1 < len(parts) and parts[i + 1] == "snapshots":
                return "hub", part.removeprefix("models--").replace("--", "/")
        return "dir", path.resolve()
    return "hub", name.strip("/")


def _model_config(directory: Path) -> dict | None:
    """The architecture a base directory describes (its config, without the fields that vary per save)."""
    for rel in ("config.json", "unet/config.json"):
        file = directory / rel
        if file.is_file():
            data = json.loads(file.read_text(encoding="utf-8"))
            return {k: v for k, v in data.items() if not k.startswith("_") and k not in VOLATILE}
    return None


VOLATILE = {"transformers_version", "dtype", "torch_dtype", "architectures"}


# -- hosts -----------------------------------------------------------------------------------------


class TextHost:
    """Puts PEFT adapters on a TextEngine's LoraModel (under the engine's lock).

    Refused at load time, with the reason: DoRA adapters (mixed batches cannot run them), and adapters
    that overwrite base weights (trained biases, a full embedding matrix that differs from the base's):
    those weights are shared by every row of a batch, so serving them would change other requests.
    ``modules_to_save`` copies (an ``lm_head``, a trained ``embed_tokens``) and LoRA on embeddings are
    per adapter, hence served."""

    kind = "text"

    def __init__(self, engine, base: str):
        self.engine, self.base = engine, base

    @property
    def model(self):
        return self.engine.model

    def check(self, path: Path) -> Path:
        """The adapter's PEFT directory, once it is known to be servable here (IncompatibleAdapter if not)."""
        from loraforge.config import LoraConfig
        from loraforge.runtime import AdapterSpec, text_adapter_dir

        directory = text_adapter_dir(AdapterSpec(str(path)))
        check_base(directory, self.base)
        config = LoraConfig.from_pretrained(directory)
        if config.use_dora:
            raise IncompatibleAdapter(
                f"{directory.name} is a DoRA adapter: DoRA's per-row weight normalisation cannot run in a "
                "mixed batch, so this server cannot serve it (merge it into the base with `loraforge merge`)"
            )
        if config.bias != "none":
            raise IncompatibleAdapter(
                f"{directory.name} trains biases (bias={config.bias!r}): biases are base weights shared by "
                "every request in a batch, so this server cannot serve it"
            )
        return directory

    def load(self, name: str, path: Path) -> None:
        from loraforge.formats.peft import read_adapter, split_tensors

        directory = self.check(path)
        config, tensors = read_adapter(directory)
        where = f"adapter {name!r} ({directory})"
        lora, others = split_tensors(tensors, where)
        with self.engine.lock:
            self._check_shared(config, others, where)
            self.model.add_adapter_with_weights(name, config, lora, others, where=where)
            self.model.eval()

    def _check_shared(self, config, others: dict, where: str) -> None:
        """Refuses tensors that would overwrite the base (outside the adapter's own modules_to_save)."""
        copies = self.model.modules_to_save_for(config)
        base = dict(self.model.base_parameters())
        for key, tensor in others.items():
            key = key.replace(".base_layer.", ".")
            if any(key.startswith(c + ".") for c in copies):
                continue
            current = base.get(key)
            if current is None or current.shape != tensor.shape:
                continue  # add_adapter_with_weights names the mismatch
            if not torch.equal(current.detach().cpu(), tensor.to(current.dtype)):
                raise IncompatibleAdapter(
                    f"{where} replaces the base weight {key} (a resized vocabulary?): base weights are shared "
                    "by every request in a batch, so this server cannot serve it"
                )

    def unload(self, name: str) -> None:
        with self.engine.lock:
            self.model.delete_adapter(name)

    def adapters_in_use(self) -> set[str]:
        return self.engine.adapters_in_use()


class ImageHost:
    """Puts image adapters (any supported format) on an ImageEngine's pipeline."""

    kind = "image"

    def __init__(self, engine, base: str):
        self.engine, self.base = engine, base

    def check(self, path: Path) -> None:
        from loraforge.formats import FORMATS, detect_format

        fmt = detect_format(path)
        if FORMATS[fmt].kind != "image":
            raise UserError(f"{path.name} is a {fmt} text adapter; this server serves an image pipeline")
        check_base(path, self.base)

    def load(self, name: str, path: Path) -> None:
        self.check(path)
        self.engine.load(name, path)

    def unload(self, name: str) -> None:
        self.engine.unload(name)

    def adapters_in_use(self) -> set[str]:
        return self.engine.adapters_in_use()
