"""loraforge.jobs.cid against the real kubo (v0.22, through kubo-python's shared library, see kubo.py).

kubo's AddFile gives CIDv0 only, so CIDv1 is checked three other ways: values that IPFS documents
and tools print for well-known content, the structure of the DAG, and kubo reading our v1 blocks
back (they are put into its blockstore and fetched with Download, which rebuilds the bytes).
"""

from __future__ import annotations

import base64
import random
import tempfile
from pathlib import Path

import kubo as kubo_oracle
import pytest

from loraforge.errors import UserError
from loraforge.jobs import cid, unixfs
from loraforge.jobs.cid import CHUNK_SIZE, MAX_LINKS, SHARDING_THRESHOLD, add_path, cid_of, iter_blocks


def data(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def kubo(tmp_path_factory):
    node = kubo_oracle.Kubo(tmp_path_factory.mktemp("kubo") / "repo")
    yield node
    node.close()


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_bytes(content)
    return root


@pytest.mark.parametrize(
    "size",
    [
        0,  # the empty file
        6,
        CHUNK_SIZE - 1,
        CHUNK_SIZE,  # exactly one chunk: still a single leaf
        CHUNK_SIZE + 1,  # two leaves under one root
        600_000,
        MAX_LINKS * CHUNK_SIZE,  # 174 leaves: one full inner node, depth 1 (45.6 MB)
        MAX_LINKS * CHUNK_SIZE + 12_345,  # one more leaf: depth 2
    ],
)
def test_file_cid_equals_kubo(kubo, tmp_path, size):
    path = tmp_path / "f.bin"
    path.write_bytes(data(size, seed=size))
    assert cid_of(path) == kubo.add(path)


def test_known_values():
    """CIDs that IPFS users know by heart, for content anyone can recreate."""
    from_file = {
        b"": (
            "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH",
            "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
        ),
        b"hello\n": (
            "QmZULkCELmmk5XNfCgTnCyFgAVxBRBXyDHGGMVoLFLiXEN",
            "bafkreicysg23kiwv34eg2d7qweipxwosdo2py4ldv42nbauguluen5v6am",
        ),
    }
    empty_dir = (
        "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn",
        "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354",
    )
    with tempfile.TemporaryDirectory() as tmp:
        for content, expected in from_file.items():
            path = Path(tmp) / "f"
            path.write_bytes(content)
            assert (cid_of(path), cid_of(path, cid_version=1)) == expected
        (Path(tmp) / "d").mkdir()
        assert (cid_of(Path(tmp) / "d"), cid_of(Path(tmp) / "d", cid_version=1)) == empty_dir


def test_directory_cid_equals_kubo(kubo, tmp_path):
    root = tree(
        tmp_path / "model",
        {
            "config.json": b'{"r": 8}\n',
            "adapter.safetensors": data(3 * CHUNK_SIZE + 77),
            "empty.txt": b"",
            "empty-dir/": b"",
            "nested/a/b/deep.bin": data(1000, 1),
            "nested/a/second.bin": data(CHUNK_SIZE, 2),
            # byte order, not alphabetical: "B" < "Z" < "a" < "a.b" < "a_b" < "ä" (0xC3...) < "日本"
            "names/a": b"1",
            "names/B": b"2",
            "names/Z": b"3",
            "names/a.b": b"4",
            "names/a_b": b"5",
            "names/ä": b"6",
            "names/日本語 ファイル.txt": b"unicode, with a space",
        },
    )
    assert cid_of(root) == kubo.add(root)
    assert cid_of(root / "nested") == kubo.add(root / "nested")


def test_hidden_files(kubo, tmp_path):
    """kubo-python's AddFile includes hidden files (like `ipfs add -r --hidden`); by default we skip them,
    like plain `ipfs add -r`, and so equal kubo on the same tree without them."""
    files = {"a.txt": b"a", "sub/b.txt": b"b"}
    hidden = {".git/config": b"x", "sub/.env": b"SECRET=1", ".hidden": b"h"}
    with_hidden = tree(tmp_path / "with", files | hidden)
    without = tree(tmp_path / "without", files)
    assert cid_of(with_hidden, hidden=True) == kubo.add(with_hidden)
    assert cid_of(with_hidden) == kubo.add(without) != kubo.add(with_hidden)
    # The path given is added whatever its name.
    assert cid_of(with_hidden / ".git") == kubo.add(with_hidden / ".git")


def _kubo_blocks(kubo) -> set[str]:
    return {p.name for p in kubo.blocks_dir.rglob("*.data")}


def _flatfs_key(block_cid: str) -> str:
    """kubo's flatfs names a block by its multihash, base32 uppercase, unpadded."""
    multihash = cid.cid_to_bytes(block_cid)[-34:]
    return base64.b32encode(multihash).decode().rstrip("=") + ".data"


def test_every_block_equals_kubos(kubo, tmp_path):
    """Not just the root: `ipfs add` (not only-hash) stores exactly the blocks we make, byte for byte."""
    root = tree(
        tmp_path / "d", {"big.bin": data(MAX_LINKS * CHUNK_SIZE + 5 * CHUNK_SIZE, 7), "s/x": b"x", "e": b""}
    )
    before = _kubo_blocks(kubo)
    root_cid = kubo.add(root, only_hash=False)
    added = _kubo_blocks(kubo) - before
    ours_cid, ours = add_path(root)
    assert ours_cid == root_cid
    assert {_flatfs_key(c) for c in ours} >= added
    for block_cid, block in ours.items():
        stored = next(kubo.blocks_dir.rglob(_flatfs_key(block_cid)))
        assert stored.read_bytes() == block


def test_v1_dag_shape(tmp_path):
    """cid_version=1 is kubo's --cid-version=1: raw leaves, dag-pb (v1) inner and directory nodes."""
    size = MAX_LINKS * CHUNK_SIZE + 3 * CHUNK_SIZE + 10
    path = tmp_path / "f"
    path.write_bytes(data(size, 3))
    root_cid, blocks = add_path(path, cid_version=1)
    assert root_cid.startswith("bafybei")
    root = unixfs.decode(blocks[root_cid])
    assert root.type == unixfs.FILE and root.filesize == size
    assert root.blocksizes == [MAX_LINKS * CHUNK_SIZE, 3 * CHUNK_SIZE + 10]
    assert sum(link.tsize for link in root.links) + len(blocks[root_cid]) == sum(
        len(b) for b in blocks.values()
    )
    leaves = [c for c in blocks if c.startswith("bafkrei")]
    assert len(leaves) == MAX_LINKS + 4
    assert _file_bytes(blocks, root_cid) == path.read_bytes()
    single = tmp_path / "small"
    single.write_bytes(b"one chunk")
    assert add_path(single, cid_version=1)[1] == {
        cid.make_cid(cid.digest_of([b"one chunk"]), cid.RAW, 1): b"one chunk"
    }


def _file_bytes(blocks: dict[str, bytes], block_cid: str) -> bytes:
    if block_cid.startswith("bafkrei"):  # a raw leaf is the bytes themselves
        return blocks[block_cid]
    links = unixfs.decode(blocks[block_cid]).links
    return b"".join(_file_bytes(blocks, cid.cid_from_bytes(link.cid)) for link in links)


def test_kubo_reads_our_v1_dags(kubo, tmp_path):
    """Our CIDv1 blocks, put into kubo's blockstore, are read back by kubo into the same bytes."""
    root = tree(
        tmp_path / "d",
        {
            "big.bin": data(MAX_LINKS * CHUNK_SIZE + CHUNK_SIZE + 9, 11),
            "sub/x.txt": b"x",
            "e": b"",
            "ü/y": b"y",
        },
    )
    root_cid, blocks = add_path(root, cid_version=1)
    for block_cid, block in blocks.items():
        key = _flatfs_key(block_cid)
        folder = kubo.blocks_dir / key[-8:-6]  # flatfs "next-to-last/2": the two characters before the last
        folder.mkdir(exist_ok=True)
        (folder / key).write_bytes(block)
    kubo.download(root_cid, tmp_path / "back")
    for path in root.rglob("*"):
        copy = tmp_path / "back" / path.relative_to(root)
        assert copy.is_dir() if path.is_dir() else copy.read_bytes() == path.read_bytes()
    assert sorted(p.relative_to(tmp_path / "back") for p in (tmp_path / "back").rglob("*")) == sorted(
        p.relative_to(root) for p in root.rglob("*")
    )


def test_streaming_holds_one_chunk(tmp_path):
    """Blocks come out as the file is read: a leaf's bytes are one chunk, never the whole file."""
    path = tmp_path / "f"
    path.write_bytes(data(10 * CHUNK_SIZE))
    sizes = [block.size for block in iter_blocks(path, cid_version=1)]
    assert sizes[:10] == [CHUNK_SIZE] * 10 and len(sizes) == 11


def test_refusals(tmp_path):
    (tmp_path / "target").write_bytes(b"t")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to(tmp_path / "target")
    with pytest.raises(UserError, match="symbolic link"):
        cid_of(tmp_path / "d")
    with pytest.raises(UserError, match="no such"):
        cid_of(tmp_path / "missing")
    with pytest.raises(UserError, match="cid_version"):
        cid_of(tmp_path / "target", cid_version=2)


def _directory_with_estimate(path: Path, estimate: int) -> Path:
    """2000 empty files whose names add up so that sum(len(name) + 34) == estimate (kubo's CIDv0 estimate)."""
    path.mkdir()
    lengths = [(estimate - 2000 * 34) // 2000] * 2000
    lengths[-1] += estimate - 2000 * 34 - sum(lengths)
    for i, length in enumerate(lengths):
        (path / f"{i:05d}".ljust(length, "x")).touch()
    return path


def test_sharding_threshold_is_kubos(kubo, tmp_path, monkeypatch):
    """kubo stores a directory as a HAMT shard from an estimate of 262144 on: one less is a plain
    directory (and equal); at the threshold our refusal starts, and kubo's CID is not the plain one."""
    below = _directory_with_estimate(tmp_path / "below", SHARDING_THRESHOLD - 1)
    assert cid_of(below) == kubo.add(below)
    at = _directory_with_estimate(tmp_path / "at", SHARDING_THRESHOLD)
    with pytest.raises(UserError, match="sharded"):
        cid_of(at)
    monkeypatch.setattr(cid, "SHARDING_THRESHOLD", 10**9)
    assert cid_of(at) != kubo.add(at)


def test_cid_strings_round_trip():
    digest = bytes(range(32))
    for version, codec in [(0, cid.DAG_PB), (1, cid.DAG_PB), (1, cid.RAW)]:
        text = cid.make_cid(digest, codec, version)
        assert cid.parse_cid(text) == (version, codec, digest)
        assert cid.cid_from_bytes(cid.cid_to_bytes(text)) == text
    v0 = cid.make_cid(digest)
    assert cid.parse_cid(cid.to_v1(v0)) == (1, cid.DAG_PB, digest)
    for bad in ["", "Qm", "hello", "bafy" + "a" * 55, "zb2rh"]:
        assert not cid.is_cid(bad)
