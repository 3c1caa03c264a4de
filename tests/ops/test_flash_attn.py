"""Flash attention kernels (forward + backward) against the plain-PyTorch oracle.

Correctness rule (flash-attention's): the kernel's error in fp16/bf16 against a float64 (CPU) or
float32 (GPU) reference is at most 2x (outputs) / 3x (gradients) the error of plain PyTorch run
in the same low precision. Outputs are poisoned with NaN before each launch (conftest), inputs
are fresh random normals. Without a GPU the kernels run through Triton's interpreter: small
shapes, fp16 only (the interpreter mishandles bf16 arithmetic).
"""
from __future__ import annotations

import pytest
import torch

from hf_efficient.attention.flash_api import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from hf_efficient.ops.attention_ref import attention_ref, attention_varlen_ref

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _rand(*shape, dtype, device, grad=True):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)


def _oracle_dtype(device):
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def _max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def _assert_close(name, ours, ref_hi, ref_lo, factor):
    assert not torch.isnan(ours).any(), f"{name}: NaN (unwritten or broken elements)"
    err, base = _max_err(ours, ref_hi), _max_err(ref_lo, ref_hi)
    assert err <= factor * base + 1e-5, f"{name}: error {err:.3e} > {factor} x PyTorch's {base:.3e}"


def _assert_lse(ours, ref_hi, ref_lo):
    assert ours.dtype == torch.float32
    assert torch.equal(torch.isinf(ours), torch.isinf(ref_hi)), "lse: +inf rows differ"
    fin = torch.isfinite(ref_hi)
    _assert_close("lse", ours[fin], ref_hi[fin], ref_lo[fin].float(), 2)


def _grads(fn, inputs, grad_out):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, grad_out)


def _check_padded(device, dtype, batch, sq, sk, nheads, nheads_k, d, *, causal=False,
                  window_size=(-1, -1), softcap=0.0, alibi=None, deterministic=False):
    q = _rand(batch, sq, nheads, d, dtype=dtype, device=device)
    k = _rand(batch, sk, nheads_k, d, dtype=dtype, device=device)
    v = _rand(batch, sk, nheads_k, d, dtype=dtype, device=device)
    slopes = None
    if alibi == "h":
        slopes = torch.rand(nheads, device=device, dtype=torch.float32)
    elif alibi == "bh":
        slopes = torch.rand(batch, nheads, device=device, dtype=torch.float32)
    kw = dict(causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=slopes)
    out, lse, s_dmask = flash_attn_func(q, k, v, deterministic=deterministic,
                                        return_attn_probs=True, **kw)
    assert s_dmask is None
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (batch, nheads, sq)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)

    hi = [x.detach().to(_oracle_dtype(device)).requires_grad_() for x in (q, k, v)]
    lo = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_hi, ref_hi_lse = attention_ref(*hi, **kw, return_lse=True)
    ref_lo, ref_lo_lse = attention_ref(*lo, **kw, return_lse=True)
    grads_hi = torch.autograd.grad(ref_hi, hi, g.to(ref_hi.dtype))
    grads_lo = torch.autograd.grad(ref_lo, lo, g)
    _assert_close("out", out, ref_hi, ref_lo, 2)
    _assert_lse(lse, ref_hi_lse, ref_lo_lse)
    for name, ours, rh, rl in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_hi, grads_lo):
        assert ours.shape == rh.shape
        _assert_close(name, ours, rh, rl, 3)


def _cu(lengths, device):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


# ----------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: feature grid, small shapes
# ----------------------------------------------------------------------------------------------

GRID = [
    # batch, sq, sk, nheads, nheads_k, d, options
    pytest.param(2, 17, 33, 4, 2, 40, {}, id="gqa-sq<sk-d40"),
    pytest.param(2, 33, 17, 2, 1, 16, {"causal": True}, id="mqa-causal-sq>sk"),
    pytest.param(1, 17, 33, 2, 2, 64, {"causal": True, "alibi": "h"}, id="causal-sq<sk-alibi-d64"),
    pytest.param(2, 33, 33, 2, 2, 24, {"window_size": (5, 3), "alibi": "bh"}, id="window-alibi-bh"),
    pytest.param(1, 20, 31, 4, 2, 32, {"causal": True, "window_size": (4, -1), "softcap": 5.0},
                 id="causal-left-window-softcap"),
    pytest.param(2, 1, 1, 2, 2, 8, {}, id="seqlen1-d8"),
    pytest.param(1, 1, 17, 2, 2, 16, {"causal": True, "softcap": 2.0}, id="seqlen_q1-causal"),
]


