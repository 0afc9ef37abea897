#!/usr/bin/env bash
# Quick start: set up, make the synthetic demo dataset, run the main job on Prefect's local ephemeral API.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m flows.demo "$@"
