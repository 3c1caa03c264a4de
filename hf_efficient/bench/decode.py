"""Decode attention benchmark: our paged kernel vs SDPA flash (FA2) and SDPA cuDNN, + device copy.

``python -m hf_efficient.bench.decode --out docs/benchmarks`` writes ``<out>/<gpu-slug>/decode.json``
and ``decode.md``.

One decode step (q_len 1, bf16, causal) over a KV cache. Ours reads a paged cache (block size 16,
block tables shuffled through the pool); the anchors read a contiguous (batch, kv_heads, L, d) cache
holding the same random values, with the GQA group packed as query rows (the fastest SDPA form for
decode). Mixed lengths: SDPA runs padded to the longest sequence with a boolean key mask (when a
backend refuses the mask it runs unmasked over the padded length, which reads the same bytes; the
row says so). Unit: TB/s of the K+V bytes actually needed, sum(lengths) * kv_heads * d * 2 bytes
* 2; ``copy`` is a large device-to-device copy in the same run (bytes read + written). Timing: a
CUDA graph of many calls, rotating input sets when they would fit in L2, replayed under
``triton.testing.do_bench`` (median).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
from pathlib import Path

from .. import tuning
from . import DEFAULT_OUT

SHAPES = (("gqa32/8 d128", 32, 8, 128), ("smollm2 9/3 d64", 9, 3, 64))
SIZES = ((1, 32768), (16, 4096), (64, 4096), (256, 1024), (64, "mixed"))
BLOCK_SIZE = 16
L2_BYTES = 50 * 2**20


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    m = re.search(r"\b(gb\d{3}|[abhl]\d{2,3}[a-z]?|rtx\s?\d{4}|a\d{4})\b", name.lower())
    return m.group(1).replace(" ", "") if m else (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu")


def _versions() -> dict:
    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "cudnn": str(torch.backends.cudnn.version())}


def time_calls(fns, rep_ms=200) -> float:
    """Seconds per call: a CUDA graph cycling through ``fns`` (fallback: plain do_bench)."""
    import torch
    from triton.testing import do_bench

    inner = max(1, math.ceil(24 / len(fns)))
    calls = inner * len(fns)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                for f in fns:
                    f()
        return do_bench(graph.replay, warmup=25, rep=rep_ms, return_mode="median") / calls * 1e-3
    except Exception as exc:  # a backend that cannot be captured: time the eager calls
        print(f"  [no graph] {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        torch.cuda.synchronize()
        return do_bench(lambda: [f() for f in fns], warmup=25, rep=rep_ms, return_mode="median") / len(fns) * 1e-3


def copy_tbps(nbytes=2**30) -> float:
    """Device-to-device copy bandwidth (bytes read + written): best of cudaMemcpy and an SM copy
    kernel, timed eagerly (a memcpy node inside a CUDA graph may go to a slower copy engine)."""
    import torch
    from triton.testing import do_bench

    x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    xf, yf = x.view(torch.float32), y.view(torch.float32)
    best = 0.0
    for fn in (lambda: y.copy_(x), lambda: torch.mul(xf, 1.0, out=yf)):
        ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
        best = max(best, 2 * nbytes / (ms * 1e-3) / 1e12)
    return best


def _lengths(B, L, gen):
    import torch

    if L == "mixed":
        return torch.randint(128, 8193, (B,), generator=gen).tolist()
    return [L] * B


class Case:
    """Random K/V for one (shape, batch, lengths): contiguous for SDPA, the same values paged for ours."""

    def __init__(self, H, Hk, D, lens, block_size, gen, device="cuda"):
        import torch

        self.H, self.Hk, self.D, self.lens, self.B = H, Hk, D, lens, len(lens)
        self.Lmax = max(lens)
        dev, dt = device, torch.bfloat16
        self.k = torch.randn(self.B, Hk, self.Lmax, D, device=dev, dtype=dt)
        self.v = torch.randn(self.B, Hk, self.Lmax, D, device=dev, dtype=dt)
        self.q = torch.randn(self.B, 1, H, D, device=dev, dtype=dt)
        nblk = [-(-n // block_size) for n in lens]
        max_blocks = max(nblk)
        perm = torch.randperm(sum(nblk), generator=gen).to(dev)
        table = torch.zeros(self.B, max_blocks, dtype=torch.int32, device=dev)
        self.k_pool = torch.empty(sum(nblk), block_size, Hk, D, device=dev, dtype=dt)
        self.v_pool = torch.empty_like(self.k_pool)
        start = 0
        for b, n in enumerate(nblk):
            ids = perm[start:start + n]
            start += n
            table[b, :n] = ids.int()
            pad = n * block_size
            for src, dst in ((self.k, self.k_pool), (self.v, self.v_pool)):
                rows = src[b, :, : min(pad, self.Lmax)].transpose(0, 1)  # (L, Hk, D)
                if rows.shape[0] < pad:
                    rows = torch.cat([rows, rows.new_zeros(pad - rows.shape[0], Hk, D)])
                dst[ids] = rows.reshape(n, block_size, Hk, D)
        self.table = table
        self.seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
        self.mask = None
        if min(lens) != self.Lmax:
            self.mask = (torch.arange(self.Lmax, device=dev)[None, :] < self.seqlens[:, None]).view(self.B, 1, 1, -1)

    def needed_bytes(self) -> int:
        return sum(self.lens) * self.Hk * self.D * 2 * 2

    def total_bytes(self) -> int:
        return 2 * (self.k.numel() + self.k_pool.numel()) * 2

    def ours(self):
        from hf_efficient.ops.paged_decode import paged_decode

        avg = sum(self.lens) // len(self.lens)
        return lambda: paged_decode(self.q, self.k_pool, self.v_pool, self.seqlens, self.table,
                                    max_seqlen_k=self.Lmax, avg_seqlen_k=avg)

    def plan(self):
        """(variant, num_splits, tiles per split) our launcher picks for this case."""
        import torch

        from hf_efficient.ops.paged_decode import plan_launch

        return plan_launch(self.B, self.Hk, 1, self.H // self.Hk, self.D, True, self.Lmax,
                           sum(self.lens) // len(self.lens), 0, torch.cuda.current_device())

    def sdpa(self, backend, use_mask=True):
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import sdpa_kernel

        G = self.H // self.Hk
        qp = self.q.view(self.B, self.Hk, G, self.D)  # (B, 1, H, D) -> GQA group as query rows
        mask = self.mask if use_mask else None

        def fn():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qp, self.k, self.v, attn_mask=mask)

        out = fn()
        assert out.shape == qp.shape and torch.isfinite(out).all()
        return fn

    def check(self):
        """Our output against SDPA's (same data): catches a wrong benchmark as well as a wrong kernel."""
        from torch.nn.attention import SDPBackend

        ours = self.ours()().view(self.B, self.Hk, self.H // self.Hk, self.D).float()
        ref = self.sdpa(SDPBackend.MATH)().float() if self.mask is not None else None
        if ref is None:
            ref = self.sdpa(SDPBackend.FLASH_ATTENTION)().float()
        err = (ours - ref).abs().max().item()
        if not err < 2e-2:  # keep timing (the numbers still say something) but flag the row
            print(f"  [WRONG] ours vs SDPA max error {err}", flush=True)
        return err


def _anchor(case, backend, sets_sdpa, notes, name):
    for use_mask in (True, False) if case.mask is not None else (True,):
        try:
            fns = [c.sdpa(backend, use_mask) for c in sets_sdpa]
            if not use_mask:
                notes.append(f"{name}: mask refused, timed unmasked over the padded length")
            return case.needed_bytes() / time_calls(fns) / 1e12
        except Exception as exc:
            err = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            print(f"  [{name}{' masked' if use_mask else ''}] {err}", flush=True)
    notes.append(f"{name}: not supported")
    return None


def run(out_dir, quick=False, sweep=False) -> dict:
    """Measure every case; write ``<out_dir>/<gpu-slug>/decode.json`` and ``decode.md``."""
    import torch
    from torch.nn.attention import SDPBackend

    gen = torch.Generator().manual_seed(0)
    copy = copy_tbps()
    print(f"device copy: {copy:.2f} TB/s", flush=True)
    rows = []
    sizes = SIZES[:3] if quick else SIZES
    for label, H, Hk, D in SHAPES[:1] if quick else SHAPES:
        for B, L in sizes:
            lens = _lengths(B, L, gen)
            case = Case(H, Hk, D, lens, BLOCK_SIZE, gen)
            n_sets = max(1, min(8, math.ceil(4 * L2_BYTES / case.needed_bytes())))
            sets = [case] + [Case(H, Hk, D, lens, BLOCK_SIZE, gen) for _ in range(n_sets - 1)]
            name = f"{label} B={B} L={'128-8192 mixed' if L == 'mixed' else L}"
            err = case.check()
            notes = []
            if case.mask is not None:
                notes.append("SDPA padded to the longest sequence with a key mask")
            ours = case.needed_bytes() / time_calls([c.ours() for c in sets]) / 1e12
            flash = _anchor(case, SDPBackend.FLASH_ATTENTION, sets, notes, "sdpa_flash")
            cudnn = _anchor(case, SDPBackend.CUDNN_ATTENTION, sets, notes, "sdpa_cudnn")
            row = {"case": name, "ours": ours, "anchors": {"sdpa_flash": flash, "sdpa_cudnn": cudnn, "copy": copy},
                   "needed_MB": case.needed_bytes() / 1e6, "rotated_sets": n_sets, "max_abs_err_vs_sdpa": err,
                   "plan": dict(zip(("variant", "num_splits", "tiles_per_split"), case.plan()))}
            if notes:
                row["notes"] = notes
            if sweep:
                row["sweep"] = _sweep(sets)
            rows.append(row)
            print(f"{name:40s} ours {ours:5.2f}  flash {flash or 0:5.2f}  cudnn {cudnn or 0:5.2f}  TB/s", flush=True)
            del sets, case
            torch.cuda.empty_cache()
    from hf_efficient.ops.paged_decode import device_bandwidth

    result = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "versions": _versions(), "unit": "TB/s", "block_size": BLOCK_SIZE,
              "plan_bandwidth_TBps": device_bandwidth(torch.cuda.current_device()) / 1e12, "rows": rows}
    dest = Path(out_dir) / gpu_slug(result["gpu"])
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "decode.json").write_text(json.dumps(result, indent=1))
    (dest / "decode.md").write_text(to_markdown(result))
    return result


