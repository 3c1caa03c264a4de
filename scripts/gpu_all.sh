#!/usr/bin/env bash
# GPU machine: install the tree, record the environment, run the GPU-marked tests, then the generation and
# packed-SFT benchmarks. Every stage has its own time limit and the script goes on after a failed stage.
#
#   scripts/gpu_all.sh OUT_DIR [pytest paths...]
#
# Needs the real test model: HF_EFFICIENT_SMOLLM2_GGUF pointing at the GGUF (the machine has no network).
set -uo pipefail
OUT=$(mkdir -p "${1:?usage: scripts/gpu_all.sh OUT_DIR}" && cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_EFFICIENT_OFFLINE=1
PY=${PYTHON:-python3}
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -n 2
hf-efficient env 2>&1 | tee "$OUT/env.txt"
TESTS=${*:-tests/attention tests/cache tests/generation tests/models tests/ops/test_kv_store.py tests/ops/test_fused_layers.py}
timeout ${GPU_TEST_TIMEOUT:-200} $PY -m pytest -m gpu $TESTS -q -p no:cacheprovider -rfEs -s 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -E "^(FAILED|ERROR)|passed|failed|agreement|divergence|noise" | tail -n 30
TEST_RC=${PIPESTATUS[0]}
timeout ${BENCH_TIMEOUT:-200} hf-efficient bench generate --out "$OUT/bench" 2>&1 | tee "$OUT/bench_generate.log" | tail -n 12
GEN_RC=${PIPESTATUS[0]}
timeout ${SFT_TIMEOUT:-240} $PY -m hf_efficient.bench.sft_parity --out "$OUT/bench" 2>&1 | tee "$OUT/bench_sft.log" | tail -n 5
SFT_RC=${PIPESTATUS[0]}
echo "== summary: gpu tests rc=$TEST_RC bench generate rc=$GEN_RC sft_parity rc=$SFT_RC"
grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -n 2
