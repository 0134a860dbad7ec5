#!/usr/bin/env bash
# The project's whole state on one GPU machine, in one command, in under 10 minutes on one H100:
#
#   scripts/gpu_validate.sh              # on the GPU machine
#   scripts/gpu_validate.sh --dry-run    # anywhere: every stage in its CPU form, tiny sizes (checks this script)
#
# Run from a checkout with a CUDA build of torch, triton and the test extras installed. Stages run
# in order of value; each writes its results before the next starts, has its own time limit, and
# a stage that fails or times out is recorded while the rest still run:
#
#   1 tests_cuda       MEDITRON_TEST_DEVICE=cuda pytest: the op, model and module tests natively on the GPU,
#                      bf16 included, one pytest per file on half the cores (Triton compiles on the CPU);
#                      the compiled-extension tests wait for stage 1b
#   1b tests_cuda_ext  the cuda backend's tests, once the extension is built
#   2 bench_attention  python -m benchmarks --ops flash_attention: ours beside SDPA flash, efficient and cuDNN
#   3 train_step       python -m benchmarks.train_step (meanwhile, on half the cores: tests_cpu, the
#                      interpreter suite as CI runs it, with this machine's torch and Triton)
#   4 bench_kernels    python -m benchmarks for every other op (Liger-Kernel beside ours, from the wheel in
#                      scripts/wheels/, installed into a temporary folder), with what is left of the time
#   5 tune             python -m meditron_kernels.tuned: the measured backend table for this GPU model
#                      (meditron_kernels/tuned/<device>.json), from stages 2 and 4
# In the background from the start (CPU only): build_ext (the CUDA extension for this GPU's
# architecture, unless built) and inspect (the static kernel report, this machine's ptxas).
#
# Everything goes under benchmarks/results/: <device>-<date>.json (kernels), <device>-<date>-train-step.json,
# static-<date>.json, the plots, and <device>-<date>-validate/ with every log, <stage>.rc and summary.txt.
# The summary is written at exit whatever happened (also on Ctrl-C). Exit status 0 when every stage passed.
#
# Environment: PYTHON (default python), TOTAL_S (default 540: the whole run's target, in seconds),
# SKIP_BUILD=1 (do not build the extension), TRAIN_STEP_ARGS (extra arguments for train_step).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
DRY=""
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: scripts/gpu_validate.sh [--dry-run]" >&2; exit 2 ;;
esac
[ -n "${GPU_VALIDATE_ON_CPU:-}" ] && DRY=1
TOTAL_S="${TOTAL_S:-$([ -n "$DRY" ] && echo 900 || echo 540)}"
START=$SECONDS
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    [ -n "$DRY" ] && echo "gpu_validate --dry-run: a GPU is visible, but the stages run in their CPU forms"
elif [ -z "$DRY" ]; then
    echo "gpu_validate: no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')); --dry-run checks this script on a CPU" >&2
    exit 2
fi
DEV=$([ -n "$DRY" ] && echo cpu || echo cuda)
SLUG=$("$PY" -c "from benchmarks.common import environment; import torch
print(environment(torch.device('$DEV'), measure=False)['device_slug'])")
DATE=$(date +%F)
RES="benchmarks/results"
OUT="$RES/$SLUG-$DATE-validate"
KERNELS_JSON="$RES/$SLUG-$DATE.json"
mkdir -p "$OUT"
NCPU=$(nproc 2>/dev/null || echo 4)
HALF=$(( NCPU / 2 > 0 ? NCPU / 2 : 1 ))
STAGES="build_ext inspect tests_cuda tests_cuda_ext bench_attention train_step tests_cpu bench_kernels tune"

elapsed() { echo $((SECONDS - START)); }
left() { echo $((TOTAL_S - (SECONDS - START))); }

# run_stage NAME TIMEOUT CMD...: runs in the foreground, writes $OUT/NAME.log and $OUT/NAME.rc ("rc seconds").
run_stage() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== [$(elapsed) s] $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$rc $((SECONDS - t0))" >"$OUT/$name.rc"
    echo "== [$(elapsed) s] $name: exit $rc after $((SECONDS - t0)) s"
    return 0
}
# skip_stage NAME WHY: recorded as skipped (not a failure).
skip_stage() { echo "skipped $1" >"$OUT/$1.rc"; echo "$2" >"$OUT/$1.log"; echo "== [$(elapsed) s] $1: skipped ($2)"; }
# limit NOMINAL: the stage's own limit, cut to what is left of TOTAL_S (at least 30 s).
limit() { local l; l=$(left); [ "$l" -lt "$1" ] && { [ "$l" -lt 30 ] && echo 30 || echo "$l"; } || echo "$1"; }

