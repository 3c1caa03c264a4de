"""flash-attn 2.x drop-in fidelity: every head dim up to 256 and every int-like ``window_size`` form.

Head dims that are not a multiple of 8 are zero-padded inside the launcher (flash-attn does the same); the default
softmax scale stays 1/sqrt(original head dim). ``window_size`` may be a tuple or list of ints, numpy integers,
0-d integer tensors, or a 1-D integer tensor / numpy array of two elements. Correctness rule as in
test_flash_attn.py: error against a float64 (CPU) / float32 (GPU) reference at most 2x plain PyTorch's in the
same precision (3x for gradients), fresh random inputs, NaN-poisoned outputs (conftest).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before triton is imported (conftest does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hf_efficient.attention.flash_api import (  # noqa: E402
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from hf_efficient.attention.kvcache_api import flash_attn_with_kvcache  # noqa: E402
from hf_efficient.ops import paged_decode as pd  # noqa: E402
from hf_efficient.ops.attention_ref import attention_ref, attention_varlen_ref  # noqa: E402
from hf_efficient.ops.paged_decode_triton import paged_decode_triton  # noqa: E402


def _hi(device):
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def _assert_close(name, ours, ref_hi, ref_lo, factor):
    assert ours.shape == ref_hi.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref_hi.shape)}"
    assert not torch.isnan(ours).any(), f"{name}: NaN (unwritten or broken elements)"
    err = (ours.double() - ref_hi.double()).abs().max().item()
    base = (ref_lo.double() - ref_hi.double()).abs().max().item()
    assert err <= factor * base + 1e-5, f"{name}: error {err:.3e} > {factor} x PyTorch's {base:.3e}"


def _check(fn, ref_fn, inputs, device):
    """Forward and backward of ``fn`` against ``ref_fn`` (same arguments) in float64/32 and in fp16."""
    out = fn(*inputs)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g)
    hi = [x.detach().to(_hi(device)).requires_grad_() for x in inputs]
    lo = [x.detach().clone().requires_grad_() for x in inputs]
    ref_hi, ref_lo = ref_fn(*hi), ref_fn(*lo)
    _assert_close("out", out, ref_hi, ref_lo, 2)
    g_hi = torch.autograd.grad(ref_hi, hi, g.to(ref_hi.dtype))
    g_lo = torch.autograd.grad(ref_lo, lo, g)
    for i, (ours, rh, rl) in enumerate(zip(grads, g_hi, g_lo)):
        _assert_close(f"grad {i}", ours, rh, rl, 3)


def _rand(*shape, device):
    return torch.randn(*shape, dtype=torch.float16, device=device).requires_grad_()


def _cu(lengths, device):
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------------------------
# head dims that are not a multiple of 8
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [20, 100])
def test_padded_batch_any_head_dim(device, d):
    """GQA, sq != sk, a window given as a list; default softmax scale 1/sqrt(d) (the reference's)."""
    q = _rand(2, 17, 4, d, device=device)
    k, v = _rand(2, 23, 2, d, device=device), _rand(2, 23, 2, d, device=device)
    kw = dict(causal=True, window_size=[9, -1])
    _check(lambda *x: flash_attn_func(*x, **kw), lambda *x: attention_ref(*x, **kw), [q, k, v], device)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    _, lse_ref = attention_ref(*(x.detach().to(_hi(device)) for x in (q, k, v)), return_lse=True, **kw)
    fin = torch.isfinite(lse_ref)
    assert lse.shape == (2, 4, 17) and torch.allclose(lse[fin].double(), lse_ref[fin].double(), atol=2e-3)


@pytest.mark.parametrize("d", [36, 72])
def test_varlen_any_head_dim(device, d):
    """Head dims 36 (padded to 40) and 72 (already aligned); window as a torch tensor."""
    lengths = [7, 0, 13]
    cu = _cu(lengths, device)
    window = torch.tensor([5, 2])
    q, k, v = (_rand(sum(lengths), 2, d, device=device) for _ in range(3))
    fn = lambda *x: flash_attn_varlen_func(*x, cu, cu, 13, 13, window_size=window)  # noqa: E731
    ref = lambda *x: attention_varlen_ref(*x, cu, cu, window_size=(5, 2))  # noqa: E731
    _check(fn, ref, [q, k, v], device)


def test_packed_variants_any_head_dim(device):
    """qkvpacked / kvpacked, padded and varlen, head dim 44, numpy window entries."""
    d, window = 44, (np.int64(4), np.int32(-1))
    qkv = _rand(1, 13, 3, 2, d, device=device)
    _check(lambda x: flash_attn_qkvpacked_func(x, window_size=window),
           lambda x: attention_ref(*x.unbind(2), window_size=(4, -1)), [qkv], device)
    q, kv = _rand(2, 9, 4, d, device=device), _rand(2, 11, 2, 2, d, device=device)
    _check(lambda a, b: flash_attn_kvpacked_func(a, b, causal=True, window_size=np.array([3, 0])),
           lambda a, b: attention_ref(a, *b.unbind(2), causal=True, window_size=(3, 0)), [q, kv], device)
    lengths = [6, 9]
    cu = _cu(lengths, device)
    qkv = _rand(sum(lengths), 3, 2, d, device=device)
    _check(lambda x: flash_attn_varlen_qkvpacked_func(x, cu, 9, causal=True, window_size=window),
           lambda x: attention_varlen_ref(*x.unbind(1), cu, cu, causal=True, window_size=(4, -1)), [qkv], device)
    q, kv = _rand(sum(lengths), 2, d, device=device), _rand(sum(lengths), 2, 1, d, device=device)
    _check(lambda a, b: flash_attn_varlen_kvpacked_func(a, b, cu, cu, 9, 9, window_size=list(window)),
           lambda a, b: attention_varlen_ref(a, *b.unbind(1), cu, cu, window_size=(4, -1)), [q, kv], device)


def test_explicit_softmax_scale_with_odd_head_dim(device):
    q, k, v = (torch.randn(1, 9, 2, 30, dtype=torch.float16, device=device) for _ in range(3))
    out = flash_attn_func(q, k, v, softmax_scale=0.3)
    ref_hi = attention_ref(*(x.to(_hi(device)) for x in (q, k, v)), softmax_scale=0.3)
    _assert_close("out", out, ref_hi, attention_ref(q, k, v, softmax_scale=0.3), 2)


# ----------------------------------------------------------------------------------------------
# window_size forms and validation
# ----------------------------------------------------------------------------------------------


def test_every_int_like_window_form_gives_the_tuple_result(device):
    q, k, v = (torch.randn(1, 19, 2, 16, dtype=torch.float16, device=device) for _ in range(3))
    want = flash_attn_func(q, k, v, window_size=(5, 1))
    forms = [[5, 1], (np.int64(5), np.int64(1)), np.array([5, 1]), torch.tensor([5, 1]),
             torch.tensor([5, 1], dtype=torch.int32, device=device), (torch.tensor(5), torch.tensor(1))]
    for form in forms:
        assert torch.equal(flash_attn_func(q, k, v, window_size=form), want), repr(form)
    cu = _cu([19], device)
    want = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 19, 19, window_size=(5, 1))
    for form in forms:
        got = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 19, 19, window_size=form)
        assert torch.equal(got, want), repr(form)


