"""A local content-addressed store: IPFS blocks by CID, pins, and job records.

Layout under the root (default: $LORAFORGE_HOME/store, else $XDG_CACHE_HOME/loraforge/store, else
~/.cache/loraforge/store)::

    blocks/<xy>/<cid>   one file per block, named by its CIDv1 (base32: safe on case-insensitive
                        file systems; a ``Qm…`` block is filed under its ``bafy…`` name), <xy> = the
                        name's last two characters; read-only once written
    pins/<cid>          empty files: roots kept by gc (add pins what it adds, as `ipfs add` does)
    records/<cid>       empty files: the job records; a record is itself a raw block (its JSON)
    tmp/                temporaries and work directories; never read as objects
    lock                the fcntl lock (see below)

Safety. Every file appears by os.replace of a finished temporary, so a killed process never leaves
half an object visible; it may leave temporaries, which the next writer that finds itself alone
(or fsck, or gc) deletes. Writers (add, put_record, pin, export) hold a shared flock on `lock`;
gc holds it exclusively, so it never deletes the blocks of an add in progress. Two writers never
conflict: both write whole files named by content, and the same name means the same bytes.
Blocks are not fsynced one by one (that would halve add's speed): a power cut can lose or damage
recent blocks, which fsck then reports and `fsck(remove=True)` clears for a re-add.

A record is JSON (any dict: module, version, params, input and result CIDs, environment, metrics,
log, timings), stored canonically (sorted keys, no spaces, UTF-8) as a raw CIDv1 block. Every string
in a record that is a CID keeps that object alive through gc.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from loraforge.errors import DataError, NotFound, UserError
from loraforge.jobs import car, unixfs
from loraforge.jobs.cid import RAW, Block, cid_from_bytes, is_cid, iter_blocks, make_cid, parse_cid, to_v1


def loraforge_home() -> Path:
    """$LORAFORGE_HOME, else $XDG_CACHE_HOME/loraforge, else ~/.cache/loraforge."""
    if os.environ.get("LORAFORGE_HOME"):
        return Path(os.environ["LORAFORGE_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore a relative path.
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return base / "loraforge"


class Store:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else loraforge_home() / "store"
        for sub in ("blocks", "pins", "records", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._made_dirs: set[Path] = set()

    # --- locking and temporaries -------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, exclusive: bool = False):
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if exclusive:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._clean_tmp()
            else:
                try:  # alone? then every temporary was left by a dead process
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._clean_tmp()
                except BlockingIOError:
                    pass
                fcntl.flock(fd, fcntl.LOCK_SH)  # not an atomic downgrade: a gc may pass first, harmlessly
            yield
        finally:
            os.close(fd)  # releases the lock

    def _clean_tmp(self) -> None:
        """Deletes temporaries; call with the lock held exclusively. Live work directories hold their
        own lock and are kept."""
        for entry in os.scandir(self.root / "tmp"):
            if entry.is_dir(follow_symlinks=False):
                if _in_use(Path(entry.path) / ".lock"):
                    continue
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    @contextlib.contextmanager
    def workdir(self) -> Iterator[Path]:
        """A fresh empty directory inside the store (same file system), deleted afterwards: a job writes
        its result there and adds it; if the process dies, the next cleanup deletes it."""
        with self._locked():
            path = Path(tempfile.mkdtemp(prefix="work-", dir=self.root / "tmp"))
            lock = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(lock, fcntl.LOCK_EX)
        work = path / "work"
        work.mkdir()
        try:
            yield work
        finally:
            shutil.rmtree(path, ignore_errors=True)
            os.close(lock)

    # --- blocks ------------------------------------------------------------------------------

    def _path(self, cid: str) -> Path:
        name = to_v1(cid)
        return self.root / "blocks" / name[-2:] / name

    def _put(self, block: Block) -> None:
        path = self._path(block.cid)
        if path.exists():  # same name, same bytes (fsck checks that)
            return
        if path.parent not in self._made_dirs:
            path.parent.mkdir(exist_ok=True)
            self._made_dirs.add(path.parent)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", suffix=".block")
        try:
            with open(fd, "wb") as f:
                for part in block.parts:
                    f.write(part)
                os.fchmod(f.fileno(), 0o444)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def get_block(self, cid: str) -> bytes:
        """A block's bytes, checked against its CID (NotFound if absent, DataError if damaged)."""
        try:
            data = self._path(cid).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{cid} is not in the store {self.root}") from None
        if hashlib.sha256(data).digest() != parse_cid(cid)[2]:
            raise DataError(f"block {to_v1(cid)} in {self.root} is damaged; `fsck` lists damaged blocks")
        return data

    def has(self, cid: str) -> bool:
        """Whether the store holds the block `cid` (its root block; verify_object checks the rest)."""
        return self._path(cid).exists()

    def _children(self, cid: str, data: bytes | None = None) -> list[str]:
        if parse_cid(cid)[1] == RAW:
            return []
        if data is None:
            with open(self._path(cid), "rb") as f:
                # Canonical dag-pb puts Links (field 2) before Data (field 1): a block that starts
                # with Data (0x0a) has no links, so a 256 KiB v0 leaf need not be read.
                if f.read(1) == b"\x0a":
                    return []
            data = self._path(cid).read_bytes()
        return [cid_from_bytes(link.cid) for link in unixfs.decode(data).links]

    def _walk(self, root: str) -> Iterator[Block]:
        """The DAG's blocks, checked, root first, depth first, each once."""
        seen, stack = set(), [root]
        while stack:
            cid = stack.pop()
            if to_v1(cid) in seen:
                continue
            seen.add(to_v1(cid))
            data = self.get_block(cid)
            yield Block(cid, (data,))
            stack.extend(reversed(self._children(cid, data)))

    # --- adding --------------------------------------------------------------------------------

    def add(self, path: str | Path, cid_version: int = 0, hidden: bool = False, pin: bool = True) -> str:
        """Adds a file or directory (as `ipfs add -r`, see loraforge.jobs.cid) and returns its CID."""
        with self._locked():
            root = None
            for block in iter_blocks(path, cid_version, hidden):
                self._put(block)
                root = block.cid
            if pin:
                self._mark("pins", root)
        return root

    def _mark(self, kind: str, cid: str) -> None:
        # An empty file appears whole or not at all.
        with open(self.root / kind / cid, "ab"):
            pass

    def pin(self, cid: str) -> None:
        """Keeps `cid` (and everything under it) through gc."""
        with self._locked():
            if not self.has(cid):
                raise NotFound(f"{cid} is not in the store {self.root}")
            self._mark("pins", cid)

    def unpin(self, cid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / "pins" / cid)

    def pins(self) -> list[str]:
        return sorted(os.listdir(self.root / "pins"))

    # --- records -------------------------------------------------------------------------------

    def put_record(self, record: dict) -> str:
        """Stores a job record; returns its CID (a raw CIDv1 of its canonical JSON)."""
        data = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        cid = make_cid(hashlib.sha256(data).digest(), RAW, 1)
        with self._locked():
            self._put(Block(cid, (data,)))
            self._mark("records", cid)
        return cid

    def get_record(self, cid: str) -> dict:
        if not (self.root / "records" / cid).exists():
            raise NotFound(f"no job record {cid} in {self.root}")
        return json.loads(self.get_block(cid))

    def records(self) -> list[str]:
        return sorted(os.listdir(self.root / "records"))

    def remove_record(self, cid: str) -> None:
        """Forgets a record (gc then frees what only it kept)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / "records" / cid)

    # --- reading out ---------------------------------------------------------------------------

    def export_dir(self, cid: str, dest: str | Path) -> Path:
        """Rebuilds the file or directory `cid` at `dest` (which must not exist), exactly: same names,
        same bytes. Built beside `dest` and renamed into place, so `dest` appears complete or not at all."""
        dest = Path(dest)
        if dest.exists() or dest.is_symlink():
            raise UserError(f"{dest} already exists; export into a new path")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            with self._locked():
                self._materialize(cid, tmp / "out")
            os.rename(tmp / "out", dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def _materialize(self, cid: str, path: Path) -> None:
        data = self.get_block(cid)
        if parse_cid(cid)[1] == RAW:
            path.write_bytes(data)
            return
        node = unixfs.decode(data)
        if node.type == unixfs.DIRECTORY:
            path.mkdir()
            for link in node.links:
                name = os.fsdecode(link.name)
                if name in ("", ".", "..") or "/" in name or "\0" in name:
                    raise DataError(f"directory {cid} has an unsafe entry name {name!r}")
                self._materialize(cid_from_bytes(link.cid), path / name)
        elif node.type == unixfs.FILE:
            with open(path, "wb") as f:
                for chunk in self._file_data(cid, node):
                    f.write(chunk)
        else:
            raise DataError(f"{cid} is a UnixFS node of type {node.type}, which loraforge does not export")

    def _file_data(self, cid: str, node: unixfs.Node) -> Iterator[bytes]:
        yield node.data
        for link in node.links:
            child = cid_from_bytes(link.cid)
            data = self.get_block(child)
            if parse_cid(child)[1] == RAW:
                yield data
            else:
                yield from self._file_data(child, unixfs.decode(data))

    def export_car(self, cid: str, dest: str | Path) -> Path:
        """Writes the DAG `cid` as a CARv1 file (root first), atomically."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with open(fd, "wb") as f, self._locked():
                car.write_car(f, [cid], self._walk(cid))
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return dest

    # --- checking and collecting ---------------------------------------------------------------

    def verify_object(self, cid: str) -> bool:
        """Whether every block of the DAG `cid` is present and matches its CID."""
        try:
            for _ in self._walk(cid):
                pass
        except (NotFound, DataError):
            return False
        return True

    def _block_files(self) -> Iterator[os.DirEntry]:
        for shard in os.scandir(self.root / "blocks"):
            if shard.is_dir(follow_symlinks=False):
                yield from os.scandir(shard.path)

    def fsck(self, remove: bool = False) -> list[str]:
        """Every stored block whose bytes no longer hash to its name (CIDv1 form), sorted; deleted too
        if `remove`, so that adding the content again restores them. Also clears dead temporaries."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._clean_tmp()
        finally:
            os.close(fd)
        bad = []
        for entry in self._block_files():
            try:
                with open(entry.path, "rb") as f:
                    ok = (
                        is_cid(entry.name)
                        and hashlib.file_digest(f, "sha256").digest() == parse_cid(entry.name)[2]
                    )
            except FileNotFoundError:  # removed by a gc meanwhile
                continue
            if not ok:
                bad.append(entry.name)
                if remove:
                    os.unlink(entry.path)
        return sorted(bad)

    def gc(self) -> list[str]:
        """Deletes every block that no pin and no record reaches; returns their CIDs (v1 form)."""
        with self._locked(exclusive=True):
            roots = [name for name in self.pins() + self.records() if is_cid(name)]
            for record in self.records():
                with contextlib.suppress(NotFound, DataError, ValueError):
                    roots += [s for s in _strings(json.loads(self.get_block(record))) if is_cid(s)]
            live = set()
            stack = [to_v1(r) for r in roots]
            while stack:
                cid = stack.pop()
                if cid in live:
                    continue
                live.add(cid)
                with contextlib.suppress(FileNotFoundError, DataError):  # missing or damaged: nothing below
                    stack.extend(to_v1(c) for c in self._children(cid))
            removed = []
            for entry in self._block_files():
                if entry.name not in live:
                    os.unlink(entry.path)
                    removed.append(entry.name)
        return sorted(removed)


def _in_use(lock_path: Path) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
