"""CARv1 export: the header is the spec's dag-cbor, and a CAR read back gives every block of the DAG,
each hashing to its CID, with the right root. (By hand, once: npm's ipfs-car 1.x `roots`, `ls` and
`unpack` read both CID versions' CARs into the same files.)"""

from __future__ import annotations

import hashlib
import io
import random

import pytest

from loraforge.errors import DataError
from loraforge.jobs import car
from loraforge.jobs.cid import CHUNK_SIZE, MAX_LINKS, add_path, cid_to_bytes, iter_blocks, parse_cid
from loraforge.jobs.store import Store


def test_header_bytes():
    root = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"  # the empty directory
    expected = (
        b"\xa2"  # map(2)
        + b"\x65roots"  # text(5)
        + b"\x81"  # array(1)
        + b"\xd8\x2a"  # tag(42)
        + b"\x58\x23\x00"  # bytes(35): the 0x00 multibase prefix, then the 34-byte CIDv0
        + cid_to_bytes(root)
        + b"\x67version"  # text(7)
        + b"\x01"
    )
    assert car.header([root]) == expected
    out = io.BytesIO()
    car.write_car(out, [root], [])
    assert out.getvalue() == bytes([len(expected)]) + expected


@pytest.fixture
def content(tmp_path):
    root = tmp_path / "content"
    (root / "sub").mkdir(parents=True)
    (root / "big.bin").write_bytes(random.Random(5).randbytes(MAX_LINKS * CHUNK_SIZE + 2 * CHUNK_SIZE + 1))
    (root / "sub" / "small.txt").write_bytes(b"small\n")
    (root / "sub" / "same.txt").write_bytes(b"small\n")  # a block linked twice is written once
    (root / "empty").write_bytes(b"")
    return root


def check_car(data: bytes, root: str, blocks: dict[str, bytes]) -> None:
    roots, sections = car.read_car(io.BytesIO(data))
    assert roots == [root]
    seen = {}
    for cid, block in sections:
        assert hashlib.sha256(block).digest() == parse_cid(cid)[2], cid
        assert cid not in seen
        seen[cid] = block
    assert seen == blocks
    assert next(iter(seen)) == root  # root first


@pytest.mark.parametrize("version", [0, 1])
def test_car_round_trip(content, tmp_path, version):
    root, blocks = add_path(content, cid_version=version)
    # Straight from the importer (children first, so a duplicate block comes twice: drop repeats).
    out = io.BytesIO()
    unique = {}
    for block in iter_blocks(content, cid_version=version):
        unique.setdefault(block.cid, block)
    car.write_car(out, [root], [unique[root], *(b for c, b in unique.items() if c != root)])
    check_car(out.getvalue(), root, blocks)
    # From the store: root first, depth first, each block once.
    store = Store(tmp_path / "store")
    assert store.add(content, cid_version=version) == root
    path = store.export_car(root, tmp_path / "out.car")
    check_car(path.read_bytes(), root, blocks)


def test_truncated_car(content, tmp_path):
    store = Store(tmp_path / "store")
    root = store.add(content)
    data = store.export_car(root, tmp_path / "x.car").read_bytes()
    with pytest.raises(DataError, match="truncated"):
        list(car.read_car(io.BytesIO(data[:-10]))[1])
    with pytest.raises(DataError):
        car.read_car(io.BytesIO(b""))
