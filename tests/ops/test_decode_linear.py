"""Fused decode projections (norm + projections, projection + residual, rotary + paged K/V write).

On CPU the Triton kernels run through the interpreter (fp32 and fp16); on the GPU bf16 too. Accuracy rule: error vs
a float64 reference at most twice plain PyTorch's error in the same precision (an error below one unit in the last
place of the largest value counts as that unit). Outputs are poisoned (NaN) before each call.
"""

from __future__ import annotations

import pytest
import torch

from hf_efficient.ops import decode_linear as dl


def _dtypes():
    out = [torch.float32, torch.float16]
    if torch.cuda.is_available():
        out.append(torch.bfloat16)
    return out


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale


def _projection_inputs(r, m, k, ns, bias, device, dtype):
    """Rows, norm weight, projection weights and biases in float64 and cast to ``dtype`` on ``device``:
    ``(x64, nw64, ws64, bs64), (x, nw, ws, bs)``."""
    x64, nw64 = r(m, k, scale=2.0).double(), (1 + 0.3 * r(k)).double()
    ws64 = [r(n, k, scale=k ** -0.5).double() for n in ns]
    bs64 = [r(n).double() for n in ns] if bias else None
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    return (x64, nw64, ws64, bs64), (cast(x64), cast(nw64), [cast(w) for w in ws64],
                                     [cast(b) for b in bs64] if bias else None)


