"""Cold-start warm-up of the engine, with and without compiling ahead (GPU machine; random-init SmolLM2 shape).

Each variant runs in a fresh process with an empty Triton cache (its own ``TRITON_CACHE_DIR``), as on a machine that
never ran the engine (the CUDA paged-decode library, cached per machine, is built first): the first ``generate`` (batch 1, a 40-token prompt, 64 new tokens) captures the native prefill
and decode graphs and compiles every kernel they use. Prints one JSON line per variant and writes them to OUT_JSON.

    python scripts/warmup_probe.py [OUT_JSON]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from hf_efficient.generation.engine import DecodeEngine
from hf_efficient.generation.sampling import SamplingParams
from hf_efficient.ops import precompile

cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
engine = DecodeEngine(model, max_batch=1, max_tokens=1024)
params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
prompt = [list(range(100, 140))]
torch.cuda.synchronize()
t = time.perf_counter()
first = engine.generate(prompt, params)
torch.cuda.synchronize()
warm = time.perf_counter() - t
t = time.perf_counter()
second = engine.generate(prompt, params)
torch.cuda.synchronize()
print(json.dumps({"first_call_s": round(warm, 2), "second_call_s": round(time.perf_counter() - t, 3),
                  "graph_capture_s": round(engine.stats.graph_capture_s, 2),
                  "buckets": [list(map(str, k)) for k in engine.stats.graph_buckets],
                  "same_tokens": first[0][0].output == second[0][0].output,
                  "precompile": dict(precompile.STATS)}))
"""


def main() -> int:
    from hf_efficient.ops.paged_decode import EXTENSION

    EXTENSION.load()  # the CUDA library is built once per machine (cached): not part of either variant
    rows = []
    for ahead in ("0", "1"):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TRITON_CACHE_DIR=cache, HF_EFFICIENT_COMPILE_AHEAD=ahead)
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
        line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("{")), None)
        row = {"compile_ahead": ahead == "1", **(json.loads(line) if line else {"error": out.stderr[-600:]})}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
