#!/usr/bin/env bash
# The main job: set up .venv if needed, then train the default SAR ViT on the bundled digits
# and print its accuracy. Arguments go to `sar-hf train` (see `scripts/train.sh --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh .venv
export HF_HUB_DISABLE_TELEMETRY=1
exec .venv/bin/sar-hf train "$@"