@pytest.mark.parametrize("batch,sq,sk,nheads,nheads_k,d,opts", GRID)
def test_padded_fp16(device, batch, sq, sk, nheads, nheads_k, d, opts):
    _check_padded(device, torch.float16, batch, sq, sk, nheads, nheads_k, d, **opts)


def test_varlen_empty_and_short_sequences(device):
    dtype = torch.float16
    lens_q = [5, 0, 1, 17, 9]
    lens_k = [7, 3, 0, 17, 20]
    pad_q, pad_k = 2, 3  # trailing tokens that belong to no sequence
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    tq, tk = sum(lens_q) + pad_q, sum(lens_k) + pad_k
    q = _rand(tq, 4, 32, dtype=dtype, device=device)
    k = _rand(tk, 2, 32, dtype=dtype, device=device)
    v = _rand(tk, 2, 32, dtype=dtype, device=device)
    kw = dict(causal=True, softcap=3.0)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                         return_attn_probs=True, **kw)
    assert lse.shape == (4, tq)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    hi = [x.detach().to(_oracle_dtype(device)).requires_grad_() for x in (q, k, v)]
    lo = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_hi, ref_hi_lse = attention_varlen_ref(*hi, cu_q, cu_k, **kw, return_lse=True)
    ref_lo, ref_lo_lse = attention_varlen_ref(*lo, cu_q, cu_k, **kw, return_lse=True)
    _assert_close("out", out, ref_hi, ref_lo, 2)
    _assert_lse(lse, ref_hi_lse, ref_lo_lse)
    assert torch.all(out[-pad_q:] == 0)
    grads_hi = torch.autograd.grad(ref_hi, hi, g.to(ref_hi.dtype))
    grads_lo = torch.autograd.grad(ref_lo, lo, g)
    for name, ours, rh, rl in zip(("dq", "dk", "dv"), grads, grads_hi, grads_lo):
        _assert_close(name, ours, rh, rl, 3)
    assert torch.all(grads[1][-pad_k:] == 0) and torch.all(grads[2][-pad_k:] == 0)


def test_dropout_matches_reference_given_its_mask(device):
    dtype, p = torch.float16, 0.3
    q = _rand(2, 24, 2, 32, dtype=dtype, device=device)
    k = _rand(2, 40, 1, 32, dtype=dtype, device=device)
    v = _rand(2, 40, 1, 32, dtype=dtype, device=device)
    kw = dict(causal=True, alibi_slopes=torch.rand(2, device=device))
    torch.manual_seed(123)
    out, lse, s_dmask = flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, **kw)
    torch.manual_seed(123)
    out_again = flash_attn_func(q, k, v, dropout_p=p, **kw)
    assert torch.equal(out, out_again), "same torch seed must give the same dropout mask"
    out_other = flash_attn_func(q, k, v, dropout_p=p, **kw)
    assert not torch.equal(out, out_other), "a new call must draw a new dropout mask"

    assert s_dmask.shape == (2, 2, 24, 40) and s_dmask.dtype == torch.float32
    keep = s_dmask >= 0
    visible = s_dmask != 0  # masked-out positions hold 0
    frac = ((s_dmask > 0).sum() / visible.sum()).item()
    assert abs(frac - (1 - p)) < 0.05, f"keep fraction {frac:.3f}, expected about {1 - p}"
    # Probabilities (sign removed) agree with the reference softmax.
    probs_ref = torch.softmax(_ref_scores(q, k, **kw), -1).nan_to_num(0)
    assert (s_dmask.abs().double() - probs_ref).abs().max() < 1e-3

    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    hi = [x.detach().to(_oracle_dtype(device)).requires_grad_() for x in (q, k, v)]
    lo = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_hi = attention_ref(*hi, dropout_mask=keep, dropout_p=p, **kw)
    ref_lo = attention_ref(*lo, dropout_mask=keep, dropout_p=p, **kw)
    _assert_close("out", out, ref_hi, ref_lo, 2)
    grads_hi = torch.autograd.grad(ref_hi, hi, g.to(ref_hi.dtype))
    grads_lo = torch.autograd.grad(ref_lo, lo, g)
    for name, ours, rh, rl in zip(("dq", "dk", "dv"), grads, grads_hi, grads_lo):
        _assert_close(name, ours, rh, rl, 3)


