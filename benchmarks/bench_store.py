"""CID hashing and store adds against `sha256sum` on the same bytes.

    PYTHONPATH=src python benchmarks/bench_store.py                  # 4 files x 64 MiB, 5 rounds
    PYTHONPATH=src python benchmarks/bench_store.py --files 8 --size-mib 128 --rounds 7

A directory of large files (deterministic bytes) is written once and read once so that every run reads
it from the page cache; then, in each round, in turn:
  - sha256sum FILES          (a real subprocess: coreutils)
  - hashlib.file_digest      (Python's sha256 over each file: the floor for any Python hashing)
  - cid_of(dir), v0 and v1   (loraforge.jobs.cid: chunking, dag-pb/UnixFS encoding, block hashes)
  - Store.add(dir), v0 and v1 into a fresh store (hashing + writing every block + pin)
Medians over the rounds; throughput in MB/s of file data; ratio = throughput / sha256sum's.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from loraforge.jobs.cid import cid_of
from loraforge.jobs.store import Store


def make_files(folder: Path, count: int, size: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = folder / f"shard-{i:02d}.bin"
        rng = random.Random(i)
        with open(path, "wb") as f:
            for _ in range(0, size, 1 << 24):
                f.write(rng.randbytes(min(1 << 24, size - f.tell())))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write the data (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    try:
        data = work / "data"
        data.mkdir()
        files = make_files(data, args.files, args.size_mib << 20)
        total = sum(p.stat().st_size for p in files)
        for p in files:  # into the page cache
            p.read_bytes()

        def sha256sum():
            subprocess.run(["sha256sum", *map(str, files)], check=True, stdout=subprocess.DEVNULL)

        def file_digest():
            for p in files:
                with open(p, "rb") as f:
                    hashlib.file_digest(f, "sha256")

        def add(version):
            store_root = work / f"store-v{version}"
            shutil.rmtree(store_root, ignore_errors=True)
            store = Store(store_root)
            start = time.perf_counter()
            store.add(data, cid_version=version)
            elapsed = time.perf_counter() - start
            shutil.rmtree(store_root)
            return elapsed

        cases = {
            "sha256sum (coreutils)": sha256sum,
            "hashlib.file_digest": file_digest,
            "cid_of, CIDv0": lambda: cid_of(data),
            "cid_of, CIDv1": lambda: cid_of(data, cid_version=1),
            "Store.add, CIDv0": lambda: add(0),
            "Store.add, CIDv1": lambda: add(1),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                start = time.perf_counter()
                inner = fn()
                times[name].append(inner if isinstance(inner, float) else time.perf_counter() - start)

        base = statistics.median(times["sha256sum (coreutils)"])
        print(
            f"{args.files} files x {args.size_mib} MiB = {total / 1e6:.0f} MB, {args.rounds} rounds, medians"
        )
        print(f"{'':24} {'seconds':>8} {'MB/s':>8} {'vs sha256sum':>13}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:24} {median:8.3f} {total / median / 1e6:8.0f} {base / median:12.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
