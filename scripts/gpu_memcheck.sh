#!/usr/bin/env bash
# compute-sanitizer memcheck over the GPU tests of the paged decode and varlen flash kernels, including the
# out-of-range fuzz cases of tests/ops/test_memory_safety.py. Run on a GPU machine:
#
#   scripts/gpu_memcheck.sh RESULTS_DIR
#
# Writes RESULTS_DIR/memcheck.log (compute-sanitizer's report and pytest's output) and prints the error summary.
# Autotuning is off (fixed launch configs) so the run checks the kernels, not hundreds of tuning launches.
set -uo pipefail
RESULTS=$(mkdir -p "${1:?usage: scripts/gpu_memcheck.sh RESULTS_DIR}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
SAN="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
if [ ! -x "$SAN" ]; then
  echo "gpu_memcheck: compute-sanitizer not found (set COMPUTE_SANITIZER)"; exit 2
fi
export HF_EFFICIENT_FLASH_AUTOTUNE=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# On a GPU machine every test of these files runs on the GPU (device fixture, plus the gpu-marked ones):
# test_memory_safety.py and test_paged_decode.py whole, test_flash_attn.py's varlen and paged tests.
"$SAN" --tool memcheck --error-exitcode 99 --print-limit 50 \
  python -m pytest -q -p no:cacheprovider -x \
    tests/ops/test_memory_safety.py tests/ops/test_paged_decode.py \
  >"$RESULTS/memcheck.log" 2>&1
rc1=$?
"$SAN" --tool memcheck --error-exitcode 99 --print-limit 50 \
  python -m pytest -q -p no:cacheprovider -x -k "varlen or paged" tests/ops/test_flash_attn.py \
  >>"$RESULTS/memcheck.log" 2>&1
rc2=$?
grep -E "ERROR SUMMARY|passed|failed|error" "$RESULTS/memcheck.log" | tail -10
echo "gpu_memcheck: exit codes $rc1 $rc2 (99 = memcheck errors, 0 = clean and tests passed)"
[ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ]
