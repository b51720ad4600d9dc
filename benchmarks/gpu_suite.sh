#!/usr/bin/env bash
# The GPU table of benchmarks/README.md in one call, correctness first: one JSON line per step, printed and
# appended to $OUT/gpu_suite.jsonl when OUT is set (the suite's only output file).
#
#   bash benchmarks/gpu_suite.sh        # at most SUITE_BUDGET_S (540 s) in all: fits a 10-minute call
#
# First the row "correctness": tests/test_gpu_backends.py, the compiled Triton kernels against the torch
# backend on whole networks (spikes, logits, gradients; float64 and float32), under its own timeout. It
# runs on CUDA only (elsewhere it is reported as skipped); its verdict is in the summary ("correct").
# Then the speed rows, in order of importance, under what is left of the total budget (SUITE_BUDGET_S,
# default 540 s, correctness included). Each row has its own timeout, cut to what is left of the budget; a
# row that fails or times out is reported as such ("rc", "error") and the next one runs; rows that no
# longer fit are reported as skipped. The last line sums up.
#
# Settings (environment): PYTHON (default python, else python3), SUITE_BUDGET_S, SUITE_DEVICE (default cuda),
# SUITE_ONLY (an extended regex: only the rows whose name matches), SUITE_EXTRA (flags appended to every
# row, e.g. tiny sizes for a dry run on a CPU: SUITE_DEVICE=cpu SUITE_EXTRA='--timesteps 2 --batch_size 1
# --img_size 16 --steps 1 --eval_batches 1').
set -u
cd "$(dirname "$0")/.." || exit 1

if [[ -n ${PYTHON:-} ]]; then
  PY=$PYTHON
elif command -v python > /dev/null 2>&1; then
  PY=python
else
  PY=python3 # images that ship only python3
fi
BUDGET=${SUITE_BUDGET_S:-540}
DEVICE=${SUITE_DEVICE:-cuda}
ONLY=${SUITE_ONLY:-}
read -r -a EXTRA <<< "${SUITE_EXTRA:-}"
DEST=${OUT:+$OUT/gpu_suite.jsonl}
LOGS=$(mktemp -d)
START=$SECONDS
export PYTHONUNBUFFERED=1

# emit NAME STATUS WALL_S FLAGS: one JSON line from the row's captured output (python: JSON quoting).
emit() {
  "$PY" - "$@" "$LOGS" <<'EOF' | if [[ -n $DEST ]]; then tee -a "$DEST"; else cat; fi
import json, sys
from pathlib import Path
name, status, wall, flags, logs = sys.argv[1:]
row = {'row': name, 'flags': flags, 'wall_s': int(wall)}
if status.startswith('skipped'):
    row.update(rc=None, skipped=status.partition(':')[2] or 'budget spent')
elif name == 'correctness':  # pytest's verdict: its last lines
    row['rc'] = int(status)
    out = Path(logs, name + '.out').read_text(errors='replace').strip().splitlines()
    row['passed'] = row['rc'] == 0
    row['timed_out'] = row['rc'] in (124, 137)
    row['pytest'] = out[-25:]
else:
    row['rc'] = int(status)
    out = Path(logs, name + '.out').read_text(errors='replace').strip().splitlines()
    try:
        row['result'] = json.loads(out[-1])
    except (IndexError, ValueError):
        row['result'] = None
    if row['rc'] != 0 or row['result'] is None:
        row['timed_out'] = row['rc'] in (124, 137)
        row['error'] = Path(logs, name + '.err').read_text(errors='replace')[-1500:]
print(json.dumps(row), flush=True)
EOF
}

ROWS=0 OK=0
# row NAME TIMEOUT_S FLAGS...: one bench run, if it matches SUITE_ONLY and still fits the budget.
row() {
  local name=$1 limit=$2
  shift 2
  [[ -n $ONLY && ! $name =~ $ONLY ]] && return
  ROWS=$((ROWS + 1))
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 30)); then
    emit "$name" skipped 0 "$*"
    return
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  timeout -k 10 "$limit" "$PY" benchmarks/bench.py --device "$DEVICE" "$@" "${EXTRA[@]}" \
    > "$LOGS/$name.out" 2> "$LOGS/$name.err"
  local rc=$?
  ((rc == 0)) && OK=$((OK + 1))
  emit "$name" "$rc" $((SECONDS - t0)) "$*"
}

# Correctness before speed: the compiled kernels against the torch backend (CUDA only).
CORRECT=null
if [[ $DEVICE == cuda* ]]; then
  t0=$SECONDS
  CHECK_LIMIT=${SUITE_CHECK_S:-180}
  timeout -k 10 "$CHECK_LIMIT" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_backends.py \
    > "$LOGS/correctness.out" 2>&1
  rc=$?
  CORRECT=$([[ $rc == 0 ]] && echo true || echo false)
  emit correctness "$rc" $((SECONDS - t0)) "tests/test_gpu_backends.py"
else
  emit correctness "skipped:device $DEVICE is not a CUDA device" 0 "tests/test_gpu_backends.py"
fi

# The targets these rows are checked against are in benchmarks/README.md.
VOC=(--shape voc64 --steps 5 --eval_batches 3)
DDD=(--shape ddd17 --steps 3 --eval_batches 2)
row voc64-fp32 120 "${VOC[@]}" --baseline                  # default backend (triton on CUDA); baseline too
row voc64-fp32-torch 90 "${VOC[@]}" --neuron_backend torch
row voc64-amp 90 "${VOC[@]}" --amp
row ddd17-fp32 120 "${DDD[@]}"
row ddd17-amp 120 "${DDD[@]}" --amp
row voc64-memory-saving 90 "${VOC[@]}" --memory_saving
row voc64-amp-dilated-off 90 "${VOC[@]}" --amp --dilated_as_dense off   # bf16 dilated convs as cuDNN runs them
# ~5 s a step before the change: one step, no floor, no profile
row ddd17-amp-dilated-off 120 --shape ddd17 --steps 1 --eval_batches 1 --amp --dilated_as_dense off \
  --no_floor --no_profile
# what torch.compile fuses in the torch backend; compiling takes most of the row
row voc64-compile 180 "${VOC[@]}" --compile --neuron_backend torch
row voc128-fp32 120 --shape voc64 --img_size 128 --steps 3 --eval_batches 2 --baseline

"$PY" -c "import json, sys; print(json.dumps({'row': 'summary', 'correct': json.loads(sys.argv[5]),
  'rows': int(sys.argv[1]), 'ok': int(sys.argv[2]), 'wall_s': int(sys.argv[3]), 'budget_s': int(sys.argv[4])}))" \
  "$ROWS" "$OK" $((SECONDS - START)) "$BUDGET" "$CORRECT" \
  | if [[ -n $DEST ]]; then tee -a "$DEST"; else cat; fi
rm -rf "$LOGS"
