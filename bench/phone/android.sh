#!/usr/bin/env bash
# Time exported .pte segmenters on an Android phone (arm64) with ExecuTorch's executor_runner.
#
#   bench/phone/android.sh [--dry-run] [--runner PATH] [--device SERIAL] [--threads N]
#                          [--iters N] [--repeats N] [--warmup N] [--out DIR] MODEL.pte...
#
# For each MODEL.pte (its sidecar MODEL.pte.json next to it, written by `edgeseg export`):
#   adb push MODEL.pte /data/local/tmp/edgeseg/
#   adb shell executor_runner --model_path ... --num_executions ITERS --cpu_threads THREADS
# repeated REPEATS times after WARMUP runs; each run prints
#   "Model executed successfully ITERS time(s) in X ms." -> per-image latency X / ITERS.
# Peak memory: the runner is started under toybox `time -v` where the phone has it ("Max RSS").
# Writes bench/results/mobile-android-<device>.json in the schema of bench/common.py.
#
# The runner. ExecuTorch's portable executor_runner built with XNNPACK for arm64-v8a, from an
# ExecuTorch checkout at the version in the sidecar (pip show executorch; 1.5.x here):
#
#   git clone -b release/1.5 https://github.com/pytorch/executorch && cd executorch
#   git submodule update --init --recursive && ./install_requirements.sh
#   cmake -S . -B cmake-out-android \
#     -DCMAKE_TOOLCHAIN_FILE=$ANDROID_NDK/build/cmake/android.toolchain.cmake \
#     -DANDROID_ABI=arm64-v8a -DANDROID_PLATFORM=android-26 -DCMAKE_BUILD_TYPE=Release \
#     -DEXECUTORCH_BUILD_XNNPACK=ON -DEXECUTORCH_BUILD_EXECUTOR_RUNNER=ON \
#     -DEXECUTORCH_BUILD_EXTENSION_DATA_LOADER=ON -DEXECUTORCH_BUILD_EXTENSION_MODULE=ON \
#     -DEXECUTORCH_BUILD_EXTENSION_TENSOR=ON -DEXECUTORCH_BUILD_EXTENSION_FLAT_TENSOR=ON \
#     -DEXECUTORCH_BUILD_EXTENSION_THREADPOOL=ON -DEXECUTORCH_ENABLE_LOGGING=ON
#   cmake --build cmake-out-android -j"$(nproc)" --target executor_runner
#   # -> cmake-out-android/executor_runner ; pass it with --runner or set EXECUTORCH_RUNNER
#
# With --build and $EXECUTORCH_SRC + $ANDROID_NDK set, this script runs those cmake commands.
# Inputs are the runner's default (all ones): timing does not depend on the values.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DRY=0; BUILD=0; RUNNER="${EXECUTORCH_RUNNER:-}"; SERIAL="${ANDROID_SERIAL:-}"
THREADS=4; ITERS=10; REPEATS=5; WARMUP=1; OUT="$REPO/bench/results"; REMOTE=/data/local/tmp/edgeseg
PYTHON="${PYTHON:-}"
MODELS=()

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --build) BUILD=1 ;;
    --runner) RUNNER="$2"; shift ;;
    --device) SERIAL="$2"; shift ;;
    --threads) THREADS="$2"; shift ;;
    --iters) ITERS="$2"; shift ;;
    --repeats) REPEATS="$2"; shift ;;
    --warmup) WARMUP="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    *) MODELS+=("$1") ;;
  esac
  shift
done

