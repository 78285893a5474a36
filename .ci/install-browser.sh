#!/usr/bin/env bash
# Install what the web UI's browser test (tests/test_webui.py) needs: Debian's Chromium, the Python
# playwright package (which drives it; its own browser download is never used) and gradio.
# Idempotent: each piece is installed only when missing, so a second run takes about a second.
# Run it with the project's venv active (or PYTHON=/path/to/python).
set -euo pipefail

PYTHON="${PYTHON:-python}"

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
    echo "installed $(/usr/bin/chromium --version 2>/dev/null | tail -n 1)"
fi

has() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
missing=()
has playwright || missing+=("playwright>=1.40")
has gradio || missing+=("gradio>=6,<7")
if [ ${#missing[@]} -gt 0 ]; then
    "$PYTHON" -m pip install -q "${missing[@]}"
    echo "installed ${missing[*]}"
fi
# Never `playwright install`: the tests launch /usr/bin/chromium through executable_path.
