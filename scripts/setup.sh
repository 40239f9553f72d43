#!/usr/bin/env bash
# Installs loraforge and everything it needs into the current Python (3.11+).
# torch is pinned first: an unpinned `torch` would pull a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# The serve playground's browser test drives Debian's Chromium through its chromedriver (Selenium).
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver
fi
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -e ".[all]"
# The tests' IPFS oracle: kubo built as a shared library. --no-deps: its Python wrapper needs a package
# that is not published, and the tests call the library through ctypes instead.
$PY -m pip install -q --no-deps "kubo-python==0.1.5"