def _assert_accurate(out, ref_same, ref64, factor=2.0):
    assert out.dtype == ref_same.dtype and out.shape == ref_same.shape
    assert torch.isfinite(out).all()
    ulp = torch.finfo(out.dtype).eps * ref64.abs().max().item()
    err = (out.double() - ref64).abs().max().item()
    base = (ref_same.double() - ref64).abs().max().item()
    assert err <= factor * max(base, ulp), f"error {err:.3g} vs PyTorch's {base:.3g}"


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("m", [1, 5, 17, 40])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [88, 600])  # 600: K split across programs (split-K fix-up)
def test_norm_linear(device, dtype, m, bias, k):
    r = _gen(m * 2 + bias + k)
    (x64, nw64, ws64, bs64), (x, nw, ws, bs) = _projection_inputs(r, m, k, (72, 24, 24), bias, device, dtype)
    out = dl.norm_linear(x, ws, nw, 1e-5, bs)
    ref = dl.norm_linear_reference(x, ws, nw, 1e-5, bs)
    ref64 = dl.norm_linear_reference(x64, ws64, nw64, 1e-5, bs64).to(device)
    _assert_accurate(out, ref, ref64)
    # one weight, no norm (the LM head path without its norm)
    _assert_accurate(dl.norm_linear(x, ws[:1]), dl.norm_linear_reference(x, ws[:1]),
                     dl.norm_linear_reference(x64, ws64[:1]).to(device))


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("k", [80, 1000])  # 1000: K split across programs (split-K fix-up)
def test_linear_residual(device, dtype, m, silu_mul, k):
    r = _gen(m + 7 * silu_mul + k)
    n = 56
    x64 = r(m, 2 * k if silu_mul else k, scale=2.0).double()
    w64, res64 = r(n, k, scale=k ** -0.5).double(), r(m, n, scale=3.0).double()
    x, w, res = (t.to(device, dtype) for t in (x64, w64, res64))
    ref = dl.linear_residual_reference(x, w, res, silu_mul)
    ref64 = dl.linear_residual_reference(x64, w64, res64, silu_mul).to(device)
    _assert_accurate(dl.linear_residual(x, w, res, silu_mul), ref, ref64)
    inplace = res.clone()
    out = dl.linear_residual(x, w, inplace, silu_mul, out=inplace)
    assert out.data_ptr() == inplace.data_ptr()
    _assert_accurate(inplace, ref, ref64)
    _assert_accurate(dl.linear_residual(x, w, None, silu_mul), dl.linear_residual_reference(x, w, None, silu_mul),
                     dl.linear_residual_reference(x64, w64, None, silu_mul).to(device))


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("head_dim", [16, 80])
def test_rope_store_shuffled_slots(device, dtype, head_dim):
    r = _gen(head_dim)
    m, h, hk, bs = 6, 6, 2, 4
    qkv64 = r(m, (h + 2 * hk) * head_dim).double()
    qkv = qkv64.to(device, dtype)
    pos = torch.randint(0, 3000, (m,)).to(device)
    inv = (1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(device)
    slots = torch.randperm(10 * bs)[:m].to(device)  # scattered through the pool
    pools = [torch.full((10, bs, hk, head_dim), float("nan"), dtype=dtype, device=device) for _ in range(4)]
    pools64 = [torch.zeros(10, bs, hk, head_dim, dtype=torch.float64, device=device) for _ in range(2)]
    q = dl.rope_store(qkv, pos, inv, 0.9, h, hk, pools[0], pools[1], slots)
    q_ref = dl.rope_store_reference(qkv, pos, inv, 0.9, h, hk, pools[2], pools[3], slots)
    q64 = dl.rope_store_reference(qkv64.to(device), pos, inv.double(), 0.9, h, hk, *pools64, slots)
    _assert_accurate(q, q_ref, q64)
    rows = lambda p: p.view(-1, hk, head_dim)[slots]  # noqa: E731
    _assert_accurate(rows(pools[0]), rows(pools[2]), rows(pools64[0]))
    assert torch.equal(rows(pools[1]), rows(pools[3]))  # v is copied
    untouched = torch.ones(10 * bs, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert torch.isnan(pools[0].view(-1, hk, head_dim)[untouched.to(device)]).all()


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("m,head_dim,bias", [(1, 16, False), (5, 32, True), (20, 16, False)])
def test_norm_linear_rope_equals_the_two_ops(device, dtype, m, head_dim, bias):
    """q/k/v projection with the rotary + paged K/V write as its epilogue: as accurate as PyTorch's norm, linear and
    rotary in the same precision (vs float64), cache rows written only at the (shuffled) slots."""
    r = _gen(m + head_dim)
    h, hk, k, bs = 4, 2, 96, 4
    ns = (h * head_dim, hk * head_dim, hk * head_dim)
    (x64, nw64, ws64, bs64), (x, nw, ws, bs_) = _projection_inputs(r, m, k, ns, bias, device, dtype)
    pos = torch.randint(0, 3000, (m,)).to(device)
    inv = (1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(device)
    slots = torch.randperm(12 * bs)[:m].to(device)
    pools = [torch.full((12, bs, hk, head_dim), float("nan"), dtype=dtype, device=device) for _ in range(4)]
    pools64 = [torch.zeros(12, bs, hk, head_dim, dtype=torch.float64, device=device) for _ in range(2)]
    q = dl.norm_linear_rope(x, ws, nw, 1e-5, bs_, pos, inv, 0.9, h, hk, pools[0], pools[1], slots)
    q_ref = dl.rope_store_reference(dl.norm_linear_reference(x, ws, nw, 1e-5, bs_), pos, inv, 0.9, h, hk,
                                    pools[2], pools[3], slots)
    qkv64 = dl.norm_linear_reference(x64, ws64, nw64, 1e-5, bs64).to(device)
    q64 = dl.rope_store_reference(qkv64, pos, inv.double(), 0.9, h, hk, *pools64, slots)
    _assert_accurate(q, q_ref, q64)
    rows = lambda p: p.view(-1, hk, head_dim)[slots]  # noqa: E731
    for i in range(2):
        _assert_accurate(rows(pools[i]), rows(pools[2 + i]), rows(pools64[i]))
        untouched = torch.ones(12 * bs, dtype=torch.bool)
        untouched[slots.cpu()] = False
        assert torch.isnan(pools[i].view(-1, hk, head_dim)[untouched.to(device)]).all()
    with pytest.raises(ValueError, match="q, k, v projections"):
        dl.norm_linear_rope(x, ws[:2], nw, 1e-5, None, pos, inv, 0.9, h, hk, pools[0], pools[1], slots)


def test_split_k_is_planned_and_deterministic(device, tune):
    """Few output tiles and a long K: the plan splits K; repeated calls give bitwise-identical results and leave the
    arrival counters at zero (so CUDA-graph replays start clean)."""
    dtype = torch.float16
    tune(gemv=False)  # one row would take the one-row kernel, which has no split
    x = torch.randn(1, 2048, device=device).to(dtype)
    w = (torch.randn(48, 2048, device=device) / 45).to(dtype)
    plan = dl.tiles(1, 48, 2048, torch.device(device))
    assert plan[5] > 1, plan
    first = dl.linear_residual(x, w)
    for _ in range(3):
        assert torch.equal(dl.linear_residual(x, w), first)
    _, cnt = dl._WORKSPACE[(x.device.type, x.device.index)]
    assert int(cnt.abs().sum()) == 0


@pytest.mark.parametrize("m", [1, 16])
def test_single_tile_programs(device, monkeypatch, tune, m):
    """The plan used with programmatic dependent launch: every program multiplies one weight tile that it loads
    before waiting for the previous kernel (forced here, so the CPU interpreter checks it too)."""
    monkeypatch.setattr(dl, "_prefetch", lambda device: True)
    tune(gemv=False)  # the tile kernels at one row too
    plan = dl.tiles(m, 56, 1000, torch.device(device), prefetch=True)
    assert plan[2] == plan[6] and plan[5] == -(-1000 // plan[2]), plan
    r = _gen(m)
    dtype = torch.float16
    x64, w64, res64 = r(m, 2000, scale=2.0).double(), r(56, 1000, scale=0.03).double(), r(m, 56).double()
    x, w, res = (t.to(device, dtype) for t in (x64, w64, res64))
    _assert_accurate(dl.linear_residual(x, w, res, silu_mul=True), dl.linear_residual_reference(x, w, res, True),
                     dl.linear_residual_reference(x64, w64, res64, True).to(device))
    ws64 = [r(n, 600, scale=0.04).double() for n in (72, 24, 24)]
    xn64, nw64 = r(m, 600).double(), (1 + 0.3 * r(600)).double()
    xn, nw, ws = xn64.to(device, dtype), nw64.to(device, dtype), [t.to(device, dtype) for t in ws64]
    _assert_accurate(dl.norm_linear(xn, ws, nw, 1e-5), dl.norm_linear_reference(xn, ws, nw, 1e-5),
                     dl.norm_linear_reference(xn64, ws64, nw64, 1e-5).to(device))


@pytest.fixture
def launched(monkeypatch):
    """Names of the Triton kernels launched through ``precompile.run`` during the test."""
    names, run = [], dl.precompile.run

    def spy(kernel, grid, *args, **kwargs):
        names.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return run(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(dl.precompile, "run", spy)
    return names


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("k,bias", [(88, True), (600, False), (1000, True), (9000, False)])
@pytest.mark.parametrize("m,persistent", [(1, False), (1, True), (2, True), (5, True)])
def test_one_row_kernels(device, dtype, launched, monkeypatch, tune, k, bias, m, persistent):
    """Decode at batch 1 (and small batches: m rows, each weight element read once for all of them) runs the
    one-row kernels (whole weight rows per program, no split of K): as accurate as PyTorch against float64, for K
    padded to a power of two, K above one tile (9000: one row per program, several warps), biases, strided input
    rows, the SiLU-mul input and the residual written in place; also with persistent programs that walk several
    tiles (the first SMs' worth of programs; tiles across the weights' boundaries), and at more rows than the
    default ``gemv_max_m`` (5, with the knob at 8)."""
    tune(gemv_persistent=persistent)
    if persistent:  # three programs in all (so each walks several tiles), on the GPU too
        monkeypatch.setattr(dl, "GEMV_PERSISTENT_PER_SM", 3)
        monkeypatch.setattr(dl, "num_sms", lambda device: 1)
        assert dl._gemv_programs(10, torch.device(device)) == (3, True)
    assert dl.gemv_plan(dl.GEMV_MAX_M + 1, k) is None
    tune(gemv_max_m=8)
    assert dl.gemv_plan(m, k) is not None
    r = _gen(k + bias + m)
    (x64, nw64, ws64, bs64), (x, nw, ws, bs) = _projection_inputs(r, m, k, (72, 24, 40), bias, device, dtype)
    x = torch.cat([x, torch.full_like(x[:, :5], float("nan"))], dim=1)[:, :k]  # rows 5 elements apart
    _assert_accurate(dl.norm_linear(x, ws, nw, 1e-5, bs), dl.norm_linear_reference(x, ws, nw, 1e-5, bs),
                     dl.norm_linear_reference(x64, ws64, nw64, 1e-5, bs64).to(device))
    _assert_accurate(dl.norm_linear(x, ws[:1]), dl.norm_linear_reference(x, ws[:1]),
                     dl.norm_linear_reference(x64, ws64[:1]).to(device))
    gu64, w64, res64 = r(m, 2 * k, scale=2.0).double(), r(56, k, scale=k ** -0.5).double(), r(m, 56).double()
    gu, w, res = (t.to(device, dtype) for t in (gu64, w64, res64))
    res = torch.cat([res, torch.zeros_like(res)], dim=1)[:, :56]  # a strided residual stream, updated in place
    ref = dl.linear_residual_reference(gu, w, res, silu_mul=True)
    ref64 = dl.linear_residual_reference(gu64, w64, res64, silu_mul=True).to(device)
    _assert_accurate(dl.linear_residual(gu, w, res, silu_mul=True, out=res), ref, ref64)  # in place
    _assert_accurate(res, ref, ref64)
    _assert_accurate(dl.linear_residual(gu[:, :k], w), dl.linear_residual_reference(gu[:, :k], w),
                     dl.linear_residual_reference(gu64[:, :k], w64).to(device))
    if dl.kernels_usable(x):  # CUDA float32 keeps cuBLAS
        assert set(launched) == {"_gemv_norm_kernel", "_gemv_residual_kernel"}, launched


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("head_dim,k,bias,m", [(16, 96, True, 1), (64, 576, False, 1), (128, 300, True, 1),
                                                (64, 576, True, 2), (64, 576, True, 3), (16, 96, False, 2)])
def test_one_row_rope_matches_the_tile_kernel(device, dtype, launched, tune, head_dim, k, bias, m):
    """The one-row q/k/v kernel with its rotary-pair epilogue (q out, k and v to their cache slot; m rows at
    their own positions and slots, one after another) against the float64 reference, and against the tile kernel's
    result on the same inputs (both bf16-noise close)."""
    tune(gemv_max_m=4)
    r = _gen(head_dim + k + m)
    h, hk, bs = 3, 1, 4
    ns = (h * head_dim, hk * head_dim, hk * head_dim)
    (x64, nw64, ws64, bs64), (x, nw, ws, bs_) = _projection_inputs(r, m, k, ns, bias, device, dtype)
    pos = torch.tensor([2077, 3, 500, 64][:m], device=device)
    inv = (1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(device)
    slots = torch.tensor([5, 0, 11, 6][:m], device=device)
    outs = {}
    for gemv in (True, False):
        tune(gemv=gemv)
        pools = [torch.full((3, bs, hk, head_dim), float("nan"), dtype=dtype, device=device) for _ in range(2)]
        q = dl.norm_linear_rope(x, ws, nw, 1e-5, bs_, pos, inv, 0.9, h, hk, *pools, slots)
        outs[gemv] = (q, *(p.view(-1, hk, head_dim)[slots] for p in pools))
        untouched = torch.ones(3 * bs, dtype=torch.bool)
        untouched[slots.cpu()] = False
        assert all(torch.isnan(p.view(-1, hk, head_dim)[untouched.to(device)]).all() for p in pools)
    pools64 = [torch.zeros(3, bs, hk, head_dim, dtype=torch.float64, device=device) for _ in range(2)]
    qkv64 = dl.norm_linear_reference(x64, ws64, nw64, 1e-5, bs64).to(device)
    q64 = dl.rope_store_reference(qkv64, pos, inv.double(), 0.9, h, hk, *pools64, slots)
    refs64 = (q64, *(p.view(-1, hk, head_dim)[slots] for p in pools64))
    for one_row, tile, ref64 in zip(outs[True], outs[False], refs64):
        _assert_accurate(one_row, tile, ref64)
    if dl.kernels_usable(x):
        assert launched == ["_gemv_norm_kernel", "_norm_linear_kernel"], launched


def test_bad_inputs_name_the_argument(device):
    x = torch.randn(2, 16, device=device)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        dl.norm_linear(x, [torch.randn(8, 16, device=device), torch.randn(8, 12, device=device)])
    with pytest.raises(ValueError, match="weights must hold 1 to 3"):
        dl.norm_linear(x, [])
    with pytest.raises(ValueError, match="norm_weight"):
        dl.norm_linear(x, [torch.randn(8, 16, device=device)], torch.randn(15, device=device))
    with pytest.raises(ValueError, match="silu_mul"):
        dl.linear_residual(torch.randn(2, 15, device=device), torch.randn(8, 7, device=device), silu_mul=True)
    with pytest.raises(ValueError, match="residual"):
        dl.linear_residual(x, torch.randn(8, 16, device=device), torch.randn(3, 8, device=device))
    with pytest.raises(TypeError, match="x must be"):
        dl.norm_linear(x.long(), [torch.randn(8, 16, device=device)])
    pool = torch.zeros(2, 4, 1, 8, device=device)
    with pytest.raises(ValueError, match="qkv"):
        dl.rope_store(torch.randn(2, 20, device=device), torch.zeros(2, dtype=torch.long, device=device),
                      torch.ones(4, device=device), 1.0, 2, 1, pool, pool.clone(),
                      torch.zeros(2, dtype=torch.long, device=device))
