#!/usr/bin/env bash
# Every GPU measurement of issue 19 in one run, within 9 minutes on one H100/H200 (each section has its
# own time limit, 8.5 minutes in all with their grace periods, so a slow section loses its own figures,
# not the others'):
#   0. tests/test_triton.py on the GPU: the fused kernels' labels, losses and gradients against scipy and
#      the float64 reference (adversarial masks, both connectivities, every dtype), where races would show;
#   1. benchmarks/bench_loss.py: spatial_entropy forward + backward at the listed shapes, noise and smooth
#      scores, against the authors' structure, with every labelling algorithm (scipy, propagation, the
#      fused Triton kernels): median times, kernel launches per forward + backward (torch.profiler), host
#      syncs (torch.cuda.set_sync_debug_mode, with the line that caused each), labels against scipy's; and
#      torch.compile / CUDA-graph timings at 256x6, 14x14 (Triton's and compile's warm-up included);
#   2. benchmarks/bench_step.py: the training-step ratio of SAR against plain SDPA under bf16 autocast, for
#      ViT-S/16, DeiT-S/16 and DINOv2-S/14 (4 registers) at 224 px, batch 16 (with peak memory) and 64.
# Each section prints its wall time. Targets (issue 19): loss forward + backward <= 0.1 ms at 256x6, 14x14;
# step <= 1.02x plain at batch 16, <= 1.01x at batch 64; peak memory <= 1.01x.
#
# Usage:
#   benchmarks/run_gpu.sh                         # on a GPU machine; results in benchmarks/results/
#   benchmarks/run_gpu.sh --out "$OUT"            # results elsewhere
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

failed=0
section() {  # TITLE SECONDS COMMAND...: run COMMAND within SECONDS and print its wall time; a failure
    # is reported and the next section still runs (the script's exit status then says so)
    local title="$1" limit="$2" start=$SECONDS status=0
    shift 2
    echo "== $title (limit ${limit} s)"
    timeout --kill-after 5 "$limit" "$@" || status=$?
    [ "$status" = 0 ] || { echo "!! $title: exit status $status (124: timed out)"; failed=1; }
    echo "== $title: $((SECONDS - start)) s"
}

if [ "$DEVICE" = cuda ]; then
    section "0. the Triton kernels' tests on the GPU" 90 "$PY" -m pytest tests/test_triton.py -x -q -p no:cacheprovider
fi

if [ "$QUICK" = 1 ]; then
    section "1. spatial_entropy, every algorithm, against the authors' structure" 300 \
        "$PY" benchmarks/bench_loss.py --device "$DEVICE" --out "$OUT_DIR" --repeats 1 --no-sweep \
        --shapes 2x3x6x5 --compile 2x3x6x5
else
    section "1. spatial_entropy, every algorithm, against the authors' structure" 170 \
        "$PY" benchmarks/bench_loss.py --device "$DEVICE" --out "$OUT_DIR" --repeats 10 --no-sweep --compile
fi

if [ "$STEP" = 1 ]; then
    models=(vit_s16 deit_s16 dinov2_s14_reg4)
    section "2a. training step, batch 16, bf16 autocast, with peak memory" 120 \
        "$PY" benchmarks/bench_step.py --device "$DEVICE" --bf16 --batch 16 --repeats 20 --models "${models[@]}" \
        --time-target 1.02 --memory-target 1.01 --output "$OUT_DIR/bench_step_${DEVICE}_b16"
    section "2b. training step, batch 64, bf16 autocast" 110 \
        "$PY" benchmarks/bench_step.py --device "$DEVICE" --bf16 --batch 64 --repeats 20 --no-memory \
        --models "${models[@]}" --time-target 1.01 --output "$OUT_DIR/bench_step_${DEVICE}_b64"
fi
exit $failed