def test_rejects_what_flash_attn_rejects(device):
    q, k, v = (torch.randn(1, 8, 2, 16, dtype=torch.float16, device=device) for _ in range(3))
    big = torch.randn(1, 8, 2, 264, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="head_dim.*at most 256"):
        flash_attn_func(big, big, big)
    for bad in (torch.tensor([1.5, 2.0]), np.array([1.0, 2.0]), (1, torch.tensor(True)), torch.tensor([1, 2, 3]), 3):
        with pytest.raises(TypeError, match="window_size"):
            flash_attn_func(q, k, v, window_size=bad)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=torch.tensor([-2, 0]))


# ----------------------------------------------------------------------------------------------
# flash_attn_with_kvcache and the paged decode op
# ----------------------------------------------------------------------------------------------


def _paged(lens, hk, d, bs, device):
    blocks = max(-(-n // bs) for n in lens) + 1
    n_blocks = len(lens) * blocks + 2
    k = torch.randn(n_blocks, bs, hk, d).half().to(device)
    v = torch.randn(n_blocks, bs, hk, d).half().to(device)
    table = torch.randperm(n_blocks)[: len(lens) * blocks].view(len(lens), blocks).to(torch.int32).to(device)
    return k, v, table


def _decode_close(out, q, k, v, seqlens, table, **kw):
    args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in (q, k, v, seqlens, table)]
    ref = pd.paged_decode_reference(*(t.double() for t in args[:3]), *args[3:], compute_dtype=torch.float64, **kw)[0]
    plain = pd.paged_decode_reference(*args, compute_dtype=torch.float16, **kw)[0]
    _assert_close("out", out.cpu(), ref, plain, 2)


def test_kvcache_any_head_dim_and_window_forms(device):
    d, hk, bs, n_new = 100, 2, 16, 2
    before = [5, 30]
    k, v, table = _paged([n + n_new for n in before], hk, d, bs, device)
    k0, v0 = k.clone(), v.clone()
    seqlens = torch.tensor(before, dtype=torch.int32, device=device)
    q = torch.randn(2, n_new, 2 * hk, d).half().to(device)
    kn, vn = (torch.randn(2, n_new, hk, d).half().to(device) for _ in range(2))
    out = flash_attn_with_kvcache(q, k, v, kn, vn, cache_seqlens=seqlens, block_table=table, causal=True,
                                  window_size=torch.tensor([9, -1]))
    for b, n in enumerate(before):
        for i in range(n_new):
            page, slot = table[b, (n + i) // bs], (n + i) % bs
            k0[page, slot], v0[page, slot] = kn[b, i], vn[b, i]
    assert torch.equal(k, k0) and torch.equal(v, v0)
    _decode_close(out, q, k0, v0, seqlens + n_new, table, window_left=9, window_right=0)
    again = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens + n_new, block_table=table, causal=True,
                                    window_size=(np.int64(9), np.int64(-1)))
    assert torch.equal(again, out)


@pytest.mark.parametrize("d", [40, 100])
def test_triton_paged_decode_any_head_dim(device, d):
    """The Triton paged kernel (what odd head dims run on a GPU) masks the head dim: no cache copy."""
    lens, hk, bs = [3, 17, 33], 2, 16
    k, v, table = _paged(lens, hk, d, bs, device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(3, 2, 2 * hk, d).half().to(device)
    args = pd.check_paged_inputs(q, k, v, seqlens, table, window_size=[7, np.int64(-1)])
    out, _ = paged_decode_triton(*args[:12], num_splits=2)
    _decode_close(out, q, k, v, seqlens, table, window_left=7, window_right=0)
