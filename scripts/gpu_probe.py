"""Decode-step probe for tuning on the GPU (not a benchmark of record: random-init models, no anchors).

For the SmolLM2 shape and the 1B Llama shape it times engine variants (``VARIANTS``, batch 1 unless named:
programmatic dependent launch off, rotary as its own kernel, larger prefetch tiles, one-row kernels off or retiled,
the model's forward instead of the native step, no run-ahead, forced attention-kernel variants, fused step
bookkeeping off; each variant's knobs are a ``tuning.override()`` around building and running its engine; batches of 2, 4 and 8 with the one-row kernels, the tile kernels or the model's forward): tokens/s of
one 256-token greedy call, back-to-back replays of the captured step, and at batch 1 the GPU timeline of one call
from the profiler: busy time, the idle gaps between kernels, and the host functions running during the largest
gaps. Writes ``probe.json`` (and a gzipped trace of one call) into the given folder.

    python scripts/gpu_probe.py OUT_DIR
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_efficient import tuning
from hf_efficient.bench.generate import _timed, replay_ms_per_step
from hf_efficient.generation.engine import DecodeEngine
from hf_efficient.generation.sampling import SamplingParams

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}


def _model(shape):
    cfg = LlamaConfig(max_position_embeddings=8192, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def _timeline(engine, prompt, params, trace_path: Path | None) -> dict:
    """GPU busy/idle over one call, and what the host ran during the largest idle gaps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate([prompt], params)
        torch.cuda.synchronize()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"trace_{os.getpid()}.json"
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    path.unlink()
    if trace_path is not None:
        with gzip.open(trace_path, "wt") as f:
            json.dump(trace, f)
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    cpu = [e for e in events if e.get("cat") in ("cpu_op", "python_function", "user_annotation", "cuda_runtime",
                                                  "cuda_driver")]
    if not gpu:
        return {}
    busy, gaps, end = 0.0, [], gpu[0]["ts"]
    for e in gpu:
        if e["ts"] > end:
            gaps.append((e["ts"] - end, end))
        busy += e["dur"]
        end = max(end, e["ts"] + e["dur"])
    span = end - gpu[0]["ts"]
    first_cpu = min(e["ts"] for e in cpu) if cpu else gpu[0]["ts"]
    big = sorted(gaps, reverse=True)[:12]

    def during(t0, t1):
        names = {}
        for e in cpu:
            if e["ts"] < t1 and e["ts"] + e["dur"] > t0 and e["dur"] < 5e5:
                names[e["name"][:60]] = names.get(e["name"][:60], 0) + 1
        return sorted(names, key=lambda n: -names[n])[:8]

    return {
        "gpu_span_ms": span / 1e3, "gpu_busy_ms": busy / 1e3, "idle_ms": (span - busy) / 1e3,
        "host_before_first_gpu_ms": (gpu[0]["ts"] - first_cpu) / 1e3,
        "gaps_over_20us": sum(1 for g, _ in gaps if g > 20), "idle_in_gaps_over_20us_ms":
            sum(g for g, _ in gaps if g > 20) / 1e3,
        "largest_gaps": [{"us": round(g, 1), "at_ms": round((t - gpu[0]["ts"]) / 1e3, 2), "host": during(t, t + g)}
                         for g, t in big],
    }


def _phases(engine, prompt, params) -> dict:
    """Host time of one call split by engine phase (a sync inside a phase counts its wait for the GPU)."""
    names = ("_native_check", "_admit", "_sync", "_decode_step", "_preempt")
    spent = {n: 0.0 for n in names}
    originals = {n: getattr(engine, n) for n in names}

    def wrap(n):
        fn = originals[n]

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[n] += time.perf_counter() - t0
        return timed

    for n in names:
        setattr(engine, n, wrap(n))
    try:
        _, total = _timed(lambda: engine.generate([prompt], params))
    finally:
        for n in names:
            delattr(engine, n)
    return {"total": 1e3 * total, **{n: 1e3 * v for n, v in spent.items()}}


