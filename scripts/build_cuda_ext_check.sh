#!/usr/bin/env bash
# Builds meditron_kernels._C against a CUDA build of torch and checks it, on a machine without a
# GPU: compile and link of csrc/ (bindings.cpp included), load beside the Triton ops' custom_op
# fragments, every op schema registered, opcheck and torch.compile(fullgraph=True) on meta
# tensors through the Python fake kernels and autograd (scripts/check_cuda_ext.py).
#
#   scripts/build_cuda_ext_check.sh            # venv in $MEDITRON_CUDA_VENV (default below)
#   FORCE=1 scripts/build_cuda_ext_check.sh    # ignore the stamp of an earlier pass
#
# The venv with the CUDA torch (about 5.5 GB) is created on first use and kept. A pass leaves a
# stamp keyed by a hash of every input, so an unchanged tree is not rebuilt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/meditron-kernels"
VENV="${MEDITRON_CUDA_VENV:-$CACHE/venv-cuda}"
TORCH_SPEC="${MEDITRON_CUDA_TORCH:-torch==2.14.1}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ]; then
    echo "build_cuda_ext_check: no nvcc on PATH (set NVCC or install the CUDA toolkit); skipping" >&2
    exit 0
fi
# nvcc may be a wrapper script outside the toolkit; nvcc itself knows where the toolkit is.
export CUDA_HOME="${CUDA_HOME:-$(readlink -f "$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')")}"

start=$SECONDS
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
    echo "== creating $VENV with $TORCH_SPEC"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "$TORCH_SPEC" setuptools wheel numpy
fi
PY="$VENV/bin/python"
echo "== torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)'), nvcc $("$NVCC" --version | grep -o 'release [0-9.]*'), CUDA_HOME=$CUDA_HOME ($((SECONDS - start)) s)"

key=$(cd "$ROOT" && { cat setup.py csrc/* meditron_kernels/_cuda_ext.py meditron_kernels/ops/cuda_*.py \
      meditron_kernels/backend.py scripts/check_cuda_ext.py; "$PY" -c 'import torch; print(torch.__version__)'; \
      "$NVCC" --version; } | sha256sum | cut -c1-16)
stamp="$CACHE/cuda-ext-check/$key.ok"
if [ -z "${FORCE:-}" ] && [ -f "$stamp" ]; then
    echo "== unchanged since a passing check ($stamp); FORCE=1 rebuilds"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
(cd "$ROOT" && "$PY" setup.py -q build_ext --build-lib "$work/lib" --build-temp "$work/tmp" >"$work/build.log" 2>&1) || {
    tail -50 "$work/build.log"; echo "== build failed" >&2; exit 1; }
so=$(ls "$work"/lib/meditron_kernels/_C*.so 2>/dev/null) || {
    cat "$work/build.log"; echo "== setup.py built no extension (see its reason above)" >&2; exit 1; }
echo "== built $(basename "$so") in $((SECONDS - t0)) s (MAX_JOBS=${MAX_JOBS:-auto}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0})"
t0=$SECONDS
"$PY" "$ROOT/scripts/check_cuda_ext.py" "$so"
echo "== checked in $((SECONDS - t0)) s; total $((SECONDS - start)) s"
mkdir -p "$(dirname "$stamp")" && touch "$stamp"
