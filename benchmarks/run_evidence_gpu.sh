#!/usr/bin/env bash
# Issue 21's small-data study on one GPU in 9 minutes: benchmarks/evidence.py with WORKERS processes
# sharing the GPU and a time plan of BUDGET_S seconds for the budget search and the study (the first
# wave of runs times the rest), then the report. Everything comes back as two files in $OUT:
# evidence-gpu.log (the whole log) and evidence-gpu.tar.gz (the study folder, without models and claims).
#
# Usage, through the device tool (`run`, carry [".whl"], timeout_s 600):
#   benchmarks/run_evidence_gpu.sh
#   BUDGET_S=60 HARD_S=240 benchmarks/run_evidence_gpu.sh --seeds 0 1 --fractions 0.1   # a short try
#   DEVICE=cpu WORKERS=2 benchmarks/run_evidence_gpu.sh --datasets digits --recipes plain ...   # the flow, here
# Arguments go to evidence.py. The study folder is STUDY (benchmarks/results/evidence/gpu): the runs of an
# earlier attempt, committed there, are resumed (its claims are dropped). If the hard limit HARD_S stops
# evidence.py, the finished runs still come back; `evidence.py --report_only` rebuilds the report.
# `datasets` and `kornia` are not in the GPU image: their wheels for Python 3.12 travel in .whl
# (benchmarks/results/evidence/README.md says how to fetch them) and are installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${DEVICE:-cuda}"
WORKERS="${WORKERS:-16}"  # one per CPU core of the H200 machine
BUDGET_S="${BUDGET_S:-420}"  # search + study; the rest of the 9 minutes goes to start-ups and the report
HARD_S="${HARD_S:-510}"
STUDY="${STUDY:-benchmarks/results/evidence/gpu}"
OUT="${OUT:?set OUT to the folder for the results}"
if [ -x .venv/bin/python ]; then PY="${PYTHON:-.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi

if ! "$PY" -c "import datasets, kornia" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # sar_hf from this tree
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import datasets, kornia, torch, transformers, sar_hf.scripts.train
print(f'torch {torch.__version__}, transformers {transformers.__version__}, datasets {datasets.__version__}, '
      f'kornia {kornia.__version__}', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

rm -rf "$STUDY/claims"
status=0
timeout --kill-after 10 "$HARD_S" "$PY" benchmarks/evidence.py --device "$DEVICE" --workers "$WORKERS" \
    --time_budget_s "$BUDGET_S" --output "$STUDY" "$@" >"$OUT/evidence-gpu.log" 2>&1 || status=$?
grep '^evidence:' "$OUT/evidence-gpu.log" || true
tar -czf "$OUT/evidence-gpu.tar.gz" --exclude=models --exclude=claims "$STUDY"
echo "evidence.py exit status $status; results in $OUT/evidence-gpu.tar.gz"
exit "$status"
