#!/usr/bin/env bash
# The test command. Sets up .venv if needed and runs the whole suite on the CPU against the
# newest transformers release; then, in .venv-min, the whole suite again against the oldest release
# that pyproject.toml admits. Arguments, if any, go to pytest and skip the second run.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

run_tests() {  # VENV [PYTEST_ARGUMENT ...]
    # A run takes a few minutes. A hung test (whose stacks setup.cfg's faulthandler_timeout
    # prints) ends it after 30, so that CI fails well within its limit instead of reaching it.
    local venv="$1"
    shift
    timeout --kill-after 30 1800 "$venv/bin/python" -m pytest "$@"
}

scripts/bootstrap.sh .venv
run_tests .venv "$@"
if [ $# -eq 0 ]; then
    oldest="$(.venv/bin/python -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(next(re.search(r">=([\d.]+)", d)[1] for d in deps if d.startswith("transformers")))')"
    echo "== transformers==$oldest (the oldest supported release)"
    # Triton (about 1 GB) is installed once, in .venv: its interpreter tests skip here.
    SAR_EXTRAS=dev scripts/bootstrap.sh .venv-min "transformers==$oldest"
    run_tests .venv-min
fi
