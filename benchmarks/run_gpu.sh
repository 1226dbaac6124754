#!/usr/bin/env bash
# Every GPU measurement of issue 11 in one run (a few minutes on an H100):
#   1. benchmarks/bench_loss.py: spatial_entropy forward + backward against the authors' structure at the
#      listed shapes, noise and smooth scores, with the host syncs per call
#      (torch.cuda.set_sync_debug_mode), labels checked against scipy, and torch.compile / CUDA-graph
#      timings at 256x6, 14x14;
#   2. benchmarks/bench_step.py: the training-step ratio of SAR against plain SDPA for ViT-S/16 and
#      DeiT-S at 224 px under bf16 autocast.
#
# Usage:
#   benchmarks/run_gpu.sh                         # on a GPU machine; results in benchmarks/results/
#   benchmarks/run_gpu.sh --out "$OUT"            # results elsewhere (bench_loss only; bench_step keeps its own)
#   benchmarks/run_gpu.sh --device cpu --quick --no-step   # the same steps on tiny settings (tests/test_entropy.py)
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
OUT_DIR=benchmarks/results
QUICK=0
STEP=1
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --out) OUT_DIR="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --no-step) STEP=0; shift ;;
        *) echo "run_gpu.sh: unknown argument $1 (see the header of this script)" >&2; exit 2 ;;
    esac
done
if [ -x .venv/bin/python ]; then PY="${PYTHON:-.venv/bin/python}"; else PY="${PYTHON:-python}"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # sar_hf from this tree, installed or not

"$PY" - "$DEVICE" <<'PYEOF'
import sys, torch
device = sys.argv[1]
print(f"torch {torch.__version__}, device {device}", end="")
if device == "cuda":
    assert torch.cuda.is_available(), "--device cuda but torch sees no GPU"
    print(f": {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}", end="")
print()
PYEOF

echo "== 1. spatial_entropy against the authors' structure"
if [ "$QUICK" = 1 ]; then
    "$PY" benchmarks/bench_loss.py --device "$DEVICE" --out "$OUT_DIR" --repeats 1 --no-sweep \
        --shapes 2x3x6x5 --compile 2x3x6x5
else
    "$PY" benchmarks/bench_loss.py --device "$DEVICE" --out "$OUT_DIR" --repeats 10 --no-sweep --compile
fi

if [ "$STEP" = 1 ]; then
    echo "== 2. training step: SAR against plain SDPA, bf16 autocast"
    "$PY" benchmarks/bench_step.py --device "$DEVICE" --bf16 --models vit_s16 deit_s16
fi