def _ref_scores(q, k, causal=False, alibi_slopes=None):
    """float64 (B, H, Sq, Sk) scaled scores with ALiBi and the causal mask."""
    sq, sk, h, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    kk = k.detach().double().repeat_interleave(h // k.shape[2], 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.detach().double(), kk) / d**0.5
    i = torch.arange(sq, device=q.device)[:, None] + sk - sq
    j = torch.arange(sk, device=q.device)[None, :]
    if alibi_slopes is not None:
        s = s - alibi_slopes.double().view(1, h, 1, 1) * (i - j).abs()
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    return s


def test_varlen_dropout_mask_layout(device):
    p = 0.25
    lens = [9, 0, 17]
    cu = _cu(lens, device)
    q = _rand(26, 2, 16, dtype=torch.float16, device=device)
    k = _rand(26, 2, 16, dtype=torch.float16, device=device)
    v = _rand(26, 2, 16, dtype=torch.float16, device=device)
    out, _, s_dmask = flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, dropout_p=p,
                                             return_attn_probs=True)
    assert s_dmask.shape == (3, 2, 17, 17)
    masks = [(s_dmask[b, :, :n, :n] >= 0) for b, n in enumerate(lens)]
    ref = attention_varlen_ref(q.detach().double(), k.detach().double(), v.detach().double(),
                               cu, cu, dropout_mask=masks, dropout_p=p)
    ref_lo = attention_varlen_ref(q.detach(), k.detach(), v.detach(), cu, cu, dropout_mask=masks,
                                  dropout_p=p)
    _assert_close("out", out, ref, ref_lo, 2)


