"""IPFS content identifiers, computed the way `ipfs add -r` (kubo, default settings) computes them.

A CID names a block by its hash: <version><codec><multihash>. The multihash here is always sha2-256:
``0x12 0x20`` + the 32-byte digest. Two string forms:

- CIDv0, ``Qm…``: base58btc of the bare multihash; the codec is implicitly dag-pb.
- CIDv1, ``bafy…`` (dag-pb, 0x70) or ``bafk…`` (raw, 0x55): "b" (the multibase prefix of base32,
  lowercase, unpadded) + base32 of varint(1) varint(codec) multihash.

How a file or directory becomes blocks (kubo's defaults, matched byte for byte):

- Files are cut into fixed 262144-byte (256 KiB) chunks.
- cid_version=0: each chunk becomes a dag-pb leaf, PBNode{Data: UnixFS{File, Data: chunk, filesize}}.
  cid_version=1 (which implies kubo's --raw-leaves): each chunk is a raw block (codec 0x55) as is.
- A one-chunk file is its leaf; the empty file is a leaf with no data (v0: UnixFS{File, filesize: 0},
  ``QmbFMke1…``; v1: the empty raw block, ``bafkreihdwdcefgh4…``).
- Bigger files form a balanced DAG: inner nodes of at most 174 links, filled left to right, each a
  PBNode whose UnixFS{File} carries `filesize` and one `blocksizes` entry (file bytes) per link.
- A directory is PBNode{Links sorted by name (bytes), Data: UnixFS{Directory}}, no size fields.
- Every link's Tsize is the linked block's size plus all of its descendants' block sizes.
- Names starting with "." inside a directory are skipped, as `ipfs add -r` does without --hidden
  (pass hidden=True to include them); the path given is added whatever its name.
- A directory whose links' estimated size (kubo's estimate: the sum of name length + binary CID
  length) reaches 262144 becomes a HAMT shard in kubo (tested: one byte less stays plain); such
  directories are refused here with a UserError. Symbolic links and special files are refused too (kubo would
  store a symlink as the link, not the file it points to, which is rarely what a job wants).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections import deque
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple, Protocol

from loraforge.errors import DataError, NotFound, UserError
from loraforge.jobs import unixfs
from loraforge.jobs.unixfs import Link

CHUNK_SIZE = 262144
MAX_LINKS = 174
SHARDING_THRESHOLD = 262144
SHA2_256 = 0x12
DAG_PB = 0x70
RAW = 0x55

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))  # each leading zero byte is a leading "1"
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for char in text:
        digit = _B58.find(char)
        if digit < 0:
            raise ValueError(f"{char!r} is not a base58btc digit")
        n = n * 58 + digit
    pad = len(text) - len(text.lstrip("1"))
    return b"\0" * pad + n.to_bytes((n.bit_length() + 7) // 8, "big")


def make_cid(digest: bytes, codec: int = DAG_PB, version: int = 0) -> str:
    """The CID string of a sha2-256 `digest`."""
    multihash = bytes([SHA2_256, 32]) + digest
    if version == 0:
        if codec != DAG_PB:
            raise ValueError("CIDv0 can only name dag-pb blocks")
        return b58encode(multihash)
    raw = unixfs.varint(1) + unixfs.varint(codec) + multihash
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


def parse_cid(cid: str) -> tuple[int, int, bytes]:
    """(version, codec, sha2-256 digest) of a CID string; DataError if it is not one this module makes."""
    try:
        if len(cid) == 46 and cid.startswith("Qm"):
            version, codec, multihash = 0, DAG_PB, b58decode(cid)
        elif cid.startswith("b"):
            body = cid[1:].upper()
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
            version, pos = unixfs.read_varint(raw, 0)
            codec, pos = unixfs.read_varint(raw, pos)
            multihash = raw[pos:]
        else:
            raise ValueError("not a CIDv0 (Qm…) or base32 CIDv1 (b…)")
        if version not in (0, 1) or codec not in (DAG_PB, RAW):
            raise ValueError(f"CID version {version}, codec {codec:#x}: not dag-pb or raw")
        if multihash[:2] != bytes([SHA2_256, 32]) or len(multihash) != 34:
            raise ValueError("not a sha2-256 multihash")
        if make_cid(multihash[2:], codec, version) != cid:  # one spelling per CID: it names files
            raise ValueError("not in canonical form (base32 CIDs are lowercase)")
    except (ValueError, DataError) as e:  # binascii.Error is a ValueError
        raise DataError(f"{cid!r} is not a CID: {e}") from None
    return version, codec, multihash[2:]


def is_cid(text: str) -> bool:
    try:
        parse_cid(text)
        return True
    except DataError:
        return False


def cid_to_bytes(cid: str) -> bytes:
    """The binary CID, as links and CAR files hold it (for v0: the bare multihash)."""
    version, codec, digest = parse_cid(cid)
    multihash = bytes([SHA2_256, 32]) + digest
    return multihash if version == 0 else unixfs.varint(1) + unixfs.varint(codec) + multihash


def cid_from_bytes(raw: bytes) -> str:
    if raw[:2] == bytes([SHA2_256, 32]) and len(raw) == 34:
        return make_cid(raw[2:], DAG_PB, 0)
    version, pos = unixfs.read_varint(raw, 0)
    codec, pos = unixfs.read_varint(raw, pos)
    if version != 1 or raw[pos : pos + 2] != bytes([SHA2_256, 32]) or len(raw) != pos + 34:
        raise DataError(f"unsupported binary CID {raw.hex()}")
    return make_cid(raw[pos + 2 :], codec, 1)


def to_v1(cid: str) -> str:
    """The same block named by a CIDv1 (``Qm…`` -> ``bafy…``); a CIDv1 is returned unchanged."""
    _, codec, digest = parse_cid(cid)
    return make_cid(digest, codec, 1)


def digest_of(parts) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


class Block(NamedTuple):
    """One block: its CID and its bytes in pieces (a 256 KiB chunk is never copied to prepend a header)."""

    cid: str
    parts: tuple[bytes, ...]
    directory: bool = False  # a directory's node (the others are a file's leaves and inner nodes)

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)


class FileSink(Protocol):
    """Receives a file's bytes as they are read, then the file's CID (see iter_blocks' `sink_for`)."""

    def write(self, chunk: bytes) -> object: ...

    def done(self, cid: str) -> None: ...


class _Added(NamedTuple):
    cid: str
    link: Link  # name left empty: the parent names it
    filesize: int  # file bytes under it (files only)


class _Builder:
    def __init__(self, cid_version: int, hidden: bool, sink_for=None):
        if cid_version not in (0, 1):
            raise UserError(f"cid_version must be 0 or 1, not {cid_version!r}")
        self.version = cid_version
        self.hidden = hidden
        self.sink_for = sink_for

    def block(self, parts: tuple[bytes, ...], codec: int, filesize: int, below: int = 0, directory=False):
        """Yields the block; returns what a parent needs to link to it."""
        cid = make_cid(digest_of(parts), codec, self.version)
        yield Block(cid, parts, directory)
        size = sum(len(p) for p in parts)
        return _Added(cid, Link(cid_to_bytes(cid), b"", size + below), filesize)

    def leaf(self, chunk: bytes):
        if self.version == 1:  # raw leaves
            return (yield from self.block((chunk,), RAW, len(chunk)))
        return (yield from self.block(unixfs.file_leaf_parts(chunk), DAG_PB, len(chunk)))

    def parent(self, children: list[_Added]):
        sizes = [c.filesize for c in children]
        data = unixfs.file_node([c.link for c in children], sizes)
        return (yield from self.block((data,), DAG_PB, sum(sizes), sum(c.link.tsize for c in children)))

    def file(self, path: Path) -> Generator[Block, None, _Added]:
        # levels[0] holds leaves waiting for a parent, levels[1] their parents, and so on. A level is
        # closed into a parent as soon as it has MAX_LINKS links; at the end, what is left is closed
        # bottom-up. This builds the same tree as kubo's top-down balanced layout, with at most
        # 174 pending links per level in memory.
        levels: list[list[_Added]] = [[]]
        sink = self.sink_for(path) if self.sink_for else contextlib.nullcontext()
        with open(path, "rb", buffering=0) as f, sink as out:
            chunk = _read_full(f, CHUNK_SIZE)
            while True:
                if out is not None:
                    out.write(chunk)
                levels[0].append((yield from self.leaf(chunk)))
                depth = 0
                while len(levels[depth]) == MAX_LINKS:
                    yield from self.close(levels, depth)
                    depth += 1
                chunk = _read_full(f, CHUNK_SIZE)
                if not chunk:
                    break
            depth = 0
            while len(levels[depth]) != 1 or any(levels[depth + 1 :]):
                if levels[depth]:
                    yield from self.close(levels, depth)
                depth += 1
            if out is not None:
                out.done(levels[depth][0].cid)
        return levels[depth][0]

    def close(self, levels: list[list[_Added]], depth: int):
        """Replaces the links pending at `depth` by one parent pending at `depth + 1`."""
        node = yield from self.parent(levels[depth])
        levels[depth] = []
        if depth + 1 == len(levels):
            levels.append([])
        levels[depth + 1].append(node)

    def directory(self, path: Path) -> Generator[Block, None, _Added]:
        entries = sorted(os.scandir(path), key=lambda e: os.fsencode(e.name))
        if not self.hidden:
            entries = [e for e in entries if not e.name.startswith(".")]
        cid_len = 34 if self.version == 0 else 36
        estimate = sum(len(os.fsencode(e.name)) + cid_len for e in entries)
        if estimate >= SHARDING_THRESHOLD:
            raise UserError(
                f"{path} has {len(entries)} entries: IPFS would store it as a sharded (HAMT) directory, "
                "which loraforge does not write; split it into subdirectories"
            )
        links = []
        for entry in entries:
            child = yield from self.any(Path(entry.path))
            links.append(child.link._replace(name=os.fsencode(entry.name)))
        data = unixfs.directory_node(links)
        return (yield from self.block((data,), DAG_PB, 0, sum(link.tsize for link in links), directory=True))

    def any(self, path: Path) -> Generator[Block, None, _Added]:
        if path.is_symlink():
            raise UserError(f"{path} is a symbolic link; loraforge adds regular files and directories only")
        if path.is_dir():
            return (yield from self.directory(path))
        if path.is_file():
            return (yield from self.file(path))
        if not path.exists():
            raise NotFound(f"no such file or directory: {path}")
        raise UserError(f"{path} is not a regular file or directory")


def _read_full(f, size: int) -> bytes:
    """`size` bytes, fewer only at the end of the file (a read may return less before it)."""
    data = f.read(size)
    while data and len(data) < size:
        more = f.read(size - len(data))
        if not more:
            break
        data += more
    return data


def iter_blocks(
    path: str | Path,
    cid_version: int = 0,
    hidden: bool = False,
    sink_for: Callable[[Path], AbstractContextManager[FileSink]] | None = None,
) -> Iterator[Block]:
    """Every block of `path` (a file or a directory), children before parents: the last is the root.

    Streams: a file is read 256 KiB at a time and never held whole in memory. With `sink_for`, each
    file's bytes also go, as they are read, to the sink `sink_for(file path)` opens, which is then told
    the file's CID (so that a store copies a file in the same pass that hashes it)."""
    yield from _Builder(cid_version, hidden, sink_for).any(Path(path))


def cid_of(path: str | Path, cid_version: int = 0, hidden: bool = False) -> str:
    """The CID `ipfs add -r [--cid-version=1] --only-hash PATH` prints last (the root's)."""
    last = deque(iter_blocks(path, cid_version, hidden), maxlen=1)  # keeps only the newest block
    return last[0].cid


def add_path(path: str | Path, cid_version: int = 0, hidden: bool = False) -> tuple[str, dict[str, bytes]]:
    """(root CID, {CID: block bytes}) for `path`, all in memory: for small content; stores stream."""
    blocks = {}
    for block in iter_blocks(path, cid_version, hidden):
        blocks[block.cid] = block.data
    return block.cid, blocks
