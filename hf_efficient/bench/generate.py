"""Generation throughput on the GPU: hf_efficient's engine vs transformers, measured in the same run.

    hf-efficient bench generate [--out docs/benchmarks] [--quick] [--with-compile]

Cases (SmolLM2-135M-Instruct, dense bf16, greedy, eos ignored so every system generates the same tokens):

* batch 1, 256 new tokens: ours vs HF eager ``generate`` (and HF static cache + ``torch.compile`` with
  ``--with-compile``: ~100 s of compiling);
* 64 requests, prompts 32-512 tokens, 256 new tokens each: ours vs ``generate_batch`` (continuous batching) and a
  padded ``generate``;
* a random-init 1B-class Llama (hidden 2048, 16 layers, GQA 32/8, vocab 128k), batch 1: tokens/s and the
  fraction of HBM bandwidth (weight bytes per step / step time, against the device copy bandwidth measured here).

Warm-up (graph capture, kernel compilation) is timed separately from steady-state generation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from . import DEFAULT_OUT


def _sync():
    torch.cuda.synchronize()


def _timed(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t


def _copy_bandwidth() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    _, t = _timed(lambda: [b.copy_(a) for _ in range(10)])
    return 2 * n * 10 / t / 1e12


def _prompts(vocab: int, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _ours(model, prompts, new, max_batch, **engine_kw):
    from ..generation.engine import DecodeEngine
    from ..generation.sampling import SamplingParams

    total = sum(len(p) for p in prompts) + len(prompts) * (new + 32)
    engine = DecodeEngine(model, max_batch=max_batch, max_tokens=total, sync_every=16, **engine_kw)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    _, warm = _timed(lambda: engine.generate(prompts, params))  # captures graphs, compiles kernels
    groups, t = _timed(lambda: engine.generate(prompts, params))
    tokens = sum(len(r.output) for g in groups for r in g)
    assert tokens == new * len(prompts), "every request must generate exactly `new` tokens"
    return tokens / t, warm, t, engine.stats, [r.output for g in groups for r in g]


#: engine variants measured beside the default (native decode step where the model allows it)
VARIANTS = {
    "model forward": dict(native=False, fused_layers=False),
    "model forward + fused_layers": dict(native=False, fused_layers=True),
    "native": dict(native=True),
}


def _variant(model, prompts, new, max_batch, base_outputs, notes, key, label, kw):
    """One engine variant: its speed, warm-up and greedy-token agreement with the default engine."""
    try:
        tps, warm, _, stats, outs = _ours(model, prompts, new, max_batch, **kw)
    except Exception as err:  # report, don't hide
        notes[f"{key} [{label}] error"] = repr(err)[:300]
        return None
    same = sum(a == b for o, p in zip(outs, base_outputs) for a, b in zip(o, p)) / sum(map(len, outs))
    notes[f"{key} [{label}] token agreement with default"] = same
    return tps, warm


def replay_ms_per_step(engine) -> float | None:
    """Back-to-back replays of a captured decode step: GPU time per step, kernels + in-graph gaps (None: no graph)."""
    graphs = [g for k, g in engine.runner.graphs.items() if k.kind == "decode"]
    if not graphs:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 0
    start.record()
    for _ in range(8):
        engine.runner.hist_idx.zero_()
        for _ in range(engine.sync_every - 1):
            graphs[0].replay()
            reps += 1
    end.record()
    _sync()
    engine.runner.hist_idx.zero_()
    return start.elapsed_time(end) / reps


def kernels_by_launch(events: list[dict], steps: int, top: int = 12) -> list[dict]:
    """Kernel events of a profiler trace (chrome-trace ``"X"`` events of category ``kernel``) grouped by name and
    grid: launches per step, median and largest duration (us) and time per step (us), largest first. One kernel
    serves several projections of a decode step; their grids usually tell them apart (the largest duration shows
    a different projection sharing a grid, such as the LM head)."""
    groups: dict[tuple, list[float]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            grid = tuple((e.get("args") or {}).get("grid") or ())
            groups.setdefault((e["name"][:60], grid), []).append(float(e["dur"]))
    rows = []
    for (name, grid), durs in groups.items():
        durs.sort()
        rows.append({"kernel": name, "grid": list(grid), "per_step": round(len(durs) / steps, 2),
                     "median_us": round(durs[len(durs) // 2], 2), "max_us": round(durs[-1], 2),
                     "us_per_step": round(sum(durs) / steps, 1)})
    return sorted(rows, key=lambda r: -r["us_per_step"])[:top]


def _profile_step(model, prompt, new=64, **kw) -> dict:
    """Profile the bs1 decode loop: kernels launched per step, GPU kernel time per step vs wall time per step.

    Wall time is of a separate un-profiled run of ``new`` tokens and includes its prefill."""
    from torch.profiler import ProfilerActivity, profile

    from ..generation.engine import DecodeEngine
    from ..generation.sampling import SamplingParams

    engine = DecodeEngine(model, max_batch=1, max_tokens=len(prompt) + 4 * new + 64, sync_every=16, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    engine.generate([prompt], params)
    # per-token cost and per-call cost: the same engine timed at new and 4 * new tokens
    long_params = SamplingParams(temperature=0.0, max_tokens=4 * new, ignore_eos=True)
    engine.generate([prompt], long_params)
    _, t_long = _timed(lambda: engine.generate([prompt], long_params))
    _, t_short = _timed(lambda: engine.generate([prompt], params))
    per_token_ms = 1e3 * (t_long - t_short) / (3 * new)
    per_call_ms = 1e3 * t_short - new * per_token_ms
    host = {"s": 0.0, "n": 0}
    step = engine._decode_step

    def timed_step():  # host time of a step (no sync: the GPU runs behind)
        t0 = time.perf_counter()
        step()
        host["s"] += time.perf_counter() - t0
        host["n"] += 1

    engine._decode_step = timed_step
    _, wall = _timed(lambda: engine.generate([prompt], params))
    engine._decode_step = step
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate([prompt], params)
    replay_ms = replay_ms_per_step(engine)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        by_launch = kernels_by_launch(json.loads(trace.read_text()).get("traceEvents", []), new - 1)
    rows = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    kernel_us = sum(e.self_device_time_total for e in rows)
    launches = sum(e.count for e in rows)
    steps = new - 1  # the first token comes from the prefill
    top = sorted(rows, key=lambda e: -e.self_device_time_total)[:12]
    return {
        "fused_layers": engine.fused_layers, "native": engine.stats.native_reason is None, "step_ms_wall": 1e3 * wall / new,
        "kernels_per_step": launches / steps, "kernel_ms_per_step": kernel_us / 1e3 / steps,
        "graph_replay_ms_per_step": replay_ms, "host_ms_per_step": 1e3 * host["s"] / max(host["n"], 1),
        "marginal_ms_per_token": per_token_ms, "fixed_ms_per_call": per_call_ms,
        "top_kernels": [(e.key[:60], round(e.self_device_time_total / steps, 1), round(e.count / steps, 2))
                        for e in top],
        "kernels_by_launch": by_launch,
    }


def _hf_generate(model, prompts, new, pad_id):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id)
    model.generate(ids[:, :], **dict(kw, max_new_tokens=4, min_new_tokens=4))
    out, t = _timed(lambda: model.generate(ids, **kw))
    return (out.shape[1] - width) * len(prompts) / t


def _hf_generate_batch(model, prompts, new):
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=-1,
                           pad_token_id=0)
    model.generate_batch(inputs=prompts[:4], generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0))
    out, t = _timed(lambda: model.generate_batch(inputs=prompts, generation_config=cfg))
    tokens = sum(len(r.generated_tokens) for r in out.values())
    return tokens / t


def _hf_static_compile(model, prompt, new, pad_id):
    """transformers' static cache, which makes ``generate`` compile the forward (torch.compile, reduce-overhead)."""
    ids = torch.tensor([prompt], device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
              pad_token_id=pad_id, cache_implementation="static")
    _, first = _timed(lambda: model.generate(ids, **kw))  # compiles
    model.generate(ids, **kw)
    out, t = _timed(lambda: model.generate(ids, **kw))
    return (out.shape[1] - ids.shape[1]) / t, first