def test_deterministic_backward_is_bitwise_reproducible(device):
    q = _rand(2, 33, 4, 32, dtype=torch.float16, device=device)
    k = _rand(2, 33, 2, 32, dtype=torch.float16, device=device)
    v = _rand(2, 33, 2, 32, dtype=torch.float16, device=device)
    g = torch.randn(2, 33, 4, 32, dtype=torch.float16, device=device)
    f = lambda *x: flash_attn_func(*x, causal=True, deterministic=True)  # noqa: E731
    _, first = _grads(f, (q, k, v), g)
    _, second = _grads(f, (q, k, v), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_atomic_dq_scheme_agrees(device, tune):
    q = _rand(1, 33, 2, 32, dtype=torch.float16, device=device)
    k = _rand(1, 40, 1, 32, dtype=torch.float16, device=device)
    v = _rand(1, 40, 1, 32, dtype=torch.float16, device=device)
    g = torch.randn(1, 33, 2, 32, dtype=torch.float16, device=device)
    f = lambda *x: flash_attn_func(*x, causal=True, window_size=(7, -1))  # noqa: E731
    tune(flash_bwd="split")
    _, split = _grads(f, (q, k, v), g)
    tune(flash_bwd="atomic")
    _, atomic = _grads(f, (q, k, v), g)
    for a, b in zip(split, atomic):
        assert not torch.isnan(b).any()
        assert (a.float() - b.float()).abs().max() < 2e-3


def test_packed_wrappers_match(device):
    qkv = torch.randn(2, 17, 3, 2, 16, dtype=torch.float16, device=device)
    ref = flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    assert torch.equal(flash_attn_qkvpacked_func(qkv, causal=True), ref)
    assert torch.equal(flash_attn_kvpacked_func(qkv[:, :, 0], qkv[:, :, 1:], causal=True), ref)
    flat = qkv.reshape(34, 3, 2, 16)
    cu = _cu([17, 17], device)
    ref_v = ref.reshape(34, 2, 16)
    assert torch.equal(flash_attn_varlen_qkvpacked_func(flat, cu, 17, causal=True), ref_v)
    assert torch.equal(flash_attn_varlen_kvpacked_func(flat[:, 0], flat[:, 1:], cu, cu, 17, 17,
                                                       causal=True), ref_v)


def test_packed_qkv_gradient_flows(device):
    qkv = _rand(1, 9, 3, 2, 16, dtype=torch.float16, device=device)
    (g,) = torch.autograd.grad(flash_attn_qkvpacked_func(qkv).float().sum(), (qkv,))
    assert g.shape == qkv.shape and not torch.isnan(g).any()


def test_paged_kv_forward_matches_contiguous(device):
    lens_q, lens_k, page = [3, 1, 12], [10, 1, 21], 8
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    q = torch.randn(sum(lens_q), 4, 32, dtype=torch.float16, device=device)
    k = torch.randn(sum(lens_k), 2, 32, dtype=torch.float16, device=device)
    v = torch.randn(sum(lens_k), 2, 32, dtype=torch.float16, device=device)
    max_pages = -(-max(lens_k) // page)
    num_blocks = len(lens_k) * max_pages + 2
    perm = torch.randperm(num_blocks, device=device)  # shuffled block table
    table = perm[: len(lens_k) * max_pages].view(len(lens_k), max_pages).to(torch.int32)
    k_pages = torch.randn(num_blocks, page, 2, 32, dtype=torch.float16, device=device)
    v_pages = torch.randn(num_blocks, page, 2, 32, dtype=torch.float16, device=device)
    for b, n in enumerate(lens_k):
        for j in range(n):
            blk, off = int(table[b, j // page]), j % page
            k_pages[blk, off] = k[cu_k[b] + j]
            v_pages[blk, off] = v[cu_k[b] + j]
    want = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
    got = flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, max(lens_q), max(lens_k),
                                 causal=True, block_table=table)
    assert torch.equal(got, want)
    q.requires_grad_()
    out = flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, max(lens_q), max(lens_k),
                                 block_table=table)
    with pytest.raises(ValueError, match="forward-only"):
        out.sum().backward()


def test_empty_key_rows_are_zero_with_inf_lse(device):
    # seqlen_q > seqlen_k with causal: the first sq - sk rows see no key.
    q = _rand(1, 20, 2, 16, dtype=torch.float16, device=device)
    k = _rand(1, 5, 2, 16, dtype=torch.float16, device=device)
    v = _rand(1, 5, 2, 16, dtype=torch.float16, device=device)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.all(out[:, :15] == 0) and torch.all(torch.isinf(lse[:, :, :15]))
    assert torch.all(torch.isfinite(lse[:, :, 15:]))
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert torch.all(grads[0][:, :15] == 0)
    assert all(not torch.isnan(x).any() for x in grads)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _qkv(device, dtype=torch.float16, b=1, s=8, h=2, hk=2, d=16):
    return (torch.randn(b, s, h, d, dtype=dtype, device=device),
            torch.randn(b, s, hk, d, dtype=dtype, device=device),
            torch.randn(b, s, hk, d, dtype=dtype, device=device))


def test_rejects_bad_inputs(device):
    q, k, v = _qkv(device)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        flash_attn_func(q.float(), k.float(), v.float())
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attn_func(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match="head_dim.*at most 256"):
        flash_attn_func(*_qkv(device, d=264))
    with pytest.raises(ValueError, match="last dimension"):
        flash_attn_func(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v)
    with pytest.raises(ValueError, match="multiple of nheads_k"):
        flash_attn_func(*_qkv(device, h=3, hk=2))
    with pytest.raises(ValueError, match="batch size"):
        flash_attn_func(q, *_qkv(device, b=2)[1:])
    with pytest.raises(ValueError, match=r"q must be \(batch"):
        flash_attn_func(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="window_size"):
        flash_attn_func(q, k, v, window_size=3)
    with pytest.raises(TypeError, match="window_size"):
        flash_attn_func(q, k, v, window_size=(1.5, 2))
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="softcap"):
        flash_attn_func(q, k, v, softcap=-1.0)
    with pytest.raises(TypeError, match="alibi_slopes"):
        flash_attn_func(q, k, v, alibi_slopes=torch.ones(2, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="alibi_slopes"):
        flash_attn_func(q, k, v, alibi_slopes=torch.ones(3, device=device))


def test_rejects_bad_cu_seqlens(device):
    q = torch.randn(10, 2, 16, dtype=torch.float16, device=device)
    good = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="cu_seqlens_q must be a 1-D int32"):
        flash_attn_varlen_func(q, q, q, good.long(), good, 6, 6)
    with pytest.raises(TypeError, match="cu_seqlens_k must be a 1-D int32"):
        flash_attn_varlen_func(q, q, q, good, good[None], 6, 6)
    with pytest.raises(ValueError, match="batch \\+ 1"):
        flash_attn_varlen_func(q, q, q, good, good[:2], 6, 6)
    bad = torch.tensor([0, 6, 4], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="non-decreasing"):
        flash_attn_varlen_func(q, q, q, bad, good, 6, 6)
    with pytest.raises(ValueError, match="max_seqlen"):
        flash_attn_varlen_func(q, q, q, good, good, 5, 6)
    past = torch.tensor([0, 4, 11], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="total_q"):
        flash_attn_varlen_func(q, q, q, past, good, 7, 7)
    with pytest.raises(TypeError, match="max_seqlen_q"):
        flash_attn_varlen_func(q, q, q, good, good, 6.0, 6)


def test_cu_seqlens_recheck_after_inplace_change(device):
    q = torch.randn(10, 2, 16, dtype=torch.float16, device=device)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)
    flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)  # cached: no second sync
    cu[1] = 11  # same tensor object, new contents: must be checked again
    with pytest.raises(ValueError, match="non-decreasing"):
        flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check")
