"""A local content-addressed store of files, directories and job records, named by their IPFS CIDs.

Layout under the root (default: $LORAFORGE_HOME/store, else $XDG_CACHE_HOME/loraforge/store, else
~/.cache/loraforge/store)::

    files/<xy>/<cid>    a file's bytes, named by the file's CID (the root of its UnixFS DAG)
    dirs/<xy>/<cid>     a directory's dag-pb block (its entries' names and CIDs)
    records/<cid>       a job record: canonical JSON, named by its raw CIDv1
    pins/<cid>          empty files: roots kept by gc (add pins what it adds, as `ipfs add` does)
    exports/<cid>       read-only copies of objects for code that needs a path (`materialize`): a
                        cache, rebuilt from the objects when missing; gc drops those it frees
    tmp/                temporaries and work directories; never read as objects
    lock                the fcntl lock (see below)

<xy> is the CID's last two characters; objects are read-only once written. Names are the CIDs as
made (``Qm…`` for CIDv0, ``bafy…``/``bafk…`` for v1): the version says how a file was chunked.

Why files and not blocks: a 7 GB model is 28,000 blocks of 256 KiB, and creating a file costs far
more than writing 256 KiB into one, so add writes each file once, in the pass that hashes it, and
export_dir copies it back; the blocks of a file (v0 leaves, inner nodes) are rebuilt from its bytes
when a CAR needs them, which also checks them. fsck re-derives every file's CID from its bytes.

Safety. Every object appears by os.replace of a finished temporary, so a killed process never leaves
half an object visible; it may leave temporaries, which the next writer that finds itself alone
(or fsck, or gc) deletes. Writers (add, put_record, pin, export) hold a shared flock on `lock`;
gc holds it exclusively, so it never deletes the objects of an add in progress. Two writers never
conflict: both write whole files named by content, and the same name means the same bytes.
Objects are not fsynced one by one (durability against process kills is what rename gives; fsync
would cost most of add's speed): a power cut can lose or damage recent objects, which fsck then
reports and `fsck(remove=True)` clears for a re-add.

A record is JSON (any dict: module, version, params, input and result CIDs, environment, metrics,
log, timings), stored canonically (sorted keys, no spaces, UTF-8) and named by the raw CIDv1 of those
bytes. Every string in a record that is a CID keeps that object alive through gc.
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
from typing import BinaryIO

from loraforge.errors import DataError, NotFound, UserError
from loraforge.jobs import car, unixfs
from loraforge.jobs.cid import RAW, Block, cid_from_bytes, cid_of, is_cid, iter_blocks, make_cid, parse_cid


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
        for sub in ("files", "dirs", "records", "pins", "exports", "tmp"):
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

    # --- objects -------------------------------------------------------------------------------

    def _path(self, kind: str, cid: str) -> Path:
        parse_cid(cid)  # DataError for anything else: a CID is a safe file name, "../x" is not
        if kind == "records":
            return self.root / kind / cid
        return self.root / kind / cid[-2:] / cid

    def _kind(self, cid: str) -> str | None:
        """ "dirs", "files", "records", or None when the store does not hold `cid`."""
        for kind in ("dirs", "files", "records"):
            if self._path(kind, cid).exists():
                return kind
        return None

    def _publish(self, tmp: str, path: Path) -> None:
        """Makes a finished temporary visible under its CID name, read-only; the same name already
        there means the same bytes, so the temporary is then dropped."""
        if path.exists():
            os.unlink(tmp)
            return
        os.chmod(tmp, 0o444)
        if path.parent not in self._made_dirs:
            path.parent.mkdir(exist_ok=True)
            self._made_dirs.add(path.parent)
        os.replace(tmp, path)

    def _put(self, path: Path, data: bytes) -> None:
        if path.exists():
            return
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        with _removed_on_error(tmp):
            with open(fd, "wb") as f:
                f.write(data)
            self._publish(tmp, path)

    @contextlib.contextmanager
    def _file_sink(self, source: Path):
        """Where add copies a file while hashing it: a temporary, published as files/<cid> when done."""
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        with _removed_on_error(tmp), open(fd, "wb") as f:

            def publish(cid: str) -> None:
                f.close()
                self._publish(tmp, self._path("files", cid))

            yield _Sink(f, publish)

    def _read_checked(self, kind: str, cid: str) -> bytes:
        """A directory's block or a record, checked against its CID."""
        try:
            data = self._path(kind, cid).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{cid} is not in the store {self.root}") from None
        if hashlib.sha256(data).digest() != parse_cid(cid)[2]:
            raise DataError(f"{cid} in {self.root} is damaged; `fsck` lists damaged objects")
        return data

    def _entries(self, cid: str) -> list[tuple[str, str]]:
        """(name, CID) of each entry of the directory `cid`."""
        links = unixfs.decode(self._read_checked("dirs", cid)).links
        return [(os.fsdecode(link.name), cid_from_bytes(link.cid)) for link in links]

    def has(self, cid: str) -> bool:
        """Whether the store holds the file, directory or record `cid` (not its entries: see verify_object)."""
        return self._kind(cid) is not None

    # --- adding --------------------------------------------------------------------------------

    def add(self, path: str | Path, cid_version: int = 0, hidden: bool = False, pin: bool = True) -> str:
        """Adds a file or directory (as `ipfs add -r`, see loraforge.jobs.cid) and returns its CID.

        Each file is copied in the same pass that hashes it; only directory nodes are kept as blocks
        (a file's leaves and inner nodes are rebuilt from its bytes when a CAR needs them)."""
        with self._locked():
            root = None
            for block in iter_blocks(path, cid_version, hidden, sink_for=self._file_sink):
                if block.directory:
                    self._put(self._path("dirs", block.cid), block.data)
                root = block.cid
            if pin:
                self._mark("pins", root)
        return root

    def _mark(self, kind: str, cid: str) -> None:
        # An empty file appears whole or not at all.
        parse_cid(cid)
        with open(self.root / kind / cid, "ab"):
            pass

    def pin(self, cid: str) -> None:
        """Keeps `cid` (and everything under it) through gc."""
        with self._locked():
            if not self.has(cid):
                raise NotFound(f"{cid} is not in the store {self.root}")
            self._mark("pins", cid)

    def unpin(self, cid: str) -> None:
        parse_cid(cid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / "pins" / cid)

    def pins(self) -> list[str]:
        return sorted(os.listdir(self.root / "pins"))

    # --- records -------------------------------------------------------------------------------

    def put_record(self, record: dict) -> str:
        """Stores a job record; returns its CID (a raw CIDv1 of its canonical JSON)."""
        try:
            text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise UserError(f"a job record must be JSON (dicts, lists, strings, numbers): {e}") from None
        data = text.encode()
        cid = make_cid(hashlib.sha256(data).digest(), RAW, 1)
        with self._locked():
            self._put(self._path("records", cid), data)
        return cid

    def get_record(self, cid: str) -> dict:
        if not self._path("records", cid).exists():
            raise NotFound(f"no job record {cid} in {self.root}")
        return json.loads(self._read_checked("records", cid))

    def records(self) -> list[str]:
        return sorted(os.listdir(self.root / "records"))

    def remove_record(self, cid: str) -> None:
        """Forgets a record (gc then frees what only it kept)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path("records", cid))

    # --- reading out ---------------------------------------------------------------------------

    def export_dir(self, cid: str, dest: str | Path) -> Path:
        """Rebuilds the file or directory `cid` at `dest` (which must not exist), exactly: same names,
        same bytes, every file checked against its CID on the way. Built beside `dest` and renamed
        into place, so `dest` appears complete or not at all."""
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

    def materialize(self, cid: str, name: str | None = None) -> Path:
        """A local path holding the file or directory `cid`, for code that reads paths (an adapter, a
        training set): ``exports/<cid>`` for a directory, ``exports/<cid>/<name or cid>`` for a file
        (a file has no name of its own; give one when its suffix matters, e.g. ``images.zip``).
        Exported once (checked against the CID), then reused; read-only."""
        kind = self._kind(cid)
        if kind not in ("dirs", "files"):
            raise NotFound(f"{cid} is not a file or directory in the store {self.root}")
        home = self.root / "exports" / cid
        target = home if kind == "dirs" else home / (name or cid)
        if target.exists():
            return target
        with self._locked():  # temporaries are safe from cleanup only while the lock is held
            tmp = Path(tempfile.mkdtemp(prefix="export-", dir=self.root / "tmp"))
            try:
                if kind == "dirs":
                    self._materialize(cid, tmp / "out")
                else:
                    (tmp / "out").mkdir()
                    self._materialize(cid, tmp / "out" / target.name)
                _read_only(tmp / "out")
                if kind == "files" and home.is_dir():  # the same file under another name: add it beside
                    with contextlib.suppress(FileExistsError):
                        os.link(tmp / "out" / target.name, target)
                    return target
                try:
                    os.rename(tmp / "out", home)
                except OSError as e:  # another process exported it meanwhile: same content
                    if not home.exists():
                        raise UserError(f"cannot export {cid} to {home}: {e}") from e
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            return self.materialize(cid, name)
        return target

    def _materialize(self, cid: str, path: Path) -> None:
        kind = self._kind(cid)
        if kind == "dirs":
            path.mkdir()
            for name, child in self._entries(cid):
                if name in ("", ".", "..") or "/" in name or "\0" in name:
                    raise DataError(f"directory {cid} has an unsafe entry name {name!r}")
                self._materialize(child, path / name)
        elif kind == "files":
            with open(path, "wb") as out:
                self._check_file(cid, out)
        else:
            raise NotFound(f"{cid} is not a file or directory in the store {self.root}")

    def _file_blocks(self, cid: str, out: BinaryIO | None = None) -> Iterator[Block]:
        """The blocks of the stored file `cid`, rebuilt from its bytes (copied to `out` on the way);
        DataError at the end if they no longer make `cid`."""
        copy = (lambda _path: contextlib.nullcontext(_Sink(out))) if out else None
        blocks = iter_blocks(self._path("files", cid), _version(cid), sink_for=copy)
        block = None
        for block in blocks:
            yield block
        if block.cid != cid:
            raise DataError(f"file {cid} in {self.root} is damaged; `fsck` lists damaged objects")

    def _check_file(self, cid: str, out: BinaryIO | None = None) -> None:
        for _ in self._file_blocks(cid, out):
            pass

    def _walk(self, cid: str, seen: set[str]) -> Iterator[Block]:
        """Every block of the DAG `cid`, each once: a directory before its entries, a file's leaves first."""
        if cid in seen:  # a file or subdirectory seen before: so were all its blocks
            return
        kind = self._kind(cid)
        if kind == "dirs":
            seen.add(cid)
            yield Block(cid, (self._read_checked("dirs", cid),), directory=True)
            for _, child in self._entries(cid):
                yield from self._walk(child, seen)
        elif kind == "files":
            for block in self._file_blocks(cid):
                if block.cid not in seen:
                    seen.add(block.cid)
                    yield block
        else:
            raise NotFound(f"{cid} is not a file or directory in the store {self.root}")

    def export_car(self, cid: str, dest: str | Path) -> Path:
        """Writes the DAG `cid` as a CARv1 file, every block checked, atomically."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        with _removed_on_error(tmp):
            with open(fd, "wb") as f, self._locked():
                car.write_car(f, [cid], self._walk(cid, set()))
            os.replace(tmp, dest)
        return dest

    # --- checking and collecting ---------------------------------------------------------------

    def verify_object(self, cid: str) -> bool:
        """Whether the file, directory or record `cid`, and everything under it, is present and intact."""
        try:
            if self._kind(cid) == "records":
                self._read_checked("records", cid)
            else:
                for _ in self._walk(cid, set()):
                    pass
        except (NotFound, DataError):
            return False
        return True

    def _objects(self) -> Iterator[tuple[str, Path]]:
        """(kind, path) of every stored file and directory."""
        for kind in ("dirs", "files"):
            for shard in os.scandir(self.root / kind):
                if shard.is_dir(follow_symlinks=False):
                    for entry in os.scandir(shard.path):
                        yield kind, Path(entry.path)

    def fsck(self, remove: bool = False) -> list[str]:
        """The CIDs of the stored files, directories and records whose bytes no longer make their CID,
        sorted; deleted too if `remove`, so that adding the content again restores them. Also clears
        dead temporaries."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._clean_tmp()
        finally:
            os.close(fd)
        objects = [*self._objects(), *(("records", self._path("records", c)) for c in self.records())]
        bad = []
        for kind, path in objects:
            cid = path.name
            try:
                if kind == "files":
                    ok = is_cid(cid) and cid_of(path, _version(cid)) == cid
                else:
                    with open(path, "rb") as f:
                        ok = is_cid(cid) and hashlib.file_digest(f, "sha256").digest() == parse_cid(cid)[2]
            except FileNotFoundError:  # removed by a gc meanwhile
                continue
            except UserError:  # e.g. a directory's entry where a file should be
                ok = False
            if not ok:
                bad.append(cid)
                if remove:
                    os.unlink(path)
        return sorted(bad)

    def gc(self) -> list[str]:
        """Deletes every file and directory that no pin and no record reaches; returns their CIDs."""
        with self._locked(exclusive=True):
            roots = [name for name in self.pins() + self.records() if is_cid(name)]
            for record in self.records():
                with contextlib.suppress(NotFound, DataError, ValueError):
                    roots += [s for s in _strings(self.get_record(record)) if is_cid(s)]
            live, stack = set(), roots
            while stack:
                cid = stack.pop()
                if cid in live:
                    continue
                live.add(cid)
                if self._path("dirs", cid).exists():
                    with contextlib.suppress(DataError):  # damaged: nothing below it is reachable
                        stack.extend(child for _, child in self._entries(cid))
            removed = []
            for _, path in self._objects():
                if path.name not in live:
                    os.unlink(path)
                    removed.append(path.name)
            for entry in os.scandir(self.root / "exports"):
                if entry.name not in live:
                    _remove_tree(Path(entry.path))
        return sorted(removed)


class _Sink:
    """A cid.FileSink: a file's bytes go to `out`, then its CID to `on_done`."""

    def __init__(self, out: BinaryIO, on_done=None):
        self.out, self.on_done = out, on_done

    def write(self, chunk: bytes) -> None:
        self.out.write(chunk)

    def done(self, cid: str) -> None:
        if self.on_done:
            self.on_done(cid)


def _version(cid: str) -> int:
    return parse_cid(cid)[0]


@contextlib.contextmanager
def _removed_on_error(tmp: str):
    try:
        yield
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_only(path: Path) -> None:
    for directory, _, files in os.walk(path):
        for name in files:
            os.chmod(os.path.join(directory, name), 0o444)


def _remove_tree(path: Path) -> None:
    """Removes an export (whose files are read-only, in writable directories)."""
    shutil.rmtree(path, ignore_errors=True)


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