summary() {
    local status=0 name rc secs verdict
    {
        echo "gpu_validate$([ -n "$DRY" ] && echo " --dry-run") on $SLUG, $(date -Is), $(elapsed) s in all (target $TOTAL_S s)"
        for name in $STAGES; do
            if [ ! -f "$OUT/$name.rc" ]; then
                printf "  %-16s %-18s\n" "$name" "NOT RUN"
                status=1
                continue
            fi
            read -r rc secs <"$OUT/$name.rc"
            if [ "$rc" = skipped ]; then
                verdict="skipped"; secs=0
            elif [ "$rc" = 0 ]; then
                verdict=passed
            elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
                verdict="TIMED OUT"; status=1
            else
                verdict="FAILED (exit $rc)"; status=1
            fi
            printf "  %-16s %-18s %4s s   %s\n" "$name" "$verdict" "$secs" "$OUT/$name.log"
        done
        [ -f "$OUT/tests_cuda_ext.log" ] && grep -E "passed|failed|error" "$OUT/tests_cuda_ext.log" | tail -1 | \
            sed "s/^/  tests_cuda_ext: /"
        for name in tests_cuda tests_cpu; do
            [ -f "$OUT/$name.log" ] && grep -v "^exit   0 " "$OUT/$name.log" | sed "s/^/  $name: /"
        done
        [ -f "$OUT/tune.log" ] && sed "s/^/  tune: /" "$OUT/tune.log"
        echo "results: $(ls "$RES"/*"$DATE"*.json "$RES"/*"$DATE"*.png meditron_kernels/tuned/*.json 2>/dev/null | tr '\n' ' ')"
        return $status
    } | tee "$OUT/summary.txt"
    return "${PIPESTATUS[0]}"
}
BG_PIDS=""
on_exit() {
    local rc
    trap - EXIT INT TERM
    # A background stage is a subshell around `timeout`; timeout passes the signal on to its command.
    for pid in $BG_PIDS; do pkill -TERM -P "$pid" 2>/dev/null; kill "$pid" 2>/dev/null; done
    [ -n "${SITE:-}" ] && rm -rf "$SITE"
    summary
    rc=$?
    exit $rc
}
trap on_exit EXIT
trap 'echo "gpu_validate: interrupted"; exit 130' INT TERM

{
    echo "date: $(date -Is)"
    nvidia-smi 2>&1 | head -20
    "$PY" -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|liger|flash|transformers|numpy|pytest) " || true
    git log -1 --oneline 2>/dev/null || true
} >"$OUT/env.txt" 2>&1

# Liger-Kernel from the wheel that travels with the tree, into a folder of its own (the machine's
# environment is left as it is); a missing or broken wheel only leaves its provider skipped.
# (A temporary folder, so that benchmarks/results/ holds results alone.)
if ! "$PY" -c "import liger_kernel" 2>/dev/null; then
    WHEEL=$(ls scripts/wheels/liger_kernel-*.whl 2>/dev/null | tail -1)
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-validate-site.XXXXXX")
    if [ -n "$WHEEL" ] && "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$WHEEL" >"$OUT/liger_install.log" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

# ------------------------------------------------------------------ background: CPU-only work
if [ -n "$DRY" ]; then
    skip_stage build_ext "dry run: the extension build needs nvcc and a CUDA torch (scripts/build_cuda_ext_check.sh checks it)"
elif [ -z "${SKIP_BUILD:-}" ] && ! "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('meditron_kernels._C') else 1)"; then
    CC=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    (MAX_JOBS=$HALF TORCH_CUDA_ARCH_LIST="$CC" run_stage build_ext 240 "$PY" setup.py build_ext --inplace) &
    BUILD_PID=$!; BG_PIDS="$BG_PIDS $BUILD_PID"
else
    skip_stage build_ext "extension already built, or SKIP_BUILD set"
fi
(run_stage inspect 300 "$PY" -m benchmarks.inspect --json "$RES/static-$DATE.json") &
INSPECT_PID=$!; BG_PIDS="$BG_PIDS $INSPECT_PID"

# One pytest process per test file, several at a time (the interpreter runs on one core; on the GPU,
# Triton's compiles do), largest files first; each file's log is written as it finishes.
# Arguments: LOGDIR JOBS PATH... [-- PYTEST_ARGS...]; SKIP_TEST_FILES lists files to leave out.
PARALLEL_PYTEST='
import concurrent.futures as cf, glob, os, subprocess, sys
logdir, jobs, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
paths, extra = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
skip = {os.path.normpath(f) for f in os.environ.get("SKIP_TEST_FILES", "").split()}
skip.add(os.path.join("tests", "benchmarks", "test_inspect.py"))  # the inspect stage runs the static report
files = [os.path.normpath(f) for p in paths for f in (glob.glob(os.path.join(p, "**", "test_*.py"), recursive=True)
                                                      if os.path.isdir(p) else [p])]
