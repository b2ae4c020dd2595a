#!/usr/bin/env bash
# One call on the GPU machine (torch, triton, nvcc preinstalled; no network):
#   build the extension, run the test suite (the `cuda` tests included), run the bench,
#   and leave logs and JSON in OUTDIR.
# Usage: scripts/gpu_check.sh OUTDIR [extra `python -m deepkern.bench` args; default --quick]
# Wheels for packages missing there (e.g. liger-kernel for the bench) may be put in .whl/.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [bench args]}
shift
BENCH_ARGS=("$@")
[ ${#BENCH_ARGS[@]} -eq 0 ] && BENCH_ARGS=(--quick)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/deepkern-site .whl/*.whl \
    && export PYTHONPATH=/tmp/deepkern-site${PYTHONPATH:+:$PYTHONPATH}
fi

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export DEEPKERN_BUILD_CUDA=1 DEEPKERN_PTXAS_VERBOSE=1
t0=$SECONDS
# -v: pip shows the compiler output (ptxas -v), which the two greps below read.
if ! $PY -m pip install -v --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
echo "build: $((SECONDS - t0)) s"
grep -E "spill (stores|loads)" "$OUT/build.log" | grep -v " 0 bytes spill" | sort | uniq -c | head -20
# ptxas C7513: wgmma instructions serialized (a wait for the tensor cores before each one).
grep -c "C7513" "$OUT/build.log" | sed "s/^/ptxas wgmma serialization warnings (C7513): /"

{ $PY -m deepkern.info; nvidia-smi; } > "$OUT/info.txt" 2>&1
head -12 "$OUT/info.txt"

t0=$SECONDS
# pytest-xdist (in the GPU image) runs the suite in 8 processes on the one GPU: the tests are
# small kernels, and Triton compiles (CPU-bound) dominate their time.
XDIST=$($PY -c "import xdist" 2> /dev/null && echo "-n ${DEEPKERN_TEST_WORKERS:-8}")
$PY -m pytest $XDIST -v -rfE --tb=line --durations=20 > "$OUT/tests.log" 2>&1
TEST_RC=$?
grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -40
echo "tests: rc=$TEST_RC in $((SECONDS - t0)) s"

t0=$SECONDS
$PY -m deepkern.bench "${BENCH_ARGS[@]}" --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
grep -v "^\[" "$OUT/bench.log"
echo "bench: rc=$BENCH_RC in $((SECONDS - t0)) s"

[ $TEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ]
