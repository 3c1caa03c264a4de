#!/usr/bin/env bash
# Flash attention on a GPU machine: correctness tests, then the benchmark.
#
#   scripts/gpu_attention.sh RESULTS_DIR [--isolated]
#
# Writes RESULTS_DIR/pytest.log, RESULTS_DIR/bench.log and RESULTS_DIR/bench/<gpu>/attention.{json,md,png},
# then prints a compact summary. The benchmark's kernel variants compile in background worker
# processes while the tests run (Triton's on-disk cache is shared), so a cold machine finishes in
# a few minutes. --isolated runs a copy of just the flash-attention modules (stub package
# __init__), so unrelated modules of the tree cannot break the run.
set -uo pipefail
RESULTS=$(mkdir -p "${1:?usage: scripts/gpu_attention.sh RESULTS_DIR [--isolated]}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ "${2:-}" == "--isolated" ]]; then
    ISO=$(mktemp -d)
    mkdir -p "$ISO/hf_efficient/ops" "$ISO/hf_efficient/attention" "$ISO/hf_efficient/bench" "$ISO/tests/ops"
    touch "$ISO/hf_efficient/__init__.py" "$ISO/hf_efficient/ops/__init__.py" \
          "$ISO/hf_efficient/attention/__init__.py" "$ISO/hf_efficient/bench/__init__.py" \
          "$ISO/tests/__init__.py" "$ISO/tests/ops/__init__.py"
    cp hf_efficient/ops/flash_fwd.py hf_efficient/ops/flash_bwd.py hf_efficient/ops/flash_attn.py \
       hf_efficient/ops/attention_ref.py "$ISO/hf_efficient/ops/"
    cp hf_efficient/attention/flash_api.py "$ISO/hf_efficient/attention/"
    cp hf_efficient/bench/attention.py "$ISO/hf_efficient/bench/"
    cp tests/ops/conftest.py tests/ops/test_flash_attn.py "$ISO/tests/ops/"
    cp pyproject.toml "$ISO/"
    ROOT=$ISO
    cd "$ISO"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

# Compile the benchmark's kernel variants in the background while the tests run.
$PY -c "from hf_efficient.bench.attention import _precompile; _precompile(False)" \
    >"$RESULTS/precompile.log" 2>&1 &
PRE=$!

# Tests: every test of the file runs on the GPU (fixed launch configs; one test autotunes).
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 6")
HF_EFFICIENT_FLASH_AUTOTUNE=0 timeout 170 $PY -m pytest tests/ops/test_flash_attn.py -q $XDIST \
    -p no:cacheprovider -rfE 2>&1 | tee "$RESULTS/pytest.log" | tail -n 40
TEST_RC=${PIPESTATUS[0]}

wait $PRE; echo "precompile rc=$? (log: $RESULTS/precompile.log)"; tail -n 5 "$RESULTS/precompile.log"

HF_EFFICIENT_BENCH_PRECOMPILE=0 $PY -m hf_efficient.bench.attention --out "$RESULTS/bench" \
    2>&1 | tee "$RESULTS/bench.log" | grep -E "ours|variants|skip|Error|error|wrote" | tail -n 80
BENCH_RC=${PIPESTATUS[0]}

echo "== summary: pytest rc=$TEST_RC bench rc=$BENCH_RC"
grep -E "passed|failed" "$RESULTS/pytest.log" | tail -n 3
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))
