#!/usr/bin/env bash
# One-command GPU check (issue 19, item 6): on a machine with CUDA, run the CUDA tests (every test
# parametrized over the `device` fixture runs on cuda when it is available, plus the default suite's
# fast tests) and Table 2 on the GPU, within 10 minutes; results go to $OUT if set, else
# experiments/results/. Fails at once, with a message, without CUDA.
#   usage: bash experiments/gpu_check.sh        (from the repository root; PYTHON=... to pick python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
DEST="${OUT:-experiments/results}"
mkdir -p "$DEST"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1)); nothing run" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" | tee "$DEST/gpu_check.txt"
# 1. CUDA tests: the device-parametrized tests on cuda (ids contain "cuda"), at most 5 minutes
status=0
timeout 300 "$PY" -m pytest -q -m "not slow" -k "cuda" tests/ 2>&1 | tail -30 | tee -a "$DEST/gpu_check.txt" || status=1
# 2. Table 2 on the GPU (ours only, the CPU peers' times are in pipeline_table2.md), at most 5 minutes
timeout 300 "$PY" experiments/pipeline_table2.py --device cuda --no-peers --warmup 2 --repeat 3 2>&1 \
  | tail -5 | tee "$DEST/pipeline_table2_cuda.txt" || status=1
echo "gpu_check: results in $DEST/gpu_check.txt and $DEST/pipeline_table2_cuda.txt (status $status)"
exit $status
