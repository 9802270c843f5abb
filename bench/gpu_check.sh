#!/usr/bin/env bash
# The GPU check: one script for a machine with an NVIDIA GPU and a PyTorch
# 2.x (with transformers), finished in about 8 minutes.
#
#   (a) builds remat against that PyTorch's LibTorch into build-gpu/
#   (b) runs the CUDA tests (gtest filter below) and prints pass/skip/fail
#   (c) runs the seed experiment: BERT, 24 layers, hidden 1024, 16 heads,
#       sequence 512, batch 64, fp32 and bf16, under none, every-layer and
#       selective-attention (and every-layer+reentrant, every-layer+values:
#       both checkpoint implementations): `remat bench --device cuda`, then
#       bench/hf_compare.py (remat beside transformers on the same GPU)
#   (d) prints the CUDA allocator's peak and the step time of every row
#
# Everything goes to $OUT (default ./gpu_check_out): gpu_check.log, the
# test results (cuda_tests.json), each run's JSON and summary.json.
#
# Usage (from the repository root, or anywhere: it finds its tree):
#   bash bench/gpu_check.sh
#   PYTHON=/opt/venv/bin/python OUT=/tmp/out bash bench/gpu_check.sh
#
# Switches (environment):
#   PYTHON              the Python with torch 2.x and transformers (default:
#                       python3, else python, on PATH)
#   OUT                 output folder (default ./gpu_check_out)
#   GPU_CHECK_DEVICE    cuda (default) or cpu: cpu proves the plumbing on a
#                       machine without a GPU (use with GPU_CHECK_TINY=1)
#   GPU_CHECK_TINY=1    a 2-layer, hidden-64 model instead of the seed's
#   GPU_CHECK_BUILD=DIR use an existing build folder; skip (a)
#   GPU_CHECK_STEPS, GPU_CHECK_WARMUP   timed and warm-up steps (3 and 1)
#   GPU_CHECK_BUDGET    seconds for the whole check (default 470); every
#                       stage runs under `timeout` within what is left
set -u -o pipefail

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-470}
DEADLINE=$((START + BUDGET))
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

DEVICE=${GPU_CHECK_DEVICE:-cuda}
STEPS=${GPU_CHECK_STEPS:-3}
WARMUP=${GPU_CHECK_WARMUP:-1}
if [[ "${GPU_CHECK_TINY:-0}" == 1 ]]; then
  LAYERS=2 HIDDEN=64 HEADS=4 SEQ=32 BATCH=2
else
  LAYERS=24 HIDDEN=1024 HEADS=16 SEQ=512 BATCH=64
fi
POLICIES=none,every-layer,selective-attention
# remat bench alone also runs every-layer under the reentrant checkpoint and
# with the value fingerprints (their cost, and the GPU tolerance holding),
# the per-op policies (save-matmuls keeps the products, incl. the fused SDPA
# kernels), the compressed saves (bf16, and fp8 with its per-tensor scale)
# and offload (saved activations >= 1 MiB in pinned host memory, side-stream
# copies, prefetched two ahead), its peak and step time beside every-layer.
REMAT_POLICIES=none,every-layer,every-layer+reentrant,every-layer+values,selective-attention,save-matmuls,save-projections,compress,compress-fp8,offload
DTYPES=(fp32 bf16)
# Every test that touches CUDA, NCCL or --device (each skips, with the
# reason, where it cannot run).
TEST_FILTER='*Cuda*:*Nccl*:*Device*-EstimateCli.*'

if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif command -v python3 >/dev/null 2>&1; then
  PY=$(command -v python3)
else
  PY=$(command -v python || true)
fi

STATUS=() # "stage: ok|FAILED (rc)|TIMED OUT|skipped (why)"

say() { printf '\n== %s (%ds)\n' "$*" "$(($(date +%s) - START))"; }

# run_stage NAME CAP_SECONDS COMMAND...: runs COMMAND under `timeout`, for
# at most CAP seconds and never past the deadline; records how it ended.
run_stage() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - $(date +%s) - 15))
  if ((left < 20)); then
    echo "skipped: ${left}s left of the ${BUDGET}s budget"
    STATUS+=("$name: skipped (out of time)")
    return 124
  fi
  local t=$((cap < left ? cap : left))
  echo "\$ $* (timeout ${t}s)"
  timeout --kill-after=10 "$t" "$@"
  local rc=$?
  if ((rc == 0)); then
    STATUS+=("$name: ok")
  elif ((rc == 124 || rc == 137)); then
    STATUS+=("$name: TIMED OUT after ${t}s")
  else
    STATUS+=("$name: FAILED (exit $rc)")
  fi
  return $rc
}

