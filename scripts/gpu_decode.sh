#!/usr/bin/env bash
# Paged decode on a GPU machine: build the CUDA extension (ptxas report), run the tests, benchmark.
#
#   scripts/gpu_decode.sh RESULTS_DIR [--sweep] [--in-tree]
#
# Writes RESULTS_DIR/build.log (nvcc + ptxas -v output), RESULTS_DIR/pytest.log, RESULTS_DIR/bench.log and
# RESULTS_DIR/decode.json + decode.md, then prints a compact summary. By default it runs a copy of just
# the paged-decode modules (stub package __init__ files), so unrelated modules of the tree cannot
# break the run; --in-tree runs the tree as it is. --sweep also times kernel variants/split counts.
set -uo pipefail
RESULTS=$(mkdir -p "${1:?usage: scripts/gpu_decode.sh RESULTS_DIR [--sweep] [--in-tree]}" && cd "$1" && pwd)
shift
SWEEP=""; INTREE=0
for a in "$@"; do
    case "$a" in --sweep) SWEEP="--sweep" ;; --in-tree) INTREE=1 ;; esac
done
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ $INTREE == 0 ]]; then
    ISO=$(mktemp -d)
    mkdir -p "$ISO/hf_efficient/ops" "$ISO/hf_efficient/attention" "$ISO/hf_efficient/bench" "$ISO/tests/ops"
    touch "$ISO/hf_efficient/__init__.py" "$ISO/hf_efficient/ops/__init__.py" \
          "$ISO/hf_efficient/attention/__init__.py" "$ISO/hf_efficient/bench/__init__.py" \
          "$ISO/tests/__init__.py" "$ISO/tests/ops/__init__.py"
    cp hf_efficient/_version.py hf_efficient/tuning.py "$ISO/hf_efficient/"
    cp hf_efficient/ops/_common.py hf_efficient/ops/jit.py hf_efficient/ops/paged_decode.py \
       hf_efficient/ops/paged_decode_triton.py "$ISO/hf_efficient/ops/"
    cp hf_efficient/attention/kvcache_api.py "$ISO/hf_efficient/attention/"
    cp hf_efficient/bench/decode.py "$ISO/hf_efficient/bench/"
    cp -r csrc "$ISO/"
    cp tests/ops/test_paged_decode.py "$ISO/tests/ops/"
    cp pyproject.toml "$ISO/"
    ROOT=$ISO
    cd "$ISO"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_EFFICIENT_CACHE="${HF_EFFICIENT_CACHE:-/tmp/hfe-jit-cache}"
PY=${PYTHON:-python3}
DEADLINE=$(( $(date +%s) + ${GPU_DECODE_BUDGET_S:-285} ))
left() { local l=$(( DEADLINE - $(date +%s) )); (( l < $1 )) && echo $(( l > 10 ? l : 10 )) || echo "$1"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvcc --version | tail -n 2

# 1. Build (verbose: nvcc commands and the ptxas resource report go to build.log).
START=$(date +%s)
HF_EFFICIENT_JIT_VERBOSE=1 timeout "$(left 150)" $PY -c "
from hf_efficient.ops import paged_decode as pd
ops = pd.EXTENSION.load()
print('BUILD', 'ok' if ops is not None else 'FAILED: %s' % pd.EXTENSION.failure)
print(pd.backend_report())
for d in (64, 128, 256):
    for mt in (1, 2, 4, 8):
        print('kernel_info d%d mt%d bf16' % (d, mt), ops.kernel_info(d, mt, True, 0, 0) if ops else None)
" >"$RESULTS/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - START ))s"
grep -E "^BUILD|kernel_info|impl" "$RESULTS/build.log"
echo "ptxas (entry: registers, spills):"
grep -E "Compiling entry|spill|Used [0-9]+ registers" "$RESULTS/build.log" | paste - - - \
    | sed -E "s/.*paged_decode_(kernel|combine_kernel)I([^E]*)E+vNS_17PagedDecodeParamsE' for '(sm_[0-9]+)'/\1 \2 \3/; s/ptxas info *: //g; s/bytes stack frame, //; s/, used [0-9]+ barriers.*//" \
    | sort -u | head -n 60

# 2. Tests (CUDA kernel, Triton on the GPU, API).
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
START=$(date +%s)
OMP_NUM_THREADS=2 timeout "$(left 110)" $PY -m pytest tests/ops/test_paged_decode.py -q $XDIST -p no:cacheprovider -rfE \
    --maxfail=40 \
    2>&1 | tee "$RESULTS/pytest.log" | tail -n 40
TEST_RC=${PIPESTATUS[0]}
echo "pytest rc=$TEST_RC in $(( $(date +%s) - START ))s"

# 3. Benchmark.
START=$(date +%s)
timeout "$(left 170)" $PY -m hf_efficient.bench.decode --out "$RESULTS/bench" $SWEEP 2>&1 | tee "$RESULTS/bench.log" | tail -n 30
BENCH_RC=${PIPESTATUS[0]}
echo "bench rc=$BENCH_RC in $(( $(date +%s) - START ))s"
cp "$RESULTS"/bench/*/decode.json "$RESULTS"/bench/*/decode.md "$RESULTS/" 2>/dev/null
rm -rf "$RESULTS/bench"
if [[ -n $SWEEP ]]; then
    $PY -c "
import json; r = json.load(open('$RESULTS/decode.json'))
for row in r['rows']:
    if 'sweep' in row: print(row['case'], {k: round(v, 2) if isinstance(v, float) else v for k, v in row['sweep'].items()})
" 2>/dev/null
fi
echo "== summary: pytest rc=$TEST_RC bench rc=$BENCH_RC"
grep -E "passed|failed" "$RESULTS/pytest.log" | tail -n 3
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))
