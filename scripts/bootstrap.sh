#!/usr/bin/env bash
# Usage: [SAR_EXTRAS=dev,triton] scripts/bootstrap.sh [VENV] [PIP_REQUIREMENT ...]
# Create VENV (default .venv at the repository root) if it is missing and install sar_hf into
# it with the extras SAR_EXTRAS (default: the development extras and Triton, whose interpreter
# runs the GPU kernels' tests on the CPU), then any extra requirements (e.g. "transformers==5.9.0").
# Re-installs only when pyproject.toml, the extras or the extra requirements changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
shift || true
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv "$venv"
fi
extras="${SAR_EXTRAS:-dev,triton}"
stamp="$venv/.sar_hf-installed"
want="$( (cat pyproject.toml; echo "$extras" "$@") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # The CPU build of torch, pinned for development and CI; the package itself asks for a range.
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
    "$venv/bin/python" -m pip install --quiet -e ".[$extras]" "$@"
    echo "$want" > "$stamp"
fi