def _llama_1b():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      tie_word_embeddings=True)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.eval()
    return model


def run(out_dir=DEFAULT_OUT, quick=False, with_compile=False) -> dict:
    from transformers import AutoModelForCausalLM

    from ..env import versions_short
    from ..models import resolve_model

    if not torch.cuda.is_available():
        raise SystemExit("bench generate needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    slug = "h100" if "H100" in name else "h200" if "H200" in name else name.split()[-1].lower()
    path = resolve_model("smollm2")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    vocab, pad = model.config.vocab_size, 2
    rows, notes = [], {}
    new = 64 if quick else 256
    copy_tbps = _copy_bandwidth()
    # The CUDA paged-decode library is built once per machine (then cached on disk); time that
    # apart so the warm-up figures below are what every later process pays.
    from ..ops.paged_decode import EXTENSION

    status = EXTENSION.status()[1]
    t_build = time.perf_counter()
    EXTENSION.load()
    notes["paged_decode_library"] = {"status_before": status.split(" in ")[0].split(" into ")[0],
                                     "load_or_build_s": round(time.perf_counter() - t_build, 2),
                                     "failure": EXTENSION.failure}

    # batch 1
    chat = _prompts(vocab, 1, 40, 40, seed=1)
    ours1, warm1, _, stats1, outs1 = _ours(model, chat, new, max_batch=1)
    notes["native_reason_smollm2"] = stats1.native_reason
    eager1 = _hf_generate(model, chat, 32 if not quick else 8, pad)
    anchors = {"hf_eager": eager1}
    if with_compile:
        try:
            comp, first = _hf_static_compile(model, chat[0], new, pad)
            anchors["hf_static_compile"] = comp
            notes["hf_static_compile_first_call_s"] = first
        except Exception as err:  # report, don't hide
            notes["hf_static_compile_error"] = repr(err)[:300]
        torch._dynamo.reset()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    case1 = f"SmolLM2 bs1 greedy {new} new"
    rows.append({"case": case1, "ours": ours1, "anchors": anchors, "ours_warmup_s": warm1})
    for label, kw in VARIANTS.items():
        if (res := _variant(model, chat, new, 1, outs1, notes, case1, label, kw)) is not None:
            rows.append({"case": f"{case1} [{label}]", "ours": res[0], "anchors": anchors, "ours_warmup_s": res[1]})
    for label, kw in [("default", {}), *VARIANTS.items()]:
        try:
            notes[f"profile bs1 [{label}]"] = _profile_step(model, chat[0], **dict(kw))
        except Exception as err:
            notes[f"profile bs1 [{label}] error"] = repr(err)[:300]
    print(rows[-1], flush=True)

    # 64 requests
    reqs = _prompts(vocab, 8 if quick else 64, 32, 512, seed=2)
    ours64, warm64, t64, stats64, outs64 = _ours(model, reqs, new, max_batch=64)
    anchors64 = {}
    try:
        anchors64["generate_batch"] = _hf_generate_batch(model, reqs, new)
    except Exception as err:  # report, don't hide
        notes["generate_batch_error"] = repr(err)[:300]
    anchors64["hf_padded_generate"] = _hf_generate(model, reqs, new, pad)
    case64 = f"SmolLM2 {len(reqs)} requests prompts 32-512, {new} new"
    rows.append({"case": case64, "ours": ours64, "anchors": anchors64, "ours_warmup_s": warm64})
    variants64 = dict(VARIANTS, **{"native at every batch size": dict(native=True, native_max_batch=512)})
    for label, kw in variants64.items():
        if (res := _variant(model, reqs, new, 64, outs64, notes, case64, label, kw)) is not None:
            rows.append({"case": f"{case64} [{label}]", "ours": res[0], "anchors": anchors64,
                         "ours_warmup_s": res[1]})
    print(rows[-1], flush=True)

    # 1B-class Llama, batch 1
    del model
    torch.cuda.empty_cache()
    big = _llama_1b()
    weight_bytes = sum(p.numel() * p.element_size() for p in big.parameters())
    big_prompt = _prompts(128000, 1, 64, 64, seed=3)
    big_new = 128 if not quick else 32
    ours_b, warm_b, t_b, _, outs_b = _ours(big, big_prompt, big_new, max_batch=1)
    case_b = "Llama-1B shape (random init) bs1 greedy"
    found = [("", ours_b, warm_b)]
    for label, kw in VARIANTS.items():
        if (res := _variant(big, big_prompt, big_new, 1, outs_b, notes, case_b, label, kw)) is not None:
            found.append((f" [{label}]", *res))
    for label, tps, warm in found:
        step_s = 1.0 / tps
        rows.append({"case": f"{case_b}{label}", "ours": tps, "anchors": {},
                     "ours_warmup_s": warm, "step_ms": 1e3 * step_s,
                     "hbm_fraction_of_copy": weight_bytes / step_s / 1e12 / copy_tbps,
                     "weight_gb": weight_bytes / 1e9})
    try:
        notes["profile llama1b bs1 [default]"] = _profile_step(big, big_prompt[0], new=32)
    except Exception as err:
        notes["profile llama1b bs1 [default] error"] = repr(err)[:300]
    print(rows[-1], flush=True)

    result = {
        "gpu": name, "date": datetime.date.today().isoformat(), "versions": versions_short(), "unit": "tok/s",
        "copy_TBps": copy_tbps, "rows": rows, "notes": notes,
        "engine_stats": {"bs1": vars(stats1), "batch64": vars(stats64)},
    }
    out = Path(out_dir) / slug
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps(result, indent=1, default=str))
    lines = ["| case | ours tok/s | anchors tok/s | ours / anchor | warm-up s |", "|---|---|---|---|---|"]
    for r in rows:
        anc = ", ".join(f"{k} {v:.1f}" for k, v in r["anchors"].items()) or "-"
        ratio = ", ".join(f"{r['ours'] / v:.1f}x {k}" for k, v in r["anchors"].items()) or "-"
        lines.append(f"| {r['case']} | {r['ours']:.1f} | {anc} | {ratio} | {r['ours_warmup_s']:.1f} |")
    (out / "generate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hf-efficient bench generate")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--with-compile", action="store_true", help="also time HF static cache + torch.compile")
    args = parser.parse_args(argv)
    run(args.out, args.quick, args.with_compile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
