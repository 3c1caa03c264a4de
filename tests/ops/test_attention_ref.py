"""The reference attention op against an independent naive float64 softmax(QK^T)V.

The naive oracle below builds the visibility matrix element by element from the flash-attn definitions (bottom-right
causal, windows, softcap, ALiBi), so it shares no masking code with the op under test.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_efficient.ops.attention_ref import attention_ref, attention_varlen_ref


def naive(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=0.0, slopes=None):
    """q (sq, h, d), k/v (sk, hk, d), float64. Returns out (sq, h, d), lse (h, sq)."""
    sq, h, d = q.shape
    sk, hk, _ = k.shape
    scale = scale if scale is not None else 1 / math.sqrt(d)
    out = torch.zeros(sq, h, v.shape[-1], dtype=q.dtype)
    lse = torch.full((h, sq), math.inf, dtype=q.dtype)
    left, right = window
    if causal:
        right = 0
    outs, lses = [], []
    for hh in range(h):
        kh = hh // (h // hk)
        s = (q[:, hh] @ k[:, kh].T) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        rows_out, rows_lse = [], []
        for i in range(sq):
            diag = i + sk - sq
            cols = [
                j for j in range(sk)
                if (right < 0 or j <= diag + right) and (left < 0 or j >= diag - left)
            ]
            if not cols:
                rows_out.append(torch.zeros(v.shape[-1], dtype=q.dtype))
                rows_lse.append(torch.tensor(math.inf, dtype=q.dtype))
                continue
            idx = torch.tensor(cols)
            row = s[i, idx]
            if slopes is not None:
                row = row - slopes[hh] * (diag - idx).abs().to(q.dtype)
            p = torch.softmax(row, dim=0)
            rows_out.append(p @ v[idx, kh])
            rows_lse.append(torch.logsumexp(row, dim=0))
        outs.append(torch.stack(rows_out))
        lses.append(torch.stack(rows_lse))
    out = torch.stack(outs, dim=1)
    lse = torch.stack(lses)
    return out, lse


def _rand(*shape, grad=False):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


GRID = [
    # (sq, sk, h, hk, causal, window, softcap, alibi)
    (7, 7, 3, 3, False, (-1, -1), 0.0, False),
    (7, 7, 6, 2, True, (-1, -1), 0.0, False),
    (5, 11, 8, 1, True, (-1, -1), 0.0, False),
    (11, 5, 8, 1, True, (-1, -1), 0.0, False),  # sq > sk: top rows see nothing
    (9, 9, 3, 1, True, (3, 0), 0.0, False),
    (9, 13, 4, 4, False, (2, 1), 0.0, False),
    (6, 6, 2, 2, True, (100, 100), 0.0, False),  # window larger than the sequence
    (8, 8, 3, 1, True, (-1, -1), 5.0, False),
    (8, 10, 4, 2, False, (-1, -1), 0.0, True),
    (1, 9, 6, 2, True, (-1, -1), 0.0, False),  # seqlen_q 1 (decode)
    (1, 1, 1, 1, False, (-1, -1), 0.0, False),
    (4, 9, 3, 3, True, (2, -1), 2.0, True),
]


@pytest.mark.parametrize("sq,sk,h,hk,causal,window,softcap,alibi", GRID)
def test_dense_matches_naive(sq, sk, h, hk, causal, window, softcap, alibi):
    b, d = 2, 16
    q, k, v = _rand(b, sq, h, d, grad=True), _rand(b, sk, hk, d, grad=True), _rand(b, sk, hk, d, grad=True)
    slopes = torch.rand(h, dtype=torch.float64) if alibi else None
    out, lse = attention_ref(
        q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, return_lse=True
    )
    assert out.shape == (b, sq, h, d) and lse.shape == (b, h, sq) and lse.dtype == torch.float32
    for i in range(b):
        o_ref, l_ref = naive(q[i], k[i], v[i], None, causal, window, softcap, slopes)
        torch.testing.assert_close(out[i], o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[i], l_ref.float(), rtol=1e-5, atol=1e-5)

    # gradients vs autograd of the naive version
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    o_naive = torch.stack([naive(q[i], k[i], v[i], None, causal, window, softcap, slopes)[0] for i in range(b)])
    rq, rk, rv = torch.autograd.grad(o_naive, (q, k, v), g)
    for a, r in ((dq, rq), (dk, rk), (dv, rv)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)


def test_empty_rows_are_zero_with_inf_lse():
    q, k, v = _rand(1, 4, 2, 8), _rand(1, 2, 2, 8), _rand(1, 2, 2, 8)
    out, lse = attention_ref(q, k, v, causal=True, return_lse=True)
    # bottom-right causal with sq=4, sk=2: rows 0 and 1 see no key
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    assert torch.isinf(lse[0, :, :2]).all() and (lse[0, :, :2] > 0).all()
    assert torch.isfinite(lse[0, :, 2:]).all()


def test_softmax_scale_and_headdim_v():
    q, k, v = _rand(1, 5, 2, 8), _rand(1, 6, 2, 8), _rand(1, 6, 2, 12)
    out = attention_ref(q, k, v, softmax_scale=0.3)
    ref, _ = naive(q[0], k[0], v[0], scale=0.3)
    torch.testing.assert_close(out[0], ref)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_with_empty_and_length_one_sequences(causal):
    lens_q = [3, 0, 1, 5, 0, 2]
    lens_k = [3, 2, 1, 7, 0, 4]
    h, hk, d = 6, 3, 16
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q, k, v = _rand(sum(lens_q), h, d, grad=True), _rand(sum(lens_k), hk, d, grad=True), _rand(sum(lens_k), hk, d)
    out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (h, sum(lens_q))
    for b in range(len(lens_q)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if lens_q[b] == 0:
            continue
        o_ref, l_ref = naive(q[qs], k[ks], v[ks], causal=causal)
        torch.testing.assert_close(out[qs], o_ref)
        torch.testing.assert_close(lse[:, qs], l_ref.float())
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_varlen_tokens_outside_cu_seqlens_are_zero():
    q, k, v = _rand(6, 2, 8), _rand(6, 2, 8), _rand(6, 2, 8)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)  # tokens 4, 5 belong to no sequence (padding at the end)
    out, lse = attention_varlen_ref(q, k, v, cu, cu, return_lse=True)
    assert torch.equal(out[4:], torch.zeros_like(out[4:])) and torch.isinf(lse[:, 4:]).all()


def test_dropout_mask_applied_with_rescaling():
    q, k, v = _rand(1, 4, 2, 8), _rand(1, 4, 2, 8), _rand(1, 4, 2, 8)
    keep = torch.rand(1, 2, 4, 4) > 0.3
    out = attention_ref(q, k, v, dropout_p=0.3, dropout_mask=keep)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    p = torch.softmax(s, -1) * keep / 0.7
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", p, v))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window_size=(1,)), "window_size"),
        (dict(window_size=(-2, 0)), "window_size"),
        (dict(dropout_p=1.5), "dropout_p"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    q = _rand(1, 3, 2, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        attention_ref(q, q, q, **kwargs)


def test_bad_heads_raise():
    with pytest.raises(ValueError, match="nheads"):
        attention_ref(_rand(1, 3, 3, 8), _rand(1, 3, 2, 8), _rand(1, 3, 2, 8))


@settings(max_examples=25, deadline=None)
@given(
    sq=st.integers(1, 9),
    sk=st.integers(1, 9),
    groups=st.sampled_from([1, 3]),
    causal=st.booleans(),
    left=st.integers(-1, 6),
    right=st.integers(-1, 6),
    softcap=st.sampled_from([0.0, 3.0]),
)
def test_random_configs_match_naive(sq, sk, groups, causal, left, right, softcap):
    hk, d = 2, 8
    q, k, v = _rand(1, sq, hk * groups, d), _rand(1, sk, hk, d), _rand(1, sk, hk, d)
    out = attention_ref(q, k, v, causal=causal, window_size=(left, right), softcap=softcap)
    ref, _ = naive(q[0], k[0], v[0], causal=causal, window=(left, right), softcap=softcap)
    torch.testing.assert_close(out[0], ref)
