"""Prefill/training attention benchmark: our Triton flash attention vs SDPA's FA2 and cuDNN.

``python -m hf_efficient.bench.attention --out docs/benchmarks`` writes
``<out>/<gpu-slug>/attention.json``, ``attention.md`` and ``attention.png``.

Shapes: bf16, batch x seqlen = 16k tokens, hidden 2048 (heads = 2048 / head_dim), head_dim 64
and 128, causal and not, seqlen 512 ... 16k; forward and backward. FLOPs: 4 * S^2 * d * heads *
batch (halved when causal); backward = 2.5x forward. Plus one varlen case (causal, d128, lengths
100-4000 packed to 16k tokens; the SDPA anchors run on the right-padded batch, SDPA on jagged
nested tensors is recorded under ``variants``), the peak memory of forward + backward at
S = 16k, CUDA-graph (GPU-only) forward times of the short rows and a host-time probe. Each figure is ``triton.testing.do_bench`` median
after warm-up, on random inputs; ours and the anchors run in the same process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

from .. import tuning
from . import DEFAULT_OUT

SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
TOKENS = 16384
HIDDEN = 2048


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    low = name.lower()
    m = re.search(r"\b(gb\d{3}|[abhl]\d{2,3}[a-z]?|rtx\s?\d{4}|a\d{4})\b", low)
    if m:
        return m.group(1).replace(" ", "")
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "gpu"


def _versions():
    import torch
    import triton

    out = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "cudnn": str(torch.backends.cudnn.version())}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    return out


def _flops(seqlen, d, heads, batch, causal):
    f = 4.0 * seqlen * seqlen * d * heads * batch
    return f / 2 if causal else f


def _tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12 if ms and ms > 0 else None


def _bench(fn, grad_to_none=None):
    """Best of two ``do_bench`` medians (the same for ours and the anchors)."""
    from triton.testing import do_bench

    fn()  # warm-up (autotune, compile)
    return min(do_bench(fn, warmup=50, rep=100, grad_to_none=grad_to_none, return_mode="median")
               for _ in range(2))


def _time_pair(fwd, inputs):
    """(forward ms, backward ms) of ``fwd(*inputs)``; None where it fails."""
    import torch

    try:
        t_f = _bench(lambda: fwd(*inputs))
        out = fwd(*inputs)
        g = torch.randn_like(out)
        t_b = _bench(lambda: out.backward(g, retain_graph=True), grad_to_none=list(inputs))
        return t_f, t_b
    except Exception as e:  # an anchor may not support a shape
        print(f"  [skip] {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
        return None, None


def _sdpa(backend):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2), is_causal=causal).transpose(1, 2)
    return fn


def _precompile(quick):
    """Compile our kernels for every benchmarked variant in parallel worker processes.

    Workers run one small call per variant; the compiled kernels land in Triton's on-disk cache,
    so the timed process only loads them (the autotuner still times every config itself).
    """
    import multiprocessing as mp

    jobs = [(d, c, tma) for d in HEAD_DIMS for c in (False, True) for tma in (False, True)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(len(jobs), 8, os.cpu_count() or 1)) as pool:
        pool.starmap(_precompile_one, jobs)


def _precompile_one(d, causal, tma):
    import torch

    from ..attention.flash_api import flash_attn_func, flash_attn_varlen_func

    s = 512
    heads = HIDDEN // d
    grad = not tma
    with tuning.override(flash_tma=tma):
        q, k, v = (torch.randn(TOKENS // s, s, heads, d, device="cuda", dtype=torch.bfloat16,
                               requires_grad=grad) for _ in range(3))
        out = flash_attn_func(q, k, v, causal=causal)
        if grad:
            out.backward(torch.randn_like(out))
        if grad and causal and d == 128:  # the varlen case
            cu = torch.tensor([0, 300, 1024], dtype=torch.int32, device="cuda")
            qv, kv, vv = (x.detach().reshape(-1, heads, d)[:1024].requires_grad_() for x in (q, k, v))
            flash_attn_varlen_func(qv, kv, vv, cu, cu, 724, 724, causal=True).sum().backward()
        torch.cuda.synchronize()


def _chosen_configs():
    from ..ops import flash_bwd, flash_fwd

    out = {}
    for name, tuner in (("fwd", flash_fwd._fwd_kernel_tuned), ("dq", flash_bwd._dq_tuned),
                        ("dkdv", flash_bwd._dkdv_tuned)):
        cfg = getattr(tuner, "best_config", None)
        if cfg is not None:
            out[name] = (f"M{cfg.kwargs.get('BLOCK_M')} N{cfg.kwargs.get('BLOCK_N')} "
                         f"w{cfg.num_warps} s{cfg.num_stages}")
    return out


def _dense_cases(quick):
    seqlens = (1024, 16384) if quick else SEQLENS
    for d in HEAD_DIMS:
        for causal in (False, True):
            for s in seqlens:
                yield d, causal, s


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def run(out_dir, quick=False) -> dict:
    """Run the benchmark on the current CUDA device and write json/md/png under out_dir/<gpu>."""
    import torch
    from torch.nn.attention import SDPBackend

    from ..attention.flash_api import flash_attn_func, flash_attn_varlen_func

    if not torch.cuda.is_available():
        raise RuntimeError("the attention benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    slug = gpu_slug(name)
    if tuning.get().bench_precompile:
        _precompile(quick)
    flash, cudnn = _sdpa(SDPBackend.FLASH_ATTENTION), _sdpa(SDPBackend.CUDNN_ATTENTION)
    rows, variants, checks = [], [], []
    result = {"gpu": name, "date": datetime.date.today().isoformat(), "versions": _versions(),
              "unit": "TFLOP/s", "rows": rows, "peak_memory_MiB": None, "variants": variants,
              "checks": checks}
    dest = Path(out_dir) / slug
    dest.mkdir(parents=True, exist_ok=True)
    tma = tuning.get().flash_tma
    t0 = time.time()
    for d, causal, s in _dense_cases(quick):
        heads, batch = HIDDEN // d, TOKENS // s
        q, k, v = (torch.randn(batch, s, heads, d, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        ours = lambda q, k, v, c=causal: flash_attn_func(q, k, v, causal=c)  # noqa: E731
        o_f, o_b = _time_pair(ours, (q, k, v))
        configs = _chosen_configs()
        fa_f, fa_b = _time_pair(lambda q, k, v, c=causal: flash(q, k, v, c), (q, k, v))
        cu_f, cu_b = _time_pair(lambda q, k, v, c=causal: cudnn(q, k, v, c), (q, k, v))
        extra = {}
        # Alternative path of ours, for the record: K/V through TMA descriptors in the forward.
        with tuning.override(flash_tma=not tma):
            extra["fwd_no_tma" if tma else "fwd_tma"] = _bench(lambda f=ours, a=(q, k, v): f(*a))
        if s <= 1024:  # short rows: GPU-only forward time (CUDA graph replay, no host overhead)
            extra["fwd_graph_ours"] = _graph_ms(lambda f=ours, a=(q, k, v): f(*a))
            extra["fwd_graph_sdpa_flash"] = _graph_ms(lambda c=causal, a=(q, k, v): flash(*a, c))
        flops = _flops(s, d, heads, batch, causal)
        tag = f"d{d} {'causal' if causal else 'non-causal'} S={s}"
        for kind, mult, o, a, c in (("fwd", 1.0, o_f, fa_f, cu_f), ("bwd", 2.5, o_b, fa_b, cu_b)):
            rows.append({"case": f"{kind} {tag}", "ours": _tflops(flops * mult, o),
                         "anchors": {"sdpa_flash": _tflops(flops * mult, a),
                                     "sdpa_cudnn": _tflops(flops * mult, c)}})
        variants.append({"case": tag, **{key: _tflops(flops * (1.0 if key.startswith("fwd") else 2.5), ms)
                                          for key, ms in extra.items()}, "configs": configs})
        print(f"  [{time.time() - t0:.0f}s] variants: {variants[-1]}", flush=True)
        with torch.no_grad():
            ref = flash(q, k, v, causal)
            checks.append({"case": tag, "max_abs_diff_vs_sdpa_flash": _max_diff(ours(q, k, v), ref)})
        _print_rows(rows[-2:])
        _write(dest, result, plot=False)  # partial results survive an interrupted run
        del q, k, v
    varlen_rows, varlen_extra = _varlen_rows(flash_attn_varlen_func)
    rows += varlen_rows
    variants.append(varlen_extra)
    _print_rows(rows[-2:])
    print(f"  varlen variants: {varlen_extra}", flush=True)
    result["peak_memory_MiB"] = _peak_memory(flash_attn_func, flash, cudnn)
    result["host_overhead_us"] = _host_overhead(flash_attn_func, flash)
    print(f"  host overhead (us per call): {result['host_overhead_us']}", flush=True)
    _write(dest, result, plot=True)
    print(f"wrote {dest}/attention.json, attention.md, attention.png", flush=True)
    return result


def _write(dest, result, plot):
    (dest / "attention.json").write_text(json.dumps(result, indent=1))
    (dest / "attention.md").write_text(_markdown(result))
    if plot:
        _plot(result, dest / "attention.png")


def _varlen_lengths(total, lo=100, hi=4000, seed=0):
    import random

    rng = random.Random(seed)
    lens = []
    while sum(lens) < total:
        lens.append(rng.randint(lo, hi))
    lens[-1] -= sum(lens) - total
    if lens[-1] < lo:  # fold a too-short tail into the previous sequence
        lens[-2] += lens.pop()
    return lens


def _varlen_rows(varlen_fn):
    """Causal d128 varlen: ours on packed tokens; SDPA anchors on the right-padded batch.

    With right padding and a causal mask no real query sees a padding key, so SDPA's flash and
    cuDNN kernels run unmasked on (batch, max_len); FLOPs count real tokens only. SDPA on jagged
    nested tensors is also timed and recorded under ``variants``.
    """
    import torch
    from torch.nn.attention import SDPBackend

    d, heads = 128, HIDDEN // 128
    lens = _varlen_lengths(TOKENS)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(lens, device="cuda").cumsum(0)
    q, k, v = (torch.randn(TOKENS, heads, d, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    m = max(lens)
    ours = lambda q, k, v: varlen_fn(q, k, v, cu, cu, m, m, causal=True)  # noqa: E731
    o_f, o_b = _time_pair(ours, (q, k, v))
    flops = sum(_flops(n, d, heads, 1, True) for n in lens)

    padded = [torch.randn(len(lens), m, heads, d, device="cuda", dtype=torch.bfloat16,
                          requires_grad=True) for _ in range(3)]
    fa_f, fa_b = _time_pair(lambda q, k, v: _sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v, True), padded)
    cu_f, cu_b = _time_pair(lambda q, k, v: _sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v, True), padded)

    offsets = cu.long()

    def nested(backend):
        fn = _sdpa(backend)

        def call(q, k, v):
            qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t, offsets) for t in (q, k, v))
            return fn(qn, kn, vn, True).values()
        return call

    nf_f, nf_b = _time_pair(nested(SDPBackend.FLASH_ATTENTION), (q, k, v))
    nc_f, nc_b = _time_pair(nested(SDPBackend.CUDNN_ATTENTION), (q, k, v))
    tag = f"varlen d128 causal {len(lens)} seqs 100-4000 (16k tokens; SDPA on padded batch)"
    rows = [{"case": f"{kind} {tag}", "ours": _tflops(flops * mult, o),
             "anchors": {"sdpa_flash": _tflops(flops * mult, a), "sdpa_cudnn": _tflops(flops * mult, c)}}
            for kind, mult, o, a, c in (("fwd", 1.0, o_f, fa_f, cu_f), ("bwd", 2.5, o_b, fa_b, cu_b))]
    extra = {"case": f"varlen d128 causal, lengths {lens}",
             "sdpa_flash_nested_fwd": _tflops(flops, nf_f), "sdpa_flash_nested_bwd": _tflops(flops * 2.5, nf_b),
             "sdpa_cudnn_nested_fwd": _tflops(flops, nc_f), "sdpa_cudnn_nested_bwd": _tflops(flops * 2.5, nc_b)}
    return rows, extra


def _host_overhead(ours_fn, flash, n=300):
    """Host microseconds per call on tiny inputs (GPU work negligible, so enqueue-bound)."""
    import torch

    q, k, v = (torch.randn(1, 128, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.randn_like(q)
    calls = {
        "ours_fwd_no_grad": lambda: _no_grad(lambda: ours_fn(q, k, v, causal=True)),
        "ours_fwd": lambda: ours_fn(q, k, v, causal=True),
        "ours_fwd_bwd": lambda: ours_fn(q, k, v, causal=True).backward(g),
        "sdpa_flash_fwd": lambda: flash(q, k, v, True),
        "sdpa_flash_fwd_bwd": lambda: flash(q, k, v, True).backward(g),
    }
    return {key: host_us_per_call(fn, n) for key, fn in calls.items()}


def host_us_per_call(fn, n=300, warmup=20) -> float:
    """Host microseconds per call of ``fn`` looped ``n`` times (best of three: the host is shared with other
    work). On inputs whose GPU work is negligible the loop is enqueue-bound, so this is the host cost."""
    import torch

    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
        torch.cuda.synchronize()
    return round(best * 1e6, 1)


def _graph_ms(fn):
    """Median ms of ``fn`` replayed from a CUDA graph (forward only, no autograd); None on failure."""
    import torch
    from triton.testing import do_bench_cudagraph

    try:
        with torch.no_grad():
            fn()
            return do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception as e:
        print(f"  [skip graph timing] {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
        return None


def _no_grad(fn):
    import torch

    with torch.no_grad():
        return fn()


def _peak_memory(ours_fn, flash, cudnn):
    """Peak extra MiB allocated by forward + backward at S=16k, d128, causal (inputs excluded)."""
    import torch

    s, d = 16384, 128
    q, k, v = (torch.randn(1, s, HIDDEN // d, d, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    result = {"case": "fwd+bwd d128 causal S=16384 batch 1 (MiB above inputs)"}
    for key, fn in (("ours", lambda: ours_fn(q, k, v, causal=True)),
                    ("sdpa_flash", lambda: flash(q, k, v, True)),
                    ("sdpa_cudnn", lambda: cudnn(q, k, v, True))):
        try:
            fn().backward(g)  # warm-up
            q.grad = k.grad = v.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn().backward(g)
            torch.cuda.synchronize()
            result[key] = (torch.cuda.max_memory_allocated() - base) / 2**20
            q.grad = k.grad = v.grad = None
        except Exception as e:
            print(f"  [skip memory {key}] {type(e).__name__}: {e}", flush=True)
            result[key] = None
    return result


def _fmt(x, nd=0):
    return "-" if x is None else f"{x:.{nd}f}"


def _ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}"


def _markdown(res) -> str:
    v = res["versions"]
    lines = [
        f"# Attention benchmark — {res['gpu']} ({res['date']})",
        "",
        f"torch {v['torch']}, triton {v['triton']}, transformers {v.get('transformers')}, "
        f"CUDA {v['cuda']}, cuDNN {v.get('cudnn')}. bf16, batch x seqlen = 16k tokens, hidden "
        "2048. TFLOP/s (4·S²·d·heads·batch, halved when causal; backward = 2.5x forward), "
        "median of `triton.testing.do_bench`. FA2 = SDPA flash backend.",
        "",
        "| case | ours | SDPA flash (FA2) | SDPA cuDNN | ours/FA2 | ours/cuDNN |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        a = r["anchors"]
        lines.append(f"| {r['case']} | {_fmt(r['ours'])} | {_fmt(a['sdpa_flash'])} | "
                     f"{_fmt(a['sdpa_cudnn'])} | {_ratio(r['ours'], a['sdpa_flash'])} | "
                     f"{_ratio(r['ours'], a['sdpa_cudnn'])} |")
    mem = res.get("peak_memory_MiB") or {}
    lines += ["", f"Peak memory, {mem.get('case', '')}: ours {_fmt(mem.get('ours'))} MiB, "
              f"SDPA flash {_fmt(mem.get('sdpa_flash'))} MiB, SDPA cuDNN {_fmt(mem.get('sdpa_cudnn'))} MiB."]
    if res.get("variants"):
        host = res.get("host_overhead_us")
        if host:
            lines += ["", "Host time per call, tiny inputs (µs): "
                      + ", ".join(f"{k} {v}" for k, v in host.items())]
        lines += ["", "Alternative paths and anchors (TFLOP/s): "
                  + "; ".join(f"{x['case']}: " + ", ".join(f"{k} {_fmt(val)}" for k, val in x.items()
                                                          if k not in ("case", "configs")
                                                          and isinstance(val, (int, float)))
                              for x in res["variants"])]
    return "\n".join(lines) + "\n"


def _plot(res, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping attention.png", flush=True)
        return
    fig, axes = plt.subplots(2, 2, figsize=(8, 5.5), sharex=True)
    styles = {"ours": ("C0", "ours"), "sdpa_flash": ("C1", "SDPA FA2"), "sdpa_cudnn": ("C2", "SDPA cuDNN")}
    for i, kind in enumerate(("fwd", "bwd")):
        for j, d in enumerate(HEAD_DIMS):
            ax = axes[i][j]
            for causal, ls in ((False, "-"), (True, "--")):
                tag = f"d{d} {'causal' if causal else 'non-causal'} S="
                sel = [r for r in res["rows"] if r["case"].startswith(f"{kind} {tag}")]
                xs = [int(r["case"].split("S=")[1]) for r in sel]
                for key, (color, label) in styles.items():
                    ys = [r["ours"] if key == "ours" else r["anchors"][key] for r in sel]
                    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
                    if pts:
                        ax.plot(*zip(*pts), ls, color=color, marker="o", ms=3,
                                label=f"{label}{' causal' if causal else ''}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{kind} d{d}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("TFLOP/s", fontsize=8)
            if i == 1:
                ax.set_xlabel("seqlen", fontsize=8)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"bf16 attention, 16k tokens, hidden 2048 — {res['gpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _print_rows(rows):
    for r in rows:
        a = r["anchors"]
        print(f"{r['case']:<60} ours {_fmt(r['ours']):>5}  FA2 {_fmt(a['sdpa_flash']):>5}  "
              f"cuDNN {_fmt(a['sdpa_cudnn']):>5}  ours/FA2 {_ratio(r['ours'], a['sdpa_flash'])}  "
              f"ours/cuDNN {_ratio(r['ours'], a['sdpa_cudnn'])}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hf-efficient bench attention", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output root, a <gpu> folder is created (default: {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="two seqlens per variant only")
    args = parser.parse_args(argv)
    res = run(args.out, quick=args.quick)
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
