"""CARv1 files: a DAG's blocks in one file, as `ipfs dag export` writes and `ipfs dag import` reads.

Layout (https://ipld.io/specs/transport/car/carv1/)::

    varint(len(header)) header
    varint(len(cid) + len(block)) cid block     (one section per block)

The header is dag-cbor: a map {"roots": [CID, ...], "version": 1}, keys in dag-cbor order (shorter
first), each CID as CBOR tag 42 on a byte string of 0x00 (the "identity" multibase prefix) + the
binary CID. Binary CIDs in sections are as in links: for CIDv0 the bare 34-byte multihash.
Each block is written once, in the order given (the store: a directory before its entries, a file's
leaves before the nodes above them); readers, `ipfs dag import` included, accept any order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import BinaryIO

from loraforge.errors import DataError
from loraforge.jobs.cid import Block, cid_from_bytes, cid_to_bytes
from loraforge.jobs.unixfs import read_varint, varint


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size):
            return bytes([major << 5 | info]) + value.to_bytes(size, "big")
    raise ValueError("integer too large for CBOR")


def _cbor_text(text: str) -> bytes:
    raw = text.encode()
    return _cbor_head(3, len(raw)) + raw


def header(roots: list[str]) -> bytes:
    """The dag-cbor header {"roots": [...], "version": 1}."""
    out = _cbor_head(5, 2) + _cbor_text("roots") + _cbor_head(4, len(roots))
    for root in roots:
        raw = b"\0" + cid_to_bytes(root)
        out += _cbor_head(6, 42) + _cbor_head(2, len(raw)) + raw
    return out + _cbor_text("version") + _cbor_head(0, 1)


def write_car(out: BinaryIO, roots: list[str], blocks: Iterable[Block]) -> int:
    """Writes a CARv1 of `blocks` (streamed, each written as it comes) to `out`; returns the bytes written."""
    head = header(roots)
    written = out.write(varint(len(head)) + head)
    for block in blocks:
        raw = cid_to_bytes(block.cid)
        written += out.write(varint(len(raw) + block.size) + raw)
        for part in block.parts:
            written += out.write(part)
    return written


def _cbor_item(buf: bytes, pos: int):
    """(value, next position) of one CBOR item: the subset dag-cbor headers use."""
    first = buf[pos]
    major, info = first >> 5, first & 31
    pos += 1
    if info < 24:
        value = info
    elif info <= 27:
        size = 1 << (info - 24)
        value = int.from_bytes(buf[pos : pos + size], "big")
        pos += size
    else:
        raise DataError("CAR header: indefinite-length CBOR is not dag-cbor")
    if major == 0:
        return value, pos
    if major in (2, 3):
        raw = buf[pos : pos + value]
        return (raw if major == 2 else raw.decode()), pos + value
    if major == 4:
        items = []
        for _ in range(value):
            item, pos = _cbor_item(buf, pos)
            items.append(item)
        return items, pos
    if major == 5:
        mapping = {}
        for _ in range(value):
            key, pos = _cbor_item(buf, pos)
            mapping[key], pos = _cbor_item(buf, pos)
        return mapping, pos
    if major == 6 and value == 42:
        raw, pos = _cbor_item(buf, pos)
        if not isinstance(raw, bytes) or raw[:1] != b"\0":
            raise DataError("CAR header: a CID must be a byte string starting with 0x00")
        return cid_from_bytes(raw[1:]), pos
    raise DataError(f"CAR header: unexpected CBOR major type {major}")


def _read_varint(f: BinaryIO) -> int | None:
    raw = bytearray()
    while True:
        byte = f.read(1)
        if not byte:
            if raw:
                raise DataError("CAR file truncated inside a varint")
            return None
        raw += byte
        if byte[0] < 0x80:
            return read_varint(raw, 0)[0]


def _read_exact(f: BinaryIO, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise DataError("CAR file truncated")
    return data


def read_car(f: BinaryIO) -> tuple[list[str], Iterator[tuple[str, bytes]]]:
    """(roots, iterator of (CID, block bytes)) of a CARv1. Blocks are not checked against their CIDs."""
    size = _read_varint(f)
    if size is None:
        raise DataError("empty CAR file")
    head, _ = _cbor_item(_read_exact(f, size), 0)
    if not isinstance(head, dict) or head.get("version") != 1 or not isinstance(head.get("roots"), list):
        raise DataError(f"not a CARv1 header: {head!r}")

    def sections():
        while (length := _read_varint(f)) is not None:
            section = _read_exact(f, length)
            cid_len = 34 if section[:2] == b"\x12\x20" else 36  # v0: bare multihash; v1: 1, codec, multihash
            yield cid_from_bytes(section[:cid_len]), section[cid_len:]

    return head["roots"], sections()
