#!/usr/bin/env bash
# The one prepared GPU run (issue 17): everything a GPU can show, in at most 8 minutes of wall time.
#
#   bash bench/gpu.sh [--data-dir DIR]     on a CUDA machine; results under $OUT (default bench/results/gpu/)
#   bash bench/gpu.sh --dry-run            the same code paths on CPU at tiny sizes (Triton interpreter,
#                                          2 steps, 4 images); results under $OUT (default: a temp folder)
#   bash bench/gpu.sh --tar FILE           also pack $OUT into FILE (.tar.gz) at the end
#
# Parts, one process each under a hard time limit (bench/gpu_bench.py has the details):
#   env, kernel_tests, kernels, train, sample; then summary (summary.json, summary.md).
# A part that fails or runs out of time is recorded in its <part>.json (status, error text) and
# the run goes on. Logs: $OUT/logs/<part>.log. Exit status 0 when no part failed.
# Training data: --data-dir / $ISIC2017_DIR (ISIC 2017, official layout), else the packed array
# bench/cache/isic2017-128.npz ($ISIC2017_CACHE; `python bench/gpu_bench.py pack --data-dir DIR`),
# else the synthetic set. Python: $PYTHON, else .venv/bin/python, else python3.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

DRY_RUN=0
TAR=""
DATA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --data-dir) DATA=(--data-dir "$2"); shift ;;
    --tar) TAR="$2"; shift ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1

# Hard limit per part (s). On the device they add up to 460 s, so with start-up and the summary the
# run stays under 8 minutes; each part also skips what would overrun its own limit.
if [ "$DRY_RUN" = 1 ]; then
  OUT="${OUT:-${TMPDIR:-/tmp}/edgeseg-gpu-dry-run}"
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # CPU only, kernels under the interpreter
  # one thread: on a busy small CPU, torch's thread pool oversubscribed runs ~100x slower
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  MODE=(--dry-run)
  TOTAL_S=600
  declare -A LIMIT=([env]=60 [kernel_tests]=180 [kernels]=90 [train]=150 [sample]=120)
else
  OUT="${OUT:-bench/results/gpu}"
  unset TRITON_INTERPRET  # compiled kernels
  MODE=()
  TOTAL_S=480
  declare -A LIMIT=([env]=30 [kernel_tests]=120 [kernels]=130 [train]=120 [sample]=60)
fi
RESERVE_S=15  # kept for the summary
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
echo "gpu.sh: $([ "$DRY_RUN" = 1 ] && echo 'DRY RUN on CPU' || echo 'GPU run'), results in $OUT, python $PYTHON"

# The device's copy of the repository is not pip-installed: edgeseg.kernels lives in kernels/ and is
# only importable once installed (pyproject's package-dir). Offline, editable, no dependencies.
if ! "$PYTHON" -c "import edgeseg.kernels" >/dev/null 2>&1; then
  echo "gpu.sh: edgeseg is not installed for $PYTHON: pip install --no-deps --no-build-isolation -e ."
  timeout 120 "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/logs/install.log" 2>&1 \
    || echo "gpu.sh: the install failed (see logs/install.log); the parts that need edgeseg.kernels will fail"
fi

run_part() {  # NAME: run bench/gpu_bench.py NAME under its limit, then record how it ended
  local name=$1 limit=${LIMIT[$1]}
  local left=$((TOTAL_S - SECONDS - RESERVE_S))
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: not run, the time budget is spent"
    "$PYTHON" bench/gpu_bench.py not-run "$name" --out "$OUT" "${MODE[@]+"${MODE[@]}"}"
    return
  fi
  echo "=== $name (limit ${limit} s, ${SECONDS} s into the run)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$PYTHON" bench/gpu_bench.py "$name" --out "$OUT" --budget "$((limit - 5))" \
    "${MODE[@]+"${MODE[@]}"}" "${DATA[@]+"${DATA[@]}"}" 2>&1 | tee "$OUT/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  "$PYTHON" bench/gpu_bench.py mark "$name" --out "$OUT" --rc "$rc" --seconds "$((SECONDS - t0))" \
    --limit "$limit" --log "$OUT/logs/$name.log" "${MODE[@]+"${MODE[@]}"}"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

for part in env kernel_tests kernels train sample; do
  run_part "$part"
done

"$PYTHON" bench/gpu_bench.py summary --out "$OUT" --total-s "$SECONDS" "${MODE[@]+"${MODE[@]}"}" 2>&1 \
  | tee "$OUT/logs/summary.log"
rc=${PIPESTATUS[0]}
if [ -n "$TAR" ]; then
  tar -czf "$TAR" -C "$OUT" . && echo "gpu.sh: packed $OUT into $TAR"
fi
echo "gpu.sh: done in ${SECONDS} s, exit $rc"
exit "$rc"
