"""dag-pb nodes and the UnixFS data inside them: encoding and decoding, nothing else.

dag-pb (multicodec 0x70) is protobuf::

    message PBLink { optional bytes Hash = 1; optional string Name = 2; optional uint64 Tsize = 3; }
    message PBNode { repeated PBLink Links = 2; optional bytes Data = 1; }

The canonical form, which every IPFS implementation hashes, writes the Links (field 2) *before*
Data (field 1), links sorted by Name (byte order) in directories, and every link with all three
fields, an empty Name included (as go-merkledag has always written them).

UnixFS is the protobuf inside PBNode.Data::

    message Data {
        required DataType Type = 1;      // Raw 0, Directory 1, File 2, Metadata 3, Symlink 4, HAMTShard 5
        optional bytes Data = 2;         // a file's bytes in a leaf
        optional uint64 filesize = 3;    // bytes of file data under this node
        repeated uint64 blocksizes = 4;  // file bytes under each link, in link order (not packed)
        ...                              // hashType, fanout, mode, mtime: not written by kubo's defaults
    }

kubo writes `filesize` on every File node (0 for an empty file), `blocksizes` on inner file nodes,
and neither on a Directory (whose Data is just ``08 01``).
"""

from __future__ import annotations

from typing import NamedTuple

from loraforge.errors import DataError

DIRECTORY = 1
FILE = 2


class Link(NamedTuple):
    cid: bytes  # binary CID (for v0: the bare multihash)
    name: bytes
    tsize: int  # this block's and all its descendants' block bytes


class Node(NamedTuple):
    links: list[Link]
    type: int  # UnixFS Type
    data: bytes  # UnixFS Data: a leaf's file bytes
    filesize: int | None
    blocksizes: list[int]


def varint(n: int) -> bytes:
    """Unsigned LEB128, as protobuf, multiformats and CAR use it."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(buf, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise DataError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _bytes_field(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def _int_field(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value)


def encode_link(link: Link) -> bytes:
    body = _bytes_field(1, link.cid) + _bytes_field(2, link.name) + _int_field(3, link.tsize)
    return _bytes_field(2, body)


def file_leaf_parts(chunk: bytes) -> tuple[bytes, bytes, bytes]:
    """A v0 leaf, PBNode{Data: UnixFS{Type: File, Data: chunk, filesize: len}}, as (head, chunk, tail),
    so that a 256 KiB chunk is hashed and written without being copied into a new buffer."""
    unixfs_head = _int_field(1, FILE)
    if chunk:  # the empty file has no Data field at all
        unixfs_head += varint(2 << 3 | 2) + varint(len(chunk))
    tail = _int_field(3, len(chunk))
    inner_len = len(unixfs_head) + len(chunk) + len(tail)
    return varint(1 << 3 | 2) + varint(inner_len) + unixfs_head, chunk, tail


def file_node(links: list[Link], blocksizes: list[int]) -> bytes:
    """An inner file node: the links, then UnixFS{Type: File, filesize, blocksizes}."""
    unixfs = _int_field(1, FILE) + _int_field(3, sum(blocksizes))
    unixfs += b"".join(_int_field(4, size) for size in blocksizes)
    return b"".join(encode_link(link) for link in links) + _bytes_field(1, unixfs)


def directory_node(links: list[Link]) -> bytes:
    """A directory: links sorted by name (bytes), then UnixFS{Type: Directory}."""
    links = sorted(links, key=lambda link: link.name)
    return b"".join(encode_link(link) for link in links) + _bytes_field(1, _int_field(1, DIRECTORY))


def _fields(buf: bytes):
    """(field number, value) of each field of a protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 2:
            size, pos = read_varint(buf, pos)
            if pos + size > len(buf):
                raise DataError("truncated protobuf field")
            value, pos = bytes(buf[pos : pos + size]), pos + size
        else:
            raise DataError(f"unexpected protobuf wire type {wire}")
        yield field, value


def decode(block: bytes) -> Node:
    """Parses a dag-pb block holding UnixFS data (any field order, as decoders must accept)."""
    links, unixfs = [], b""
    for field, value in _fields(block):
        if field == 2:
            parts = dict(_fields(value))
            links.append(Link(parts.get(1, b""), parts.get(2, b""), parts.get(3, 0)))
        elif field == 1:
            unixfs = value
    type_, data, filesize, blocksizes = None, b"", None, []
    for field, value in _fields(unixfs):
        if field == 1:
            type_ = value
        elif field == 2:
            data = value
        elif field == 3:
            filesize = value
        elif field == 4:
            blocksizes.append(value)
    if type_ is None:
        raise DataError("dag-pb block without UnixFS data")
    return Node(links, type_, data, filesize, blocksizes)
