#!/usr/bin/env bash
# The project's whole state on one GPU machine, in one command (under 10 minutes on one H100):
#
#   scripts/gpu_validate.sh
#
# Run from a checkout with a CUDA build of torch, triton and the test extras installed
# (pip install --no-build-isolation -e ".[test,bench]"). What it does:
#
#   phase 1, CPU work while the GPU runs the training-step benchmark:
#     - builds the CUDA extension in place for this GPU's architecture, unless already built
#     - the static kernel report (python -m benchmarks.inspect --json)
#     - the test suite with the GPU hidden (the Triton interpreter path, as CI runs it), one pytest
#       process per test file, half the cores at a time
#     - on the GPU meanwhile: python -m benchmarks.train_step (long kernels, little CPU need)
#   phase 2, the machine otherwise idle, so the kernel timings are clean:
#     - the tests that use the GPU (files that check for a CUDA device or the extension), GPU visible
#     - python -m benchmarks --json --plot, with a time budget of what is left
#
# Everything goes under benchmarks/results/: <device>-<date>.json (kernels), <device>-<date>-train-step.json,
# static-<date>.json, the plots, and <device>-<date>-validate/ with every log and summary.txt.
# Each phase has its own timeout; a phase that fails or times out is recorded and the rest still run.
# Exit status 0 when every phase passed.
#
# Environment: PYTHON (default python), TOTAL_S (default 570: the whole run's target, in seconds),
# SKIP_BUILD=1 (do not build the extension), TRAIN_STEP_ARGS (extra arguments for train_step),
# TEST_PATHS (default tests), GPU_VALIDATE_ON_CPU=1 (run the phases in their CPU modes: checks this script).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
TOTAL_S="${TOTAL_S:-570}"
START=$SECONDS
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [ -z "${GPU_VALIDATE_ON_CPU:-}" ]; then
        echo "gpu_validate: no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)'))" >&2
        exit 2
    fi
    echo "gpu_validate: no GPU; GPU_VALIDATE_ON_CPU is set, so the phases run in their CPU modes (a check of this script)"
fi
SLUG=$("$PY" -c "from benchmarks.common import environment; import torch
print(environment(torch.device('cuda' if torch.cuda.is_available() else 'cpu'), measure=False)['device_slug'])")
DATE=$(date +%F)
RES="benchmarks/results"
OUT="$RES/$SLUG-$DATE-validate"
mkdir -p "$OUT"
NCPU=$(nproc 2>/dev/null || echo 4)

elapsed() { echo $((SECONDS - START)); }
left() { echo $((TOTAL_S - (SECONDS - START))); }

# Each phase writes $OUT/<name>.rc and $OUT/<name>.log; run_phase NAME TIMEOUT CMD... runs it in the foreground.
run_phase() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== [$(elapsed) s] $name (timeout ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$rc $((SECONDS - t0))" >"$OUT/$name.rc"
    echo "== [$(elapsed) s] $name: exit $rc after $((SECONDS - t0)) s"
    return 0
}

{
    echo "date: $(date -Is)"
    nvidia-smi 2>&1 | head -20
    "$PY" -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|liger|flash|transformers|numpy|pytest) " || true
    git log -1 --oneline 2>/dev/null || true
} >"$OUT/env.txt" 2>&1

# ------------------------------------------------------------------ phase 1
BUILD_PID=""
if [ -z "${SKIP_BUILD:-}" ] && ! "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('meditron_kernels._C') else 1)"; then
    CC=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else '9.0')")
    # Half the cores: the interpreter tests and the static report share the CPU with it.
    (MAX_JOBS=$((NCPU / 2 > 0 ? NCPU / 2 : 1)) TORCH_CUDA_ARCH_LIST="$CC" \
        run_phase build_ext 300 "$PY" setup.py build_ext --inplace) &
    BUILD_PID=$!
else
    echo "0 0" >"$OUT/build_ext.rc"; echo "extension already built or SKIP_BUILD set" >"$OUT/build_ext.log"
