#!/usr/bin/env bash
# Quick start: set up, make the synthetic demo dataset, run the main job on Prefect's local ephemeral API.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -f demo_data/class_to_idx.json ]; then
  .venv/bin/python -m tasks.demo_data demo_data >/dev/null
fi
exec .venv/bin/python -m flows.dataset --config deployments/demo_dataset.yaml "$@"
