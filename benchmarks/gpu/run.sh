#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu/README.md): CUDA tests, annotation and training speed, CPU-vs-GPU
# spans, all in OUT/gpu.json, in under 8 minutes on one GPU.
#
#   OUT=DIR benchmarks/gpu/run.sh [--dry-run] [--budget SECONDS]
#
# --dry-run: every step at tiny sizes on the CPU, to prove the script before a GPU is lent.
# Python: $PYTHON, else the checkout's .venv, else python3 (the GPU machine's, with CUDA torch).
# Exit status: 0 when every step succeeded; gpu.json is written either way.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
: "${OUT:?set OUT to the folder that receives gpu.json}"
mkdir -p "$OUT"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
# TOKENIZERS_PARALLELISM is left as users have it (unset: the Rust tokenizer uses every core).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
# nerbatch runs from this checkout: the package is not installed on the GPU machine (its pins differ).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# nerbatch.evaluation imports seqeval, which the GPU machine lacks and PyPI has only as an sdist:
# prepare.py carries a wheel built here. --target: the system Python may refuse a plain install (PEP 668).
if ! "$PYTHON" -c "import seqeval" 2>/dev/null; then
    wheels=("$here"/carry/seqeval-*.whl)
    wheel=${wheels[0]}
    if [[ -f "$wheel" ]]; then
        site=$(mktemp -d)
        if "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$site" "$wheel"; then
            export PYTHONPATH="$PYTHONPATH:$site"
            echo "installed $(basename "$wheel") into $site"
        else  # a pure-Python wheel is a zip archive that Python imports as it is
            export PYTHONPATH="$PYTHONPATH:$wheel"
            echo "pip failed: importing seqeval from $wheel"
        fi
    else
        echo "warning: seqeval is not importable and no carried wheel: training and evaluation will fail" >&2
    fi
    "$PYTHON" -c "import seqeval.metrics" || echo "warning: seqeval.metrics does not import (it needs numpy, scikit-learn)" >&2
fi

set +e
(cd "$repo" && "$PYTHON" -u -m benchmarks.gpu.gpu_bench --out "$OUT" "$@" 2>&1) | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