fi
(run_phase inspect 360 "$PY" -m benchmarks.inspect --json "$RES/static-$DATE.json") &
INSPECT_PID=$!
# One pytest process per test file, several at a time (the interpreter runs on one core), largest
# files first. The static report runs above; the suite's copy of it is skipped here.
PARALLEL_PYTEST='
import concurrent.futures as cf, glob, os, subprocess, sys
logdir, jobs, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
files = [f for p in paths for f in (glob.glob(os.path.join(p, "**", "test_*.py"), recursive=True)
                                    if os.path.isdir(p) else [p])
         if not f.endswith(os.path.join("benchmarks", "test_inspect.py"))]
files.sort(key=os.path.getsize, reverse=True)
os.makedirs(logdir, exist_ok=True)
def one(f):
    log = os.path.join(logdir, f.replace(os.sep, "_") + ".log")
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, "-m", "pytest", f, "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"],
                            stdout=out, stderr=subprocess.STDOUT).returncode
    with open(log) as fh:
        lines = fh.read().strip().splitlines()
    return f, rc, lines[-1] if lines else ""
bad = 0
with cf.ThreadPoolExecutor(jobs) as pool:
    for f, rc, last in pool.map(one, files):
        print(f"exit {rc:3}  {f}: {last}", flush=True)
        bad += rc not in (0, 5)  # 5: nothing collected
print(f"{len(files)} test files, {bad} failing")
sys.exit(1 if bad else 0)
'
JOBS=$(( NCPU >= 8 ? NCPU / 2 : 2 ))
# shellcheck disable=SC2086
(CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=2 run_phase tests_cpu 420 "$PY" -c "$PARALLEL_PYTEST" "$OUT/tests_cpu" "$JOBS" \
    ${TEST_PATHS:-tests}) &
TESTS_PID=$!

# shellcheck disable=SC2086
run_phase train_step 240 "$PY" -m benchmarks.train_step --json ${TRAIN_STEP_ARGS:-}

[ -n "$BUILD_PID" ] && wait "$BUILD_PID"
wait "$INSPECT_PID" "$TESTS_PID"

# ------------------------------------------------------------------ phase 2
# shellcheck disable=SC2086
# The test files that use a GPU when there is one, now with the GPU visible (Triton still in the
# interpreter there, as conftest.py sets it; the kernel benchmarks below check every Triton and CUDA
# kernel natively against the reference before timing it).
GPU_TESTS=$(grep -rlE "cuda\.is_available\(\)|_cuda_ext\.available\(\)|HAS_CUDA|mark\.gpu" ${TEST_PATHS:-tests} \
    --include="test_*.py" | sort | tr '\n' ' ')
if [ -n "$GPU_TESTS" ]; then
    # shellcheck disable=SC2086
    run_phase tests_gpu 150 "$PY" -m pytest $GPU_TESTS -q -p no:cacheprovider -o addopts="-ra"
fi

BUDGET=$(( $(left) - 45 ))
[ "$BUDGET" -lt 60 ] && BUDGET=60
run_phase benchmarks $((BUDGET + 90)) "$PY" -m benchmarks --json --plot --budget "$BUDGET"

# ------------------------------------------------------------------ summary
{
    echo "gpu_validate on $SLUG, $(date -Is), $(elapsed) s in all"
    status=0
    for name in build_ext inspect tests_cpu train_step tests_gpu benchmarks; do
        [ -f "$OUT/$name.rc" ] || continue
        read -r rc secs <"$OUT/$name.rc"
        verdict=passed
        [ "$rc" = 124 ] || [ "$rc" = 137 ] && verdict="TIMED OUT"
        [ "$rc" != 0 ] && [ "$verdict" = passed ] && verdict="FAILED (exit $rc)"
        [ "$rc" != 0 ] && status=1
        printf "  %-11s %-18s %4s s   %s\n" "$name" "$verdict" "$secs" "$OUT/$name.log"
    done
    echo "  test runs:"
    [ -f "$OUT/tests_cpu.log" ] && grep -v "^exit   0 " "$OUT/tests_cpu.log" | sed "s/^/    tests_cpu: /"
    [ -f "$OUT/tests_gpu.log" ] && tail -1 "$OUT/tests_gpu.log" | sed "s/^/    tests_gpu: /"
    echo "results: $(ls "$RES"/*"$DATE"*.json "$RES"/*"$DATE"*.png 2>/dev/null | tr '\n' ' ')"
    exit $status
} | tee "$OUT/summary.txt"
exit "${PIPESTATUS[0]}"