def _sweep(sets) -> dict:
    """Tuning aid: our TB/s for every kernel variant x split count (``v3/s8``; ``s0`` = the heuristic's splits
    for that variant), so the plan can be calibrated per device. Forces each variant with the
    ``paged_decode_variant`` knob."""
    from hf_efficient.ops.paged_decode import KERNEL_VARIANTS, paged_decode

    out = {}
    case = sets[0]
    for variant in KERNEL_VARIANTS:
        with tuning.override(paged_decode_variant=variant):
            for s in (0, 1, 2, 4, 8, 16, 32, 64, 128):
                fns = [lambda c=c, s=s: paged_decode(c.q, c.k_pool, c.v_pool, c.seqlens, c.table, num_splits=s,
                                                     max_seqlen_k=c.Lmax, avg_seqlen_k=sum(c.lens) // c.B)
                       for c in sets]
                try:
                    out[f"v{variant}/s{s}"] = case.needed_bytes() / time_calls(fns, rep_ms=50) / 1e12
                except Exception as exc:
                    out[f"v{variant}/s{s}"] = type(exc).__name__
    return out


def to_markdown(result) -> str:
    def f(x):
        return f"{x:.2f}" if isinstance(x, (int, float)) else "n/a"

    lines = [f"# Decode attention, {result['gpu']} ({result['date']})", "",
             f"TB/s of K+V bytes needed (bf16, q_len 1, paged block size {result['block_size']} with shuffled "
             "tables for ours; contiguous cache for SDPA). torch " + result["versions"]["torch"] + ".", "",
             "| case | ours | SDPA flash (FA2) | SDPA cuDNN | copy | ours / cuDNN | ours / FA2 |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        a = r["anchors"]
        rc = r["ours"] / a["sdpa_cudnn"] if a.get("sdpa_cudnn") else None
        rf = r["ours"] / a["sdpa_flash"] if a.get("sdpa_flash") else None
        lines.append(f"| {r['case']} | {f(r['ours'])} | {f(a['sdpa_flash'])} | {f(a['sdpa_cudnn'])} | "
                     f"{f(a['copy'])} | {f(rc)} | {f(rf)} |")
    notes = sorted({n for r in result["rows"] for n in r.get("notes", [])})
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    lines += ["", "SDPA gets the GQA group packed as query rows, q (B, kv_heads, group, d): the fastest SDPA "
              "form for decode with FA2; cuDNN does not split the keys, so with few (batch, kv head) pairs "
              "(B=1) it runs on a handful of SMs. `plan` in the JSON is our launcher's choice (kernel "
              "variant, splits, tiles per split)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output root (default: {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="fewer cases (smoke run)")
    parser.add_argument("--sweep", action="store_true", help="also time kernel variants and split counts")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        parser.error("the decode benchmark needs a CUDA GPU")
    result = run(args.out, quick=args.quick, sweep=args.sweep)
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