VARIANTS = {  # label: (tuning.override() fields, engine keywords)
    "default": ({}, {}),
    "pdl off": ({"pdl": False}, {}),
    "rope as its own kernel": ({"fused_rope": False}, {}),
    "prefetch tile 16k": ({"prefetch_tile": 16384}, {}),
    "no run-ahead": ({}, {"run_ahead": False}),
    "fused step off": ({"fused_step": False}, {}),
    "gemv off": ({"gemv": False}, {}),
    "gemv 1 warp tile 4k": ({"gemv_tile": 4096, "gemv_warps": 1}, {}),
    "gemv 8 warps tile 16k": ({"gemv_tile": 16384, "gemv_warps": 8}, {}),
    "gemv 4 warps tile 4k": ({"gemv_tile": 4096, "gemv_warps": 4}, {}),
    "gemv 4 warps tile 8k": ({"gemv_tile": 8192, "gemv_warps": 4}, {}),
    "gemv 16 warps tile 32k": ({"gemv_tile": 32768, "gemv_warps": 16}, {}),
    "gemv persistent": ({"gemv_persistent": True}, {}),
    "model forward": ({}, {"native": False}),
    "auto": ({}, {"native": None}),
    # the attention kernel's variants forced (the plan picks 0 or 3 per call)
    "decode v0": ({"paged_decode_variant": 0}, {}),
    "decode v3": ({"paged_decode_variant": 3}, {}),
    # small batches (B prompts decoded together; tok/s counts all of them): the one-row kernels at B rows vs the
    # tile kernels vs the model's forward, and what the automatic choice picks
    "batch 2": ({}, {"batch": 2}),
    "batch 2 tile kernels": ({"gemv_max_m": 1}, {"batch": 2}),
    "batch 2 model forward": ({}, {"batch": 2, "native": False}),
    "gemv not persistent": ({"gemv_persistent": False}, {}),
    "batch 4": ({"gemv_max_m": 4}, {"batch": 4}),
    "batch 4 tile kernels": ({}, {"batch": 4}),
    "batch 4 model forward": ({}, {"batch": 4, "native": False}),
    "batch 4 auto": ({}, {"batch": 4, "native": None}),
    "batch 8": ({}, {"batch": 8}),
    "batch 8 one-row kernels": ({"gemv_max_m": 8}, {"batch": 8}),
    "batch 8 model forward": ({}, {"batch": 8, "native": False}),
}
# PROBE_LABELS="default,fused step off": run only these variants (PROBE_LABELS_LLAMA1B etc.: for one shape); PROBE_LIGHT=1: skip the host-phase and timeline
# parts (tok/s and replay times only)
LIGHT = os.environ.get("PROBE_LIGHT", "0") == "1"


def _one(model, prompt, shape: str, label: str, out: Path) -> dict:
    knobs, kw = VARIANTS[label]
    with tuning.override(**knobs):  # the engine is built and its graphs captured inside
        return _measure(model, prompt, shape, label, out, dict(kw))


def _measure(model, prompt, shape: str, label: str, out: Path, kw: dict) -> dict:
    batch = kw.pop("batch", 1)
    engine = DecodeEngine(model, max_batch=batch, max_tokens=1024 * batch, sync_every=16,
                          **{"native": True, **kw})
    prompts = [[t + 7 * i for t in prompt] for i in range(batch)]
    p256 = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
    p64 = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    _, warm = _timed(lambda: engine.generate(prompts, p64))
    engine.generate(prompts, p256)
    outs, t256 = _timed(lambda: engine.generate(prompts, p256))
    _, t64 = _timed(lambda: engine.generate(prompts, p64))
    per_tok = (t256 - t64) / 192
    row = {
        "batch": batch, "tok_s_256": batch * 256 / t256, "warmup_s": warm, "replay_ms": replay_ms_per_step(engine),
        "marginal_ms_per_step": 1e3 * per_tok, "fixed_ms_per_call": 1e3 * (t64 - 64 * per_tok),
        "native_max_batch": engine.stats.native_max_batch, "tokens_head": outs[0][0].output[:8],
    }
    if not LIGHT and batch == 1:
        row["host_phases_ms_256"] = _phases(engine, prompt, p256)
        trace = out / f"trace_{shape}.json.gz" if shape == "smollm2" and label == "default" else None
        row["timeline_64"] = _timeline(engine, prompt, p64, trace)
    print(shape, label, {k: v for k, v in row.items() if k not in ("timeline_64", "host_phases_ms_256")},
          flush=True)
    return row


def probe(shape: str, out: Path) -> dict:
    model = _model(shape)
    prompt = list(range(100, 140))
    labels = list(VARIANTS) if shape == "smollm2" else ["default", "gemv off", "model forward"]
    chosen = os.environ.get(f"PROBE_LABELS_{shape.upper()}") or os.environ.get("PROBE_LABELS")
    if chosen:
        labels = [x for x in chosen.split(",") if x in VARIANTS]
    res = {label: _one(model, prompt, shape, label, out) for label in labels}
    torch.cuda.empty_cache()
    if "default" in res:
        res["same_tokens_as_default"] = {k: v["tokens_head"] == res["default"]["tokens_head"] for k, v in res.items()}
    return res


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    shapes = sys.argv[2:] or list(SHAPES)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for shape in shapes:
        try:
            result[shape] = probe(shape, out)
        except Exception as err:  # report and go on with the next shape
            import traceback

            traceback.print_exc()
            result[shape] = {"error": repr(err)[:500]}
        (out / "probe.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