say "environment"
echo "tree: $ROOT"
echo "out:  $OUT"
echo "device: $DEVICE; model: bert ${LAYERS}L hidden $HIDDEN heads $HEADS seq $SEQ batch $BATCH; steps $STEPS + $WARMUP warm-up"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || true
else
  echo "nvidia-smi: not on PATH"
fi
if [[ -z "$PY" ]]; then
  echo "no python: set PYTHON to a Python with torch 2.x"
  exit 2
fi
"$PY" - <<'EOF' || { echo "this Python cannot import torch: set PYTHON"; exit 2; }
import torch
print("python torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count(),
      "|", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
try:
    import transformers
    print("transformers", transformers.__version__)
except ImportError as e:
    print("transformers: not importable (hf_compare will fail):", e)
EOF

# ------------------------------------------------------------------ (a) build
if [[ -n "${GPU_CHECK_BUILD:-}" ]]; then
  BUILD=$(cd "$GPU_CHECK_BUILD" && pwd)
  say "(a) build: using $BUILD as it is"
  STATUS+=("build: reused $BUILD")
else
  BUILD=$ROOT/build-gpu
  say "(a) build into $BUILD"
  PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  run_stage "configure" 120 cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$PREFIX" -DREMAT_PYTHON="$PY" -DREMAT_BUILD_BENCH=OFF \
    > "$OUT/configure.log" 2>&1
  rc=$?
  grep -E '^-- remat:|Error|error' "$OUT/configure.log" || true
  if ((rc != 0)); then
    tail -30 "$OUT/configure.log"
    echo "configure failed: CMake needs GTest, CLI11, nlohmann_json and Gloo's headers"
    echo "(Debian: libgtest-dev libcli11-dev nlohmann-json3-dev libgloo-dev; see scripts/setup)"
  else
    run_stage "build" 300 cmake --build "$BUILD" -j "$(nproc)" --target remat_cli remat_tests \
      > "$OUT/build.log" 2>&1
    rc=$?
    if ((rc != 0)); then
      grep -E 'error|Error' "$OUT/build.log" | head -30
      tail -10 "$OUT/build.log"
    else
      echo "built: $BUILD/remat, $BUILD/remat_tests"
    fi
  fi
fi
REMAT=$BUILD/remat
if [[ ! -x "$REMAT" ]]; then
  echo "no $REMAT: nothing more can run"
fi

# ------------------------------------------------------------------ (b) tests
say "(b) CUDA tests: remat_tests --gtest_filter=$TEST_FILTER"
if [[ -x "$BUILD/remat_tests" ]]; then
  run_stage "cuda tests" 150 "$BUILD/remat_tests" --gtest_filter="$TEST_FILTER" \
    --gtest_output="json:$OUT/cuda_tests.json" > "$OUT/cuda_tests.log" 2>&1
  "$PY" - "$OUT/cuda_tests.json" "$OUT/cuda_tests.log" <<'EOF' || echo "no test results (see cuda_tests.log)"
import json, re, sys
d = json.load(open(sys.argv[1]))
# gtest's JSON has no skip message: take it from the text log, the lines
# between "[ RUN      ] name" and "[  SKIPPED ] name" but gtest's own.
reasons, current, lines = {}, None, []
for line in open(sys.argv[2], errors="replace"):
    line = line.rstrip("\n")
    m = re.match(r"\[ RUN      \] (\S+)", line)
    if m:
        current, lines = m.group(1), []
    elif line.startswith("[  SKIPPED ] ") and current and line[13:].startswith(current):
        reasons[current] = " ".join(l for l in lines if not l.endswith(": Skipped"))
        current = None
    elif current:
        lines.append(line.strip())
passed, skipped, failed = [], [], []
for suite in d["testsuites"]:
    for t in suite["testsuite"]:
        name = suite["name"] + "." + t["name"]
        if t.get("failures"):
            failed.append(name)
        elif t.get("result") == "SKIPPED":
            skipped.append(name + (": " + reasons[name] if reasons.get(name) else ""))
        else:
            passed.append(name)
print(f"CUDA tests: {len(passed)} passed, {len(skipped)} skipped, {len(failed)} failed")
for n in skipped:
    print("  skipped", n)
for n in failed:
    print("  FAILED ", n)
EOF
else
  echo "skipped: no test binary"
  STATUS+=("cuda tests: skipped (no binary)")
fi

# -------------------------------------------------- (c) the seed experiment
MODEL_FLAGS=(--model bert --layers "$LAYERS" --hidden "$HIDDEN" --heads "$HEADS" --seq "$SEQ"
             --batch "$BATCH")
say "(c1) remat bench --device $DEVICE"
for dt in "${DTYPES[@]}"; do
  if [[ ! -x "$REMAT" ]]; then
    STATUS+=("remat bench $dt: skipped (no binary)")
    continue
  fi
  echo "-- $dt"
  run_stage "remat bench $dt" 150 "$REMAT" bench "${MODEL_FLAGS[@]}" --policy "$REMAT_POLICIES" \
    --dtype "$dt" --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" \
    --json "$OUT/remat_bench_$dt.json"
done

say "(c2) bench/hf_compare.py: remat beside transformers on $DEVICE"
HF=$ROOT/bench/hf_compare.py
if [[ ! -f "$HF" ]]; then
  echo "skipped: $HF is not in this tree"
  STATUS+=("hf_compare: skipped (no bench/hf_compare.py)")
else
  HF_JSON=0
  if "$PY" "$HF" --help 2>/dev/null | grep -q -- '--json'; then
    HF_JSON=1
  fi
  for dt in "${DTYPES[@]}"; do
    echo "-- $dt"
    args=("${MODEL_FLAGS[@]}" --policy "$POLICIES" --dtype "$dt" --device "$DEVICE"
          --steps "$STEPS" --warmup "$WARMUP" --remat "$REMAT")
    if ((HF_JSON)); then
      args+=(--json "$OUT/hf_compare_$dt.json")
    fi
    run_stage "hf_compare $dt" 150 "$PY" "$HF" "${args[@]}"
  done
fi

# ------------------------------------------------------------- (d) summary
say "(d) peak memory (on cuda: the CUDA caching allocator's) and step time per row"
"$PY" - "$OUT" <<'EOF' || echo "no summary"
import glob, json, os, sys
out = sys.argv[1]
rows = []
for path in sorted(glob.glob(os.path.join(out, "remat_bench_*.json"))):
    d = json.load(open(path))
    c = d["config"]
    for r in d["runs"]:
        rows.append({"source": "remat bench", "device": c.get("device", "cpu"),
                     "dtype": c["dtype"], "policy": r["policy"], "ok": r["ok"],
                     "peak_bytes": r.get("peak_bytes"), "step_seconds": r.get("step_seconds"),
                     "max_abs_grad_diff": r.get("max_abs_grad_diff"),
                     "error": r.get("error")})

def hf_rows(d, path):
    # hf_compare.py's JSON (written by another script; read leniently): a
    # list of rows, or {"rows": [...]}/{"runs": [...]}, each with a policy,
    # a peak and a step time under some spelling.
    items = d if isinstance(d, list) else d.get("rows") or d.get("runs") or d.get("results") or []
    dtype = os.path.basename(path).split("_")[-1].split(".")[0]
    for r in items:
        if not isinstance(r, dict):
            continue
        peak = next((r[k] for k in ("peak_bytes", "cuda_peak_bytes", "peak") if k in r), None)
        step = next((r[k] for k in ("step_seconds", "step_s", "step") if k in r), None)
        yield {"source": "hf_compare:" + str(r.get("impl", r.get("framework", r.get("source", "?")))),
               "device": r.get("device", "?"), "dtype": r.get("dtype", dtype),
               "policy": r.get("policy", "?"), "ok": r.get("ok", True), "peak_bytes": peak,
               "step_seconds": step, "max_abs_grad_diff": r.get("max_abs_grad_diff"),
               "error": r.get("error")}

for path in sorted(glob.glob(os.path.join(out, "hf_compare_*.json"))):
    try:
        rows.extend(hf_rows(json.load(open(path)), path))
    except Exception as e:  # noqa: BLE001 - a summary must not fail on it
        print(f"could not read {path}: {e}")

def mib(b):
    return "-" if not isinstance(b, (int, float)) else f"{b / 2**20:.1f}"

print(f"{'source':<26} {'device':<8} {'dtype':<5} {'policy':<20} {'peak MiB':>10} {'step s':>8}  note")
for r in rows:
    step = r["step_seconds"]
    note = "" if r["ok"] else "FAILED: " + str(r.get("error"))
    if r["ok"] and r.get("max_abs_grad_diff") not in (None, 0, 0.0):
        note = f"max|dgrad| {r['max_abs_grad_diff']:.3g}"
    print(f"{r['source']:<26} {r['device']:<8} {r['dtype']:<5} {r['policy']:<20} "
          f"{mib(r['peak_bytes']):>10} {('-' if step is None else f'{step:.3f}'):>8}  {note}")
if not any(r["source"].startswith("hf_compare") for r in rows):
    print("(hf_compare rows: none in JSON; its own table is in the log above)")
json.dump({"rows": rows}, open(os.path.join(out, "summary.json"), "w"), indent=2)
EOF

say "done"
for s in "${STATUS[@]}"; do
  echo "  $s"
done
echo "log: $LOG"
failed=0
for s in "${STATUS[@]}"; do
  case "$s" in *FAILED*|*"TIMED OUT"*) failed=1 ;; esac
done
exit $failed
