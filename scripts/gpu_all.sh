#!/usr/bin/env bash
# GPU machine: install the tree, record the environment, run the GPU-marked tests, then the generation and
# packed-SFT benchmarks. Every stage has its own time limit and the script goes on after a failed stage.
#
#   STAGES="tests generate sft probe attention decode warmup" GEN_ARGS="--with-compile" scripts/gpu_all.sh RESULTS_DIR [pytest paths...]
#   (DECODE_ARGS="--sweep": variant x split table; PROBE_SHAPES="smollm2", PROBE_LABELS/PROBE_LIGHT: see gpu_probe.py)
#
# Results land at most two folders below RESULTS_DIR (bench/<gpu>/...), so that a results folder copied back from a
# remote machine keeps its whole tree. "probe" runs scripts/gpu_probe.py (engine variants, random-init shapes).
#
# Needs the real test model: HF_EFFICIENT_SMOLLM2_GGUF pointing at the GGUF (the machine has no network).
set -uo pipefail
RESULTS=$(mkdir -p "${1:?usage: scripts/gpu_all.sh RESULTS_DIR}" && cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_EFFICIENT_OFFLINE=1
PY=${PYTHON:-python3}
STAGES=" ${STAGES:-tests generate sft} "
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -n 2
hf-efficient env 2>&1 | tee "$RESULTS/env.txt"
TEST_RC=- GEN_RC=- SFT_RC=-
if [[ $STAGES == *" tests "* ]]; then
  TESTS=${*:-tests/attention tests/cache tests/generation tests/models tests/ops/test_kv_store.py \
    tests/ops/test_fused_layers.py tests/ops/test_decode_linear.py tests/ops/test_paged_decode.py}
  timeout ${GPU_TEST_TIMEOUT:-300} $PY -m pytest -m gpu $TESTS -q -p no:cacheprovider -rfEs -s 2>&1 \
      | tee "$RESULTS/gpu_tests.log" | grep -E "^(FAILED|ERROR)|passed|failed|agreement|divergence|noise" | tail -n 30
  TEST_RC=${PIPESTATUS[0]}
  # the decode-layer ops also run in bf16 on the GPU without the gpu marker (with the default test paths)
  [ $# -eq 0 ] && timeout 120 $PY -m pytest tests/ops/test_decode_linear.py tests/generation/test_native.py -q -p no:cacheprovider 2>&1 \
      | tee "$RESULTS/gpu_native_tests.log" | tail -n 3
fi
if [[ $STAGES == *" generate "* ]]; then
  timeout ${BENCH_TIMEOUT:-500} hf-efficient bench generate --out "$RESULTS/bench" ${GEN_ARGS:-} 2>&1 \
      | tee "$RESULTS/bench_generate.log" | tail -n 16
  GEN_RC=${PIPESTATUS[0]}
fi
if [[ $STAGES == *" sft "* ]]; then
  timeout ${SFT_TIMEOUT:-240} $PY -m hf_efficient.bench.sft_parity --out "$RESULTS/bench" 2>&1 \
      | tee "$RESULTS/bench_sft.log" | tail -n 5
  SFT_RC=${PIPESTATUS[0]}
fi
ATT_RC=- DEC_RC=-
if [[ $STAGES == *" attention "* ]]; then
  timeout ${ATTENTION_TIMEOUT:-420} hf-efficient bench attention --out "$RESULTS/bench" 2>&1 \
      | tee "$RESULTS/bench_attention.log" | grep -vE "^\s+\[" | tail -n 60
  ATT_RC=${PIPESTATUS[0]}
fi
if [[ $STAGES == *" decode "* ]]; then
  timeout ${DECODE_TIMEOUT:-200} hf-efficient bench decode --out "$RESULTS/bench" ${DECODE_ARGS:-} 2>&1 \
      | tee "$RESULTS/bench_decode.log" | tail -n 16
  DEC_RC=${PIPESTATUS[0]}
fi
if [[ $STAGES == *" warmup "* ]]; then  # cold-cache engine warm-up, compiling ahead off / on
  timeout ${WARMUP_TIMEOUT:-240} $PY scripts/warmup_probe.py "$RESULTS/warmup_probe.json" 2>&1 | tail -n 4
fi
PROBE_RC=-
if [[ $STAGES == *" probe "* ]]; then
  timeout ${PROBE_TIMEOUT:-330} $PY scripts/gpu_probe.py "$RESULTS/probe" ${PROBE_SHAPES:-} 2>&1 | tee "$RESULTS/probe.log" | tail -n 10
  PROBE_RC=${PIPESTATUS[0]}
fi
echo "== summary: gpu tests rc=$TEST_RC bench generate rc=$GEN_RC sft_parity rc=$SFT_RC probe rc=$PROBE_RC" \
  "attention rc=$ATT_RC decode rc=$DEC_RC"
[ -f "$RESULTS/gpu_tests.log" ] && grep -E "passed|failed" "$RESULTS/gpu_tests.log" | tail -n 2
exit 0
