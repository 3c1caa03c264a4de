"""No input value may make a kernel touch memory outside its tensors (issue 16, "Memory safety (kernels)").

- Paged decode: lengths beyond the block table, block ids outside the pool (99, 100000, -5), negative lengths.
  Host paths (CPU reference, ``flash_attn_with_kvcache``) raise naming the argument; the Triton kernel (the path
  that runs inside CUDA graphs, where no host check is possible) guards on the device: keys beyond the table are
  not attended to, keys on a bad block id read as zero K/V.
- Varlen: cu_seqlens contents are clamped to the tensors on the device, so a skipped or stale host check can give
  wrong numbers for bad input, never an out-of-bounds access; CPU cu_seqlens are checked on every call.
- Non-finite ``softmax_scale`` / ``softcap`` raise.

On CPU the kernels run through Triton's interpreter; the pools sit between NaN guard zones, so a read outside the
tensor would turn up as a non-finite output. On a GPU ``scripts/gpu_memcheck.sh`` runs this file (and the paged and
varlen kernel tests) under compute-sanitizer.
"""

import math
import os

import numpy as np
import torch

if not torch.cuda.is_available():  # before triton is imported (conftest does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hf_efficient import tuning  # noqa: E402
from hf_efficient.attention.flash_api import (  # noqa: E402
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from hf_efficient.attention.kvcache_api import flash_attn_with_kvcache  # noqa: E402
from hf_efficient.ops.attention_ref import attention_ref  # noqa: E402
from hf_efficient.ops.flash_fwd import flash_fwd  # noqa: E402
from hf_efficient.ops.paged_decode import check_paged_values, paged_decode, paged_decode_reference  # noqa: E402
from hf_efficient.ops.paged_decode_triton import paged_decode_triton  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DT = torch.float16
BAD_IDS = (99, 100000, -5)
FUZZ = settings(max_examples=8, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _poison_outputs():
    with tuning.override(poison_outputs=True):
        yield


def guarded(shape, guard, dtype=DT, fill=float("nan")):
    """A tensor of ``shape`` living inside a larger one whose ``guard`` leading rows on each side hold ``fill``."""
    buf = torch.full((shape[0] + 2 * guard, *shape[1:]), fill, dtype=dtype, device=DEV)
    return buf[guard: guard + shape[0]]


# ---------------------------------------------------------------------------------------------
# Paged decode
# ---------------------------------------------------------------------------------------------
NB, BS, COLS, HK, H, D = 6, 4, 3, 1, 2, 16  # pool of 6 blocks of 4; a table row holds 12 keys
CAP = COLS * BS


def paged_inputs(lens, table, q_len=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    k = guarded((NB, BS, HK, D), 128)
    v = guarded((NB, BS, HK, D), 128)
    k.copy_(torch.randn(NB, BS, HK, D, generator=g).to(DT))
    v.copy_(torch.randn(NB, BS, HK, D, generator=g).to(DT))
    q = torch.randn(B, q_len, H, D, generator=g).to(DT).to(DEV)
    bt = guarded((B, COLS), 2, torch.int32, fill=-1)  # rows past the table hold -1 (the guard before the pool)
    bt.copy_(torch.tensor(table, dtype=torch.int32))
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device=DEV), bt


def device_semantics(q, k, v, lens, bt):
    """What the device guards define: keys past the table are not attended to, keys on a bad id read as zeros."""
    k_ext = torch.cat([k.cpu(), torch.zeros_like(k[:1]).cpu()])
    v_ext = torch.cat([v.cpu(), torch.zeros_like(v[:1]).cpu()])
    t = bt.cpu().long()
    t = torch.where((t >= 0) & (t < NB), t, NB).to(torch.int32)
    lens_ref = lens.cpu().clamp(0, CAP)
    return paged_decode_reference(q.cpu(), k_ext, v_ext, lens_ref, t, softmax_scale=D ** -0.5, window_left=-1,
                                  window_right=-1)


def row_valid(lens, table):
    return [0 <= n <= CAP and all(0 <= table[b][c] < NB for c in range(-(-n // BS)))
            for b, n in enumerate(lens)]


ids = st.one_of(st.integers(0, NB - 1), st.sampled_from(BAD_IDS + (NB, -1)))


@FUZZ
@given(lens=st.lists(st.integers(-3, CAP + 6), min_size=1, max_size=3), data=st.data())
def test_fuzz_paged_triton_kernel(lens, data):
    """Any lengths and block ids: the Triton kernel stays inside its tensors and gives the defined result."""
    table = [[data.draw(ids) for _ in range(COLS)] for _ in lens]
    q, k, v, sl, bt = paged_inputs(lens, table)
    out, lse = paged_decode_triton(q, k, v, sl, bt, softmax_scale=D ** -0.5, window_left=-1, window_right=-1)
    ref, ref_lse = device_semantics(q, k, v, sl, bt)
    assert torch.isfinite(out).all(), "a read outside the pool (NaN guard) or an unwritten output"
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=1e-2, rtol=0)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-2, rtol=0)
    # and the host check agrees: it raises exactly when some row is invalid
    if all(row_valid(lens, table)):
        check_paged_values(sl, bt, None, None, k)
    else:
        with pytest.raises(ValueError, match="cache_seqlens|block_table"):
            check_paged_values(sl, bt, None, None, k)


@FUZZ
@given(lens=st.lists(st.integers(-3, CAP + 6), min_size=1, max_size=3), data=st.data())
def test_fuzz_paged_public(lens, data):
    """The public function (CPU reference path on CPU): a clear error, or the reference's result."""
    table = [[data.draw(ids) for _ in range(COLS)] for _ in lens]
    q, k, v, sl, bt = paged_inputs(lens, table)
    if not all(row_valid(lens, table)) and not CUDA:
        with pytest.raises(ValueError, match="cache_seqlens|block_table"):
            paged_decode(q, k, v, sl, bt, causal=False)
        return
    out = paged_decode(q, k, v, sl, bt, causal=False)
    assert torch.isfinite(out).all()
    ref, _ = device_semantics(q, k, v, sl, bt)
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=1e-2, rtol=0)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_reference_raises_on_bad_block_id(bad):
    """Before: the CPU reference clamped out-of-range ids silently."""
    q, k, v, sl, bt = paged_inputs([5, 9], [[0, 1, 2], [3, bad, 5]])
    with pytest.raises(ValueError, match="block_table"):
        paged_decode(q, k, v, sl, bt)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_with_kvcache(q, k, v, cache_seqlens=sl, block_table=bt)


def test_unused_block_table_columns_may_hold_anything():
    q, k, v, sl, bt = paged_inputs([3, 5], [[0, -1, 100000], [3, 4, -5]])
    torch.testing.assert_close(paged_decode(q, k, v, sl, bt).float(),
                               paged_decode(q, k, v, sl, bt.clamp(0, NB - 1)).float())


def test_seqlens_beyond_block_table_raise():
    """Before: the lengths were used as given and the block table was read past its row."""
    q, k, v, sl, bt = paged_inputs([5, CAP + 1], [[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="block_table"):
        paged_decode(q, k, v, sl, bt)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_with_kvcache(q, k, v, cache_seqlens=sl, block_table=bt)
    # appended keys count: 10 + 3 new > 12
    q, k, v, sl, bt = paged_inputs([10, 2], [[0, 1, 2], [3, 4, 5]], q_len=3)
    knew = torch.randn(2, 3, HK, D).to(DT).to(DEV)
    before = k.clone()
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_with_kvcache(q, k, v, knew, knew, cache_seqlens=sl, block_table=bt)
    assert torch.equal(k.nan_to_num(), before.nan_to_num()), "a failing call must not write the cache"


def test_negative_seqlens_raise():
    q, k, v, sl, bt = paged_inputs([-1, 4], [[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="cache_seqlens"):
        paged_decode(q, k, v, sl, bt)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, k, v, cache_seqlens=sl, block_table=bt)


def test_contiguous_cache_bounds():
    g = torch.Generator().manual_seed(1)
    kc = torch.randn(2, 8, HK, D, generator=g).to(DT).to(DEV)
    q = torch.randn(2, 1, H, D, generator=g).to(DT).to(DEV)
    for lens, name in (([3, 9], "cache_seqlens"), ([-2, 3], "cache_seqlens")):
        sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
        with pytest.raises(ValueError, match=name):
            flash_attn_with_kvcache(q, kc, kc, cache_seqlens=sl)
        with pytest.raises(ValueError, match=name):
            paged_decode(q, kc, kc, sl)
    sl = torch.tensor([3, 4], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="cache_batch_idx"):
        flash_attn_with_kvcache(q, kc, kc, cache_seqlens=sl,
                                cache_batch_idx=torch.tensor([0, 7], dtype=torch.int32, device=DEV))
    # new keys past the end: 7 + 2 > 8
    knew = torch.randn(2, 2, HK, D, generator=g).to(DT).to(DEV)
    sl = torch.tensor([7, 1], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(torch.randn(2, 2, H, D).to(DT).to(DEV), kc, kc, knew, knew, cache_seqlens=sl)


def test_triton_contiguous_cache_guards():
    """Contiguous cache through the Triton kernel: a length past the cache and a bad cache row stay inside it."""
    g = torch.Generator().manual_seed(2)
    kc = guarded((2, 8, HK, D), 4)
    kc.copy_(torch.randn(2, 8, HK, D, generator=g).to(DT))
    q = torch.randn(3, 1, H, D, generator=g).to(DT).to(DEV)
    sl = torch.tensor([20, 5, 6], dtype=torch.int32, device=DEV)
    bidx = torch.tensor([1, 0, 9], dtype=torch.int32, device=DEV)
    out, _ = paged_decode_triton(q, kc, kc, sl, None, bidx, softmax_scale=D ** -0.5, window_left=-1,
                                 window_right=-1)
    assert torch.isfinite(out).all()
    ref, _ = paged_decode_reference(q[:2].cpu(), kc.cpu(), kc.cpu(), torch.tensor([8, 5], dtype=torch.int32),
                                    None, bidx[:2].cpu(), softmax_scale=D ** -0.5, window_left=-1, window_right=-1)
    torch.testing.assert_close(out[:2].cpu().float(), ref.float(), atol=1e-2, rtol=0)
    # the bad row reads zeros: uniform attention over 6 zero keys -> 0
    assert out[2].abs().max() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@settings(max_examples=30, deadline=None, derandomize=True)
@given(lens=st.lists(st.integers(-3, 3 * 16 + 40), min_size=1, max_size=4), data=st.data(),
       head_dim=st.sampled_from([64, 128]), splits=st.sampled_from([1, 3]))
def test_fuzz_paged_cuda_kernel(lens, data, head_dim, splits):
    """The CUDA kernel (no host check: the engine's CUDA-graph path) under the same rules as the Triton one."""
    nb, bs, cols = 7, 16, 3
    table = [[data.draw(st.one_of(st.integers(0, nb - 1), st.sampled_from(BAD_IDS + (nb, -1))))
              for _ in range(cols)] for _ in lens]
    g = torch.Generator().manual_seed(len(lens))
    k = torch.randn(nb, bs, 2, head_dim, generator=g).to(DT).to(DEV)
    v = torch.randn(nb, bs, 2, head_dim, generator=g).to(DT).to(DEV)
    q = torch.randn(len(lens), 1, 4, head_dim, generator=g).to(DT).to(DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    bt = torch.tensor(table, dtype=torch.int32, device=DEV)
    with tuning.override(paged_decode_backend="cuda"):
        out = paged_decode(q, k, v, sl, bt, causal=False, num_splits=splits)
    torch.cuda.synchronize()
    k_ext, v_ext = torch.cat([k, torch.zeros_like(k[:1])]), torch.cat([v, torch.zeros_like(v[:1])])
    t = torch.where((bt >= 0) & (bt < nb), bt, nb)
    ref, _ = paged_decode_reference(q, k_ext, v_ext, sl.clamp(0, cols * bs), t, window_left=-1, window_right=-1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------------------------
# Varlen
# ---------------------------------------------------------------------------------------------
TQ, TK, VH, VD = 24, 20, 2, 16
EDGE = (-(2 ** 31), 2 ** 31 - 1, -5, TQ + 7, 100000)


def clamp_ranges(cu, total):
    """The device rule: start = clamp(cu[b], 0, total), end = clamp(cu[b+1], start, total)."""
    out = []
    for b in range(len(cu) - 1):
        s = min(max(cu[b], 0), total)
        out.append((s, min(max(cu[b + 1], s), total)))
    return out


@FUZZ
@given(batch=st.integers(1, 3), data=st.data(), causal=st.booleans())
def test_fuzz_varlen_kernel_any_cu_seqlens(batch, data, causal):
    """cu_seqlens of any contents straight into the kernel (as after a skipped or stale host check): no access
    outside q/k/v (NaN guard zones around them), and every row owned by one sequence gets the attention of that
    sequence's clamped range."""
    val_q = st.one_of(st.integers(0, TQ), st.integers(-6, TQ + 6), st.sampled_from(EDGE))
    val_k = st.one_of(st.integers(0, TK), st.integers(-6, TK + 6), st.sampled_from(EDGE))
    cq = [data.draw(val_q) for _ in range(batch + 1)]
    ck = [data.draw(val_k) for _ in range(batch + 1)]
    g = torch.Generator().manual_seed(len(cq) + sum(c % 97 for c in cq + ck))
    q, k, v = guarded((TQ, VH, VD), 32), guarded((TK, VH, VD), 32), guarded((TK, VH, VD), 32)
    for t in (q, k, v):
        t.copy_(torch.randn(*t.shape, generator=g).to(DT))
    cu_q = torch.tensor(cq, dtype=torch.int32, device=DEV)
    cu_k = torch.tensor(ck, dtype=torch.int32, device=DEV)
    # fill=False: no zeroing of rows outside [cu_q[0], cu_q[-1]) (that pass has its own bounds)
    out, lse = flash_fwd(q, k, v, cu_q, cu_k, TQ, TK, softmax_scale=VD ** -0.5, causal=causal, fill=False)
    rq, rk = clamp_ranges(cq, TQ), clamp_ranges(ck, TK)
    owners = [[b for b, (s, e) in enumerate(rq) if s <= t < e] for t in range(TQ)]
    for b, ((qs, qe), (ks, ke)) in enumerate(zip(rq, rk)):
        if qe == qs:
            continue
        ref = attention_ref(q[qs:qe][None].float().cpu(), k[ks:ke][None].float().cpu(),
                            v[ks:ke][None].float().cpu(), causal=causal)[0]
        got = out[qs:qe].float().cpu()
        assert torch.isfinite(got).all()
        mine = torch.tensor([owners[t] == [b] for t in range(qs, qe)])
        torch.testing.assert_close(got[mine], ref[mine], atol=1e-2, rtol=0)


def test_varlen_backward_any_cu_seqlens():
    """The backward kernels clamp the same way: bad offsets give finite gradients inside the tensors."""
    from hf_efficient.ops.flash_bwd import flash_bwd

    g = torch.Generator().manual_seed(3)
    q, k, v = guarded((TQ, VH, VD), 32), guarded((TK, VH, VD), 32), guarded((TK, VH, VD), 32)
    for t in (q, k, v):
        t.copy_(torch.randn(*t.shape, generator=g).to(DT))
    cu_q = torch.tensor([0, 30, 5, TQ], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([-4, 8, 100000, 3], dtype=torch.int32, device=DEV)
    out, lse = flash_fwd(q, k, v, cu_q, cu_k, TQ, TK, softmax_scale=VD ** -0.5, causal=True)
    dout = torch.randn(out.shape, generator=g).to(DT).to(DEV)
    out = out.nan_to_num()
    dq, dk, dv = flash_bwd(dout, q, k, v, out, lse.nan_to_num(posinf=0.0), cu_q, cu_k, TQ, TK,
                           softmax_scale=VD ** -0.5, causal=True)
    # sequence 0 owns q rows [0, 24) and k rows [0, 8): its gradients are defined and finite
    assert torch.isfinite(dq).all() and torch.isfinite(dk[:8]).all() and torch.isfinite(dv[:8]).all()


@pytest.mark.skipif(CUDA, reason="CPU tensors run the kernels only under the interpreter")
@pytest.mark.parametrize("how", ["data", "numpy"])
def test_cpu_cu_seqlens_checked_every_call(how):
    """In-place changes that do not bump the version counter (``.data`` writes, numpy-backed tensors) are seen:
    CPU cu_seqlens are checked on every call."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(TQ, VH, VD, generator=g).to(DT)
    k = torch.randn(TK, VH, VD, generator=g).to(DT)
    if how == "numpy":
        arr = np.array([0, 10, TQ], dtype=np.int32)
        cu_q = torch.from_numpy(arr)
    else:
        cu_q = torch.tensor([0, 10, TQ], dtype=torch.int32)
    cu_k = torch.tensor([0, 8, TK], dtype=torch.int32)
    flash_attn_varlen_func(q, k, k, cu_q, cu_k, 14, 12)
    version = cu_q._version
    if how == "numpy":
        arr[2] = 10 ** 6
    else:
        cu_q.data[2] = 10 ** 6
    assert cu_q._version == version  # the change is invisible to the version counter
    with pytest.raises(ValueError, match="cu_seqlens_q|max_seqlen"):
        flash_attn_varlen_func(q, k, k, cu_q, cu_k, 14, 12)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="cu_seqlens_q|max_seqlen"):
            flash_attn_varlen_func(q, k, k, cu_q, cu_k, 14, 12)


def test_paged_varlen_bad_block_ids_read_zeros():
    """flash_attn_varlen_func with block_table, kernel path: bad ids read as zero K/V, never outside the pool."""
    g = torch.Generator().manual_seed(5)
    pool_k, pool_v = guarded((NB, 16, VH, VD), 64), guarded((NB, 16, VH, VD), 64)
    for t in (pool_k, pool_v):
        t.copy_(torch.randn(*t.shape, generator=g).to(DT))
    q = torch.randn(4, VH, VD, generator=g).to(DT).to(DEV)
    cu_q = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 20, 100000], dtype=torch.int32, device=DEV)  # seq 1: far past its 2 table columns
    bt = torch.tensor([[3, 100000], [-5, 99]], dtype=torch.int32, device=DEV)
    out, _ = flash_fwd(q, pool_k, pool_v, cu_q, cu_k, 2, 32, softmax_scale=VD ** -0.5, block_table=bt)
    assert torch.isfinite(out).all()
    # sequence 1 sees 32 keys, all on bad ids: zeros; sequence 0: 16 real keys of page 3 plus 4 zero keys
    assert out[2:].abs().max() == 0
    kk = torch.cat([pool_k[3], torch.zeros(4, VH, VD, dtype=DT, device=DEV)])
    vv = torch.cat([pool_v[3], torch.zeros(4, VH, VD, dtype=DT, device=DEV)])
    ref = attention_ref(q[None, :2].float().cpu(), kk[None].float().cpu(), vv[None].float().cpu())[0]
    torch.testing.assert_close(out[:2].float().cpu(), ref, atol=1e-2, rtol=0)


# ---------------------------------------------------------------------------------------------
# Non-finite scalars
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [("softmax_scale", math.nan), ("softmax_scale", math.inf),
                                        ("softmax_scale", -math.inf), ("softcap", math.nan),
                                        ("softcap", math.inf)])
def test_non_finite_scalars_raise(name, value):
    """Before: a NaN/inf scale gave all-NaN output, a NaN softcap counted as 0."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, VH, VD, generator=g).to(DT).to(DEV)
    kw = {name: value}
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEV)
    calls = [
        lambda: flash_attn_func(q, q, q, **kw),
        lambda: flash_attn_qkvpacked_func(torch.stack([q, q, q], 2), **kw),
        lambda: flash_attn_kvpacked_func(q, torch.stack([q, q], 2), **kw),
        lambda: flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4, **kw),
        lambda: flash_attn_varlen_qkvpacked_func(torch.stack([q[0]] * 3, 1), cu, 4, **kw),
        lambda: flash_attn_varlen_kvpacked_func(q[0], torch.stack([q[0]] * 2, 1), cu, cu, 4, 4, **kw),
        lambda: flash_attn_with_kvcache(q, q, q, cache_seqlens=4, **kw),
        lambda: paged_decode(q, q, q, torch.full((1,), 4, dtype=torch.int32, device=DEV), **kw),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=name):
            call()