def test_rejects_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        flash_attn_func(*_qkv("cpu"))


# ----------------------------------------------------------------------------------------------
# torch.library / torch.compile integration
# ----------------------------------------------------------------------------------------------


def test_opcheck_fwd(device):
    q, k, v = (x.requires_grad_() for x in _qkv(device, s=9, hk=1))
    torch.library.opcheck(
        torch.ops.hf_efficient.flash_attn_fwd.default,
        (q, k, v, None, None, 0, 0, 0.25, True, -1, 0, 0.0, None, 0.0, None, None, False))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 7, 4, 64, dtype=torch.bfloat16, device="cuda" if HAS_CUDA else "cpu")
        k = torch.empty(2, 9, 2, 64, dtype=torch.bfloat16, device=q.device)
        out, lse = torch.ops.hf_efficient.flash_attn_fwd(
            q, k, k, None, None, 0, 0, 0.125, False, -1, -1, 0.0, None, 0.0, None, None, False)
        assert out.shape == q.shape and lse.shape == (2, 4, 7) and lse.dtype == torch.float32
        cu = torch.empty(3, dtype=torch.int32, device=q.device)
        out, lse = torch.ops.hf_efficient.flash_attn_fwd(
            q[0], k[0], k[0], cu, cu, 7, 9, 0.125, True, -1, 0, 0.0, None, 0.0, None, None, False)
        assert lse.shape == (4, 7)
        dq, dk, dv = torch.ops.hf_efficient.flash_attn_bwd(
            out, q[0], k[0], k[0], out, lse, cu, cu, 7, 9, 0.125, True, -1, 0, 0.0, None, 0.0,
            None, False)
        assert dq.shape == q[0].shape and dk.shape == k[0].shape