files = sorted({f for f in files if f not in skip}, key=os.path.getsize, reverse=True)
os.makedirs(logdir, exist_ok=True)
def one(f):
    log = os.path.join(logdir, f.replace(os.sep, "_") + ".log")
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, "-m", "pytest", f, "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
                             *extra], stdout=out, stderr=subprocess.STDOUT).returncode
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
printf "%s" "$PARALLEL_PYTEST" >"$OUT/parallel_pytest.py"

# ------------------------------------------------------------------ 1: tests on the GPU
# The static-report tests compile for sm_80/sm_90 on the CPU; the inspect stage covers them. The
# compiled extension's tests wait for its build (stage 1b).
GPU_TESTS="tests/ops tests/model tests/test_nn.py tests/test_helpers.py"
if [ -n "$DRY" ]; then
    # In the default (interpreter) mode, cut to the quick files: checks the wiring.
    GPU_TESTS="tests/test_helpers.py tests/test_tuned.py"
    MODE=cpu
else
    MODE=cuda
fi
# shellcheck disable=SC2086
run_stage tests_cuda "$(limit 180)" env MEDITRON_TEST_DEVICE=$MODE SKIP_TEST_FILES=tests/ops/test_cuda_ops.py \
    "$PY" "$OUT/parallel_pytest.py" "$OUT/tests_cuda" "$HALF" $GPU_TESTS -- -k "not static_report"
if [ -n "${BUILD_PID:-}" ]; then
    wait "$BUILD_PID"
fi
if [ -n "$DRY" ]; then
    run_stage tests_cuda_ext "$(limit 60)" "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra tests/ops/test_cuda_ops.py
else
    run_stage tests_cuda_ext "$(limit 60)" env MEDITRON_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
        -o addopts=-ra tests/ops/test_cuda_ops.py
fi

# ------------------------------------------------------------------ 2: attention
SIZE=$([ -n "$DRY" ] && echo "--size smoke --device cpu --no-train-step" || echo "")
# shellcheck disable=SC2086
run_stage bench_attention "$(limit 150)" "$PY" -m benchmarks --ops flash_attention --json "$KERNELS_JSON" \
    --budget $(( $(limit 150) - 30 > 30 ? $(limit 150) - 30 : 30 )) $SIZE

# ------------------------------------------------------------------ 3: training step (+ the CPU suite)
wait "$INSPECT_PID" 2>/dev/null
CPU_TESTS=$([ -n "$DRY" ] && echo "tests/test_helpers.py tests/test_tuned.py tests/test_api.py" || echo tests)
# The GPU hidden: this is CI's run, with this machine's torch and Triton.
# shellcheck disable=SC2086
(CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 run_stage tests_cpu "$(limit 200)" "$PY" "$OUT/parallel_pytest.py" \
    "$OUT/tests_cpu" "$HALF" $CPU_TESTS) &
TESTS_PID=$!; BG_PIDS="$BG_PIDS $TESTS_PID"
# shellcheck disable=SC2086
run_stage train_step "$(limit 150)" "$PY" -m benchmarks.train_step --json \
    $([ -n "$DRY" ] && echo "--device cpu --steps 1 --warmup 0") ${TRAIN_STEP_ARGS:-}
wait "$TESTS_PID"

# ------------------------------------------------------------------ 4: every other kernel
# The budget stops new cases; the limit leaves 20 s for the table and the summary.
if [ "$(left)" -lt 60 ]; then
    skip_stage bench_kernels "no time left ($(left) s of $TOTAL_S)"
else
    # shellcheck disable=SC2086
    run_stage bench_kernels $(( $(left) - 20 )) "$PY" -m benchmarks --json "$KERNELS_JSON" --plot \
        --budget $(( $(left) - 50 )) --ops rms_norm,swiglu,swiglu_packed,apply_rotary,cross_entropy,fused_linear_cross_entropy \
        $SIZE
fi

# ------------------------------------------------------------------ 5: the measured backend table
if [ -n "$DRY" ]; then
    skip_stage tune "dry run: CPU results make no table (python -m meditron_kernels.tuned refuses them)"
elif [ -f "$KERNELS_JSON" ]; then
    run_stage tune 20 "$PY" -m meditron_kernels.tuned "$KERNELS_JSON"
else
    skip_stage tune "no kernel results were written"
fi