if [ -z "$PYTHON" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
[ ${#MODELS[@]} -gt 0 ] || { echo "no .pte given (export one with: edgeseg export --target executorch)" >&2; exit 2; }

# ---- check inputs: the files, their sidecars (parsed), status ok, executorch target ----
fail=0
for m in "${MODELS[@]}"; do
  if [ ! -f "$m" ]; then echo "missing model: $m" >&2; fail=1; continue; fi
  case "$m" in *.pte) ;; *) echo "not a .pte: $m" >&2; fail=1; continue ;; esac
  if [ ! -f "$m.json" ]; then echo "missing sidecar: $m.json (export with edgeseg export)" >&2; fail=1; continue; fi
  if ! "$PYTHON" - "$m.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
need = ("preset", "steps", "ensemble", "quantize", "target")
miss = [k for k in need if k not in m]
if miss: sys.exit(f"{sys.argv[1]}: sidecar lacks {miss}")
if m["target"] != "executorch": sys.exit(f"{sys.argv[1]}: target {m['target']!r}, not executorch")
if m.get("status", "ok") != "ok": sys.exit(f"{sys.argv[1]}: export status {m.get('status')!r}")
PY
  then fail=1; fi
done
[ $fail -eq 0 ] || exit 1

run() {  # print every command; execute unless --dry-run
  echo "+ $*"
  if [ $DRY -eq 0 ]; then "$@"; fi
}
ADB=(adb); [ -n "$SERIAL" ] && ADB=(adb -s "$SERIAL")

# ---- the runner ----
if [ $BUILD -eq 1 ]; then
  : "${EXECUTORCH_SRC:?set EXECUTORCH_SRC to an executorch checkout}" "${ANDROID_NDK:?set ANDROID_NDK}"
  run cmake -S "$EXECUTORCH_SRC" -B "$EXECUTORCH_SRC/cmake-out-android" \
    -DCMAKE_TOOLCHAIN_FILE="$ANDROID_NDK/build/cmake/android.toolchain.cmake" \
    -DANDROID_ABI=arm64-v8a -DANDROID_PLATFORM=android-26 -DCMAKE_BUILD_TYPE=Release \
    -DEXECUTORCH_BUILD_XNNPACK=ON -DEXECUTORCH_BUILD_EXECUTOR_RUNNER=ON \
    -DEXECUTORCH_BUILD_EXTENSION_DATA_LOADER=ON -DEXECUTORCH_BUILD_EXTENSION_MODULE=ON \
    -DEXECUTORCH_BUILD_EXTENSION_TENSOR=ON -DEXECUTORCH_BUILD_EXTENSION_FLAT_TENSOR=ON \
    -DEXECUTORCH_BUILD_EXTENSION_THREADPOOL=ON -DEXECUTORCH_ENABLE_LOGGING=ON
  run cmake --build "$EXECUTORCH_SRC/cmake-out-android" -j"$(nproc)" --target executor_runner
  RUNNER="$EXECUTORCH_SRC/cmake-out-android/executor_runner"
fi
if [ -z "$RUNNER" ]; then
  for c in "${EXECUTORCH_SRC:-/nonexistent}/cmake-out-android/executor_runner" "$REPO/.cache/executor_runner-arm64"; do
    if [ -f "$c" ]; then RUNNER="$c"; break; fi
  done
fi
if [ -z "$RUNNER" ]; then
  if [ $DRY -eq 1 ]; then RUNNER="<executor_runner for arm64-v8a: build it, see the header of this script>"
  else echo "no executor_runner: pass --runner PATH, set EXECUTORCH_RUNNER, or --build (see this script's header)" >&2; exit 1; fi
elif [ $DRY -eq 0 ] && [ ! -f "$RUNNER" ]; then echo "runner not found: $RUNNER" >&2; exit 1; fi
if [ $DRY -eq 0 ]; then command -v adb >/dev/null || { echo "adb not found (Android platform-tools)" >&2; exit 1; }; fi

# ---- device ----
if [ $DRY -eq 1 ]; then
  DEVICE="${SERIAL:-dry-run-device}"
  echo "+ ${ADB[*]} shell getprop ro.product.model"
else
  DEVICE="$("${ADB[@]}" shell getprop ro.product.model | tr -d '\r' | tr ' /' '__')"
  SOC="$("${ADB[@]}" shell getprop ro.soc.model 2>/dev/null | tr -d '\r' || true)"
  ANDROID="$("${ADB[@]}" shell getprop ro.build.version.release | tr -d '\r')"
  ABI="$("${ADB[@]}" shell getprop ro.product.cpu.abi | tr -d '\r')"
fi
LOGDIR="$(mktemp -d)"; trap 'rm -rf "$LOGDIR"' EXIT
run "${ADB[@]}" shell mkdir -p "$REMOTE"
run "${ADB[@]}" push "$RUNNER" "$REMOTE/executor_runner"
run "${ADB[@]}" shell chmod 755 "$REMOTE/executor_runner"

i=0
for m in "${MODELS[@]}"; do
  i=$((i + 1)); name="$(basename "$m")"
  run "${ADB[@]}" push "$m" "$REMOTE/$name"
  cmd="cd $REMOTE && (command -v time >/dev/null && time -v ./executor_runner --model_path $name --num_executions $ITERS --cpu_threads $THREADS || ./executor_runner --model_path $name --num_executions $ITERS --cpu_threads $THREADS)"
  for w in $(seq 1 "$WARMUP"); do
    if [ $DRY -eq 1 ]; then echo "+ ${ADB[*]} shell \"$cmd\" > /dev/null   # warm-up"
    else "${ADB[@]}" shell "$cmd" > /dev/null 2>&1; fi
  done
  for r in $(seq 1 "$REPEATS"); do
    if [ $DRY -eq 1 ]; then echo "+ ${ADB[*]} shell \"$cmd\" > $LOGDIR/$i-$r.log 2>&1"
    else "${ADB[@]}" shell "$cmd" > "$LOGDIR/$i-$r.log" 2>&1; fi
  done
  run "${ADB[@]}" shell rm -f "$REMOTE/$name"
done

if [ $DRY -eq 1 ]; then
  echo "dry run: inputs ok (${#MODELS[@]} model(s) with sidecars); would write $OUT/mobile-android-$DEVICE.json"
  exit 0
fi

# ---- collect: per-image latency from each log, peak RSS, the JSON ----
EDGESEG_REPO="$REPO" "$PYTHON" - "$LOGDIR" "$OUT" "$DEVICE" "$ITERS" "$THREADS" "$REPEATS" "$WARMUP" "${SOC:-}" "${ANDROID:-}" "${ABI:-}" "${MODELS[@]}" <<'PY'
import json, re, sys
from pathlib import Path
logdir, out, device, iters, threads, repeats, warmup, soc, android, abi, *models = sys.argv[1:]
import os; sys.path.insert(0, os.environ.get("EDGESEG_REPO", "."))
from bench import common
iters, repeats = int(iters), int(repeats)
rows = []
for i, m in enumerate(models, 1):
    meta = json.load(open(m + ".json"))
    lat, peaks = [], []
    for r in range(1, repeats + 1):
        text = Path(logdir, f"{i}-{r}.log").read_text(errors="replace")
        t = re.search(r"executed successfully (\d+) time\(s\) in ([\d.]+) ms", text)
        if t: lat.append(float(t.group(2)) / int(t.group(1)))
        p = re.search(r"(?:Max RSS|Maximum resident set size)[^\d]*(\d+)", text)
        if p: peaks.append(int(p.group(1)) / 1024)
    stats = common.latency_stats(lat)
    K, N = int(meta["steps"]), int(meta["ensemble"])
    rows.append(common.make_row(
        config=f"{meta['preset']} .pte {'int8' if meta['quantize'] == 'int8' else 'fp32'} K{K} N{N}",
        preset=meta["preset"], role=(meta.get("preset_config") or {}).get("role"), backend="executorch",
        precision="int8" if meta["quantize"] == "int8" else "fp32", sampler="ddim", steps=K, ensemble=N,
        default=False, sweep=False, calls_per_image=K * N, latency_ms=stats,
        fps=round(1000 / stats["median"], 3) if stats["median"] else None,
        peak_rss_mb=max(peaks) if peaks else None, file=os.path.basename(m),
        file_mb=round(os.path.getsize(m) / 1e6, 3), sha256=meta.get("sha256"), checkpoint=meta.get("checkpoint"),
        dice=None, dice_reason="not measured on the phone (see the sidecar's parity vs eager)",
        status="ok" if lat else "failed", note=None if lat else "no timing line in the runner's output"))
machine = {"device": device, "soc": soc or None, "android": android or None, "abi": abi or None,
           "runner": "executorch executor_runner (XNNPACK)", "threads": int(threads)}
settings = {"iterations_per_run": iters, "repeats": repeats, "warmup": int(warmup), "threads": int(threads),
            "latency": "executor_runner's execute() time / iterations, median and IQR over repeats; inputs all ones"}
doc = common.result_doc("mobile-android", machine, settings, rows, ["measured with bench/phone/android.sh"])
path = common.write_json(Path(out) / f"mobile-android-{device}.json", doc)
print(common.markdown_table(rows)); print(f"wrote {path}")
PY