def test_compile_fullgraph(device):
    q, k, v = (x.requires_grad_() for x in _qkv(device, s=17, hk=1))
    backend = "inductor" if HAS_CUDA else "aot_eager"

    def fn(q, k, v):
        return flash_attn_func(q * 1.0, k, v, causal=True, softcap=4.0).float().square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(fn(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2)


# ----------------------------------------------------------------------------------------------
# GPU only: bf16, production shapes, autotuned launches
# ----------------------------------------------------------------------------------------------

GPU_GRID = [
    pytest.param(2, 113, 203, 8, 2, 128, {"causal": True}, id="causal-113x203-d128-gqa"),
    pytest.param(2, 203, 113, 4, 4, 80, {"causal": True}, id="causal-203x113-d80"),
    pytest.param(1, 203, 203, 4, 1, 256, {}, id="mqa-203-d256"),
    pytest.param(2, 256, 256, 4, 2, 64, {"window_size": (32, 16), "alibi": "h"}, id="window-alibi-d64"),
    pytest.param(1, 333, 333, 4, 4, 96, {"causal": True, "softcap": 30.0}, id="softcap-d96"),
    pytest.param(2, 1, 129, 4, 2, 128, {"causal": True}, id="q1-decode-like"),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("batch,sq,sk,nheads,nheads_k,d,opts", GPU_GRID)
def test_gpu_padded(dtype, batch, sq, sk, nheads, nheads_k, d, opts, tune):
    tune(flash_autotune=False)  # one compile per variant
    _check_padded("cuda", dtype, batch, sq, sk, nheads, nheads_k, d, **opts)


@gpu
@needs_cuda
@pytest.mark.parametrize("scheme", ["split", "atomic"])
def test_gpu_autotuned_bf16(scheme, tune):
    tune(flash_bwd=scheme)
    _check_padded("cuda", torch.bfloat16, 2, 1000, 1000, 8, 4, 128, causal=True)


@gpu
@needs_cuda
def test_gpu_varlen_bf16(tune):
    tune(flash_autotune=False)
    lens_q = [300, 0, 1, 77, 513]
    lens_k = [300, 5, 0, 200, 513]
    cu_q, cu_k = _cu(lens_q, "cuda"), _cu(lens_k, "cuda")
    dt = torch.bfloat16
    q = _rand(sum(lens_q), 8, 128, dtype=dt, device="cuda")
    k = _rand(sum(lens_k), 2, 128, dtype=dt, device="cuda")
    v = _rand(sum(lens_k), 2, 128, dtype=dt, device="cuda")
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 513, 513, causal=True, window_size=(100, -1))
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    hi = [x.detach().float().requires_grad_() for x in (q, k, v)]
    lo = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    kw = dict(causal=True, window_size=(100, -1))
    ref_hi = attention_varlen_ref(*hi, cu_q, cu_k, **kw)
    ref_lo = attention_varlen_ref(*lo, cu_q, cu_k, **kw)
    _assert_close("out", out, ref_hi, ref_lo, 2)
    for name, ours, rh, rl in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref_hi, hi, g.float()),
                                  torch.autograd.grad(ref_lo, lo, g)):
        _assert_close(name, ours, rh, rl, 3)


@gpu
@needs_cuda
def test_gpu_dropout_bf16(tune):
    tune(flash_autotune=False)
    p = 0.17
    q = _rand(2, 200, 4, 64, dtype=torch.bfloat16, device="cuda")
    k = _rand(2, 300, 2, 64, dtype=torch.bfloat16, device="cuda")
    v = _rand(2, 300, 2, 64, dtype=torch.bfloat16, device="cuda")
    out, _, s_dmask = flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
    keep = s_dmask >= 0
    assert abs(((s_dmask > 0).sum() / (s_dmask != 0).sum()).item() - (1 - p)) < 0.01
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    hi = [x.detach().float().requires_grad_() for x in (q, k, v)]
    lo = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_hi = attention_ref(*hi, causal=True, dropout_mask=keep, dropout_p=p)
    ref_lo = attention_ref(*lo, causal=True, dropout_mask=keep, dropout_p=p)
    _assert_close("out", out, ref_hi, ref_lo, 2)
    for name, ours, rh, rl in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref_hi, hi, g.float()),
                                  torch.autograd.grad(ref_lo, lo, g)):
        _assert_close(name, ours, rh, rl, 3)


@gpu
@needs_cuda
def test_gpu_deterministic_bf16(tune):
    tune(flash_autotune=False)
    q = _rand(2, 500, 8, 128, dtype=torch.bfloat16, device="cuda")
    k = _rand(2, 500, 2, 128, dtype=torch.bfloat16, device="cuda")
    v = _rand(2, 500, 2, 128, dtype=torch.bfloat16, device="cuda")
    g = torch.randn_like(q)
    f = lambda *x: flash_attn_func(*x, causal=True, deterministic=True)  # noqa: E731
    first = _grads(f, (q, k, v), g)[1]
    second = _grads(f, (q, k, v), g)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@gpu
@needs_cuda
@pytest.mark.parametrize("d,opts", [(128, {"causal": True}), (80, {"window_size": (50, 7)}),
                                    (64, {"softcap": 10.0, "alibi": "h"})], ids=["d128", "d80", "d64"])
def test_gpu_tma_forward_bf16(d, opts, tune):
    tune(flash_autotune=False)
    tune(flash_tma=True)
    _check_padded("cuda", torch.bfloat16, 2, 203, 333, 8, 2, d, **opts)


@gpu
@needs_cuda
def test_gpu_tma_varlen_bf16(tune):
    tune(flash_autotune=False)
    tune(flash_tma=True)
    lens = [130, 0, 1, 260]
    cu = _cu(lens, "cuda")
    q, k, v = (torch.randn(sum(lens), 4, 128, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    out = flash_attn_varlen_func(q, k, v, cu, cu, 260, 260, causal=True)
    ref_hi = attention_varlen_ref(q.float(), k.float(), v.float(), cu, cu, causal=True)
    ref_lo = attention_varlen_ref(q, k, v, cu, cu, causal=True)
    _assert_close("out", out, ref_hi, ref_lo, 2)


# ----------------------------------------------------------------------------------------------
# Host-side fast paths: remembered checks, launch plans, direct launches, tuning classes
# ----------------------------------------------------------------------------------------------


def test_remembered_checks_still_reject_bad_inputs(device):
    """A signature that passed once skips the tensor checks; everything else is still checked."""
    q, k, v = _qkv(device, s=9, hk=1)
    flash_attn_func(q, k, v, causal=True)
    flash_attn_func(q, k, v, causal=True)  # remembered signature
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="softcap"):
        flash_attn_func(q, k, v, softcap=-1.0)
    with pytest.raises(TypeError, match="window_size"):
        flash_attn_func(q, k, v, window_size=(1, True))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        flash_attn_func(q.float(), k, v)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        flash_attn_func(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attn_func(*_qkv(device, s=9, hk=1, d=264))


def test_launch_plan_follows_strides(device):
    """Two calls with equal shapes but different strides must not share a launch plan."""
    q, k, v = (x.detach() for x in _qkv(device, s=9, hk=1))
    k_wide = torch.randn(k.shape[0], k.shape[1], k.shape[2], 2 * k.shape[3], dtype=k.dtype,
                         device=device)[..., : k.shape[3]]
    k_wide.copy_(k)
    a = flash_attn_func(q, k, v, causal=True)
    b = flash_attn_func(q, k_wide, v, causal=True)
    assert torch.equal(a, b)


def test_seqlen_classes():
    from hf_efficient.ops.flash_fwd import _seqlen_class

    assert [_seqlen_class(n) for n in (0, 1, 16, 17, 512, 513, 4000)] == [16, 16, 16, 32, 512, 1024, 4096]


@gpu
@needs_cuda
def test_gpu_direct_launch_matches_regular_launcher(tune):
    """Repeated launches go straight to the compiled kernel and give the regular launcher's bits,
    including for a signature that differs only in pointer alignment or dtype."""
    from hf_efficient.ops import flash_fwd

    q, k, v = (torch.randn(2, 203, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    base = torch.randn(2 * 203 * 8 * 128 + 8, dtype=torch.bfloat16, device="cuda")
    q_odd = base[8:].view(2, 203, 8, 128)  # 16-byte aligned, other address
    q_mis = base[4:-4].view(2, 203, 8, 128)  # 8-byte aligned only: another specialisation
    q_odd.copy_(q)
    q_mis.copy_(q)
    cases = [(q, k, v), (q_odd, k, v), (q_mis, k, v), tuple(x.half() for x in (q, k, v))]
    tune(direct_launch=False)
    regular = [flash_attn_func(*c, causal=True) for c in cases]
    tune(direct_launch=True)
    before = flash_fwd.DIRECT_LAUNCHES["hits"]
    for _ in range(3):
        direct = [flash_attn_func(*c, causal=True) for c in cases]
        assert all(torch.equal(a, b) for a, b in zip(regular, direct))
    assert flash_fwd.DIRECT_LAUNCHES["hits"] - before >= 4


@gpu
@needs_cuda
def test_gpu_varlen_tunes_once_per_length_class():
    from hf_efficient.ops import flash_fwd

    q, k, v = (torch.randn(3000, 4, 64, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    flash_attn_varlen_func(q, k, v, _cu([1000, 2000], "cuda"), _cu([1000, 2000], "cuda"), 2000, 2000,
                           causal=True)
    tuned = len(flash_fwd._best_configs)
    for longest in (1500, 1800, 1999):  # all in the 2048 class
        cu = _cu([longest, 3000 - longest], "cuda")
        out = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)
        ref_hi = attention_varlen_ref(q.float(), k.float(), v.float(), cu, cu, causal=True)
        ref_lo = attention_varlen_ref(q, k, v, cu, cu, causal=True)
        _assert_close("out", out, ref_hi, ref_lo, 2)
    assert len(flash_fwd._best_configs) == tuned
