"""Fused RMSNorm / rotary / SwiGLU ops and the ``"fused_layers"`` patch.

On CPU the Triton kernels run through the interpreter (fp32 and fp16 only: it mishandles bf16 arithmetic).
Accuracy rule: an op's error against a float64 reference is at most twice the error of plain PyTorch in the same
precision (three times for gradients), where an error below one unit in the last place of the largest value
counts as that unit.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from hf_efficient import patches
from hf_efficient.models.tiny import tiny_model
from hf_efficient.ops import rmsnorm, rope, swiglu
from hf_efficient.ops.rmsnorm import rms_norm, rms_norm_add, rms_norm_reference
from hf_efficient.ops.rope import rope_reference
from hf_efficient.ops.swiglu import silu_mul, silu_mul_reference
from hf_efficient.patches.core import _resolve

DTYPES = [torch.float32, torch.float16]


def _err(a, ref64):
    return (a.double() - ref64).abs().max().item()


def _assert_accurate(out, ref_same, ref64, factor=2.0):
    assert out.dtype == ref_same.dtype and out.shape == ref_same.shape
    assert torch.isfinite(out).all()
    ulp = torch.finfo(out.dtype).eps * ref64.abs().max().item()
    err, base = _err(out, ref64), _err(ref_same, ref64)
    assert err <= factor * max(base, ulp), f"error {err:.3g} vs PyTorch's {base:.3g}"


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 576), (2, 5, 64), (1, 1, 16)])
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_forward_backward(device, dtype, shape, gemma):
    r = _gen(hash((shape, gemma)) % 1000)
    x64 = r(*shape, scale=2.0).double()
    w64 = (1 + 0.5 * r(shape[-1])).double()
    kw = dict(offset=1.0, cast_before_weight=False) if gemma else {}
    x, w = x64.to(device, dtype), w64.to(device, dtype)
    ref64 = rms_norm_reference(x64, w64, 1e-5, **kw)
    _assert_accurate(rms_norm(x, w, 1e-5, **kw), rms_norm_reference(x, w, 1e-5, **kw), ref64)

    dy = r(*shape).to(device, dtype)
    grads = []
    for fn, xi, wi in ((rms_norm, x, w), (rms_norm_reference, x, w), (rms_norm_reference, x64, w64)):
        xi, wi = xi.clone().requires_grad_(), wi.clone().requires_grad_()
        fn(xi, wi, 1e-5, **kw).backward(dy.to(xi.dtype))
        grads.append((xi.grad, wi.grad))
    for i in range(2):
        _assert_accurate(grads[0][i], grads[1][i], grads[2][i].to(device), factor=3.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_add(device, dtype):
    r = _gen(1)
    x64, res64, w64 = r(4, 3, 576).double(), r(4, 3, 576, scale=3.0).double(), (1 + r(576)).double()
    x, res, w = (t.to(device, dtype) for t in (x64, res64, w64))
    y, s = rms_norm_add(x, res, w, 1e-6)
    y_ref, s_ref = rms_norm_reference(x, w, 1e-6, residual=res)
    assert torch.equal(s, s_ref)  # the sum is rounded once, as `residual + hidden` is
    _assert_accurate(y, y_ref, rms_norm_reference(x64, w64, 1e-6, residual=res64)[0])

    dy, ds = r(4, 3, 576).to(device, dtype), r(4, 3, 576).to(device, dtype)
    grads = []
    for fn, ts in ((rms_norm_add, (x, res, w)), (None, (x, res, w)), (None, (x64, res64, w64))):
        xi, ri, wi = (t.clone().requires_grad_() for t in ts)
        yi, si = fn(xi, ri, wi, 1e-6) if fn else rms_norm_reference(xi, wi, 1e-6, residual=ri)
        torch.autograd.backward([yi, si], [dy.to(yi.dtype), ds.to(si.dtype)])
        grads.append((xi.grad, ri.grad, wi.grad))
    for i in range(3):
        _assert_accurate(grads[0][i], grads[1][i], grads[2][i].to(device), factor=3.0)


def test_rms_norm_mixed_dtype_weight_promotes(device):
    """fp16 activations with an fp32 weight give an fp32 result, as `weight * h.to(fp16)` does."""
    r = _gen(2)
    x, w = r(3, 64).to(device, torch.float16), (1 + r(64)).to(device)
    out, ref = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Rotary
# ----------------------------------------------------------------------------------------------


def _cos_sin(batch, seq, d, offset=0):
    pos = torch.arange(offset, offset + seq, dtype=torch.float64)[None].expand(batch, seq)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_rope_strided_inputs(device, dtype, cos_batch):
    r = _gen(3 + cos_batch)
    b, s, h, hk, d = 2, 5, 9, 3, 64
    # q/k as the attention modules make them: (b, s, h*d) -> view(b, s, h, d) -> transpose(1, 2)
    q64 = r(b, s, h * d).double().view(b, s, h, d).transpose(1, 2)
    k64 = r(b, s, hk * d).double().view(b, s, hk, d).transpose(1, 2)
    cos64, sin64 = _cos_sin(cos_batch, s, d, offset=7)
    q, k, cos, sin = (t.to(device, dtype) for t in (q64, k64, cos64, sin64))
    assert not q.is_contiguous()
    qo, ko = rope.rope(q, k, cos, sin)
    qr, kr = rope_reference(q, k, cos, sin)
    qr64, kr64 = rope_reference(q64, k64, cos64, sin64)
    _assert_accurate(qo, qr, qr64.to(device))
    _assert_accurate(ko, kr, kr64.to(device))
    assert qo.stride() == qr.stride() and ko.stride() == kr.stride()

    dq, dk = r(b, h, s, d).to(device, dtype), r(b, hk, s, d).to(device, dtype)
    grads = []
    for fn, qi, ki, c, sn in ((rope.rope, q, k, cos, sin), (rope_reference, q, k, cos, sin),
                              (rope_reference, q64, k64, cos64, sin64)):
        qi, ki = qi.detach().clone().requires_grad_(), ki.detach().clone().requires_grad_()
        a, bb = fn(qi, ki, c, sn)
        torch.autograd.backward([a, bb], [dq.to(a.dtype), dk.to(bb.dtype)])
        grads.append((qi.grad, ki.grad))
    for i in range(2):
        _assert_accurate(grads[0][i], grads[1][i], grads[2][i].to(device), factor=3.0)


def test_rope_contiguous_decode_shape(device):
    r = _gen(5)
    q, k = r(1, 9, 1, 64).to(device), r(1, 3, 1, 64).to(device)
    cos, sin = (t.float().to(device) for t in _cos_sin(1, 1, 64, offset=300))
    for out, ref in zip(rope.rope(q, k, cos, sin), rope_reference(q, k, cos, sin)):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        assert out.is_contiguous()


# ----------------------------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(device, dtype):
    r = _gen(6)
    g64, u64 = r(3, 7, 150, scale=3.0).double(), r(3, 7, 150).double()
    g, u = g64.to(device, dtype), u64.to(device, dtype)
    _assert_accurate(silu_mul(g, u), silu_mul_reference(g, u), silu_mul_reference(g64, u64).to(device))
    dout = r(3, 7, 150).to(device, dtype)
    grads = []
    for fn, gi, ui in ((silu_mul, g, u), (silu_mul_reference, g, u), (silu_mul_reference, g64, u64)):
        gi, ui = gi.clone().requires_grad_(), ui.clone().requires_grad_()
        fn(gi, ui).backward(dout.to(gi.dtype))
        grads.append((gi.grad, ui.grad))
    for i in range(2):
        _assert_accurate(grads[0][i], grads[1][i], grads[2][i].to(device), factor=3.0)


# ----------------------------------------------------------------------------------------------
# Custom ops: fakes, autograd registration, torch.compile
# ----------------------------------------------------------------------------------------------


def test_custom_ops_opcheck(device):
    r = _gen(7)
    x, w = r(3, 64).to(device).requires_grad_(), (1 + r(64)).to(device).requires_grad_()
    res = r(3, 64).to(device).requires_grad_()
    q = r(2, 4, 4 * 16).to(device).view(2, 4, 4, 16).transpose(1, 2).detach().requires_grad_()
    k = r(2, 2, 4, 16).to(device).requires_grad_()
    cos, sin = (t.float().to(device) for t in _cos_sin(1, 4, 16))
    g, u = r(2, 40).to(device).requires_grad_(), r(2, 40).to(device).requires_grad_()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(rmsnorm.rms_norm_op, (x, w, 1e-6, 0.0, True), test_utils=tests)
    torch.library.opcheck(rmsnorm.rms_norm_op, (x, w, 1e-6, 1.0, False), test_utils=tests)
    torch.library.opcheck(rmsnorm.rms_norm_add_op, (x, res, w, 1e-6, 0.0, True), test_utils=tests)
    torch.library.opcheck(rope.rope_op, (q, k, cos, sin, False), test_utils=tests)
    torch.library.opcheck(swiglu.silu_mul_op, (g, u), test_utils=tests)


def test_ops_under_torch_compile_fullgraph(device):
    r = _gen(8)
    x, w = r(2, 3, 64).to(device).requires_grad_(), (1 + r(64)).to(device).requires_grad_()
    q = r(2, 3, 4, 16).to(device).transpose(1, 2).detach().requires_grad_()
    k = r(2, 3, 2, 16).to(device).transpose(1, 2).detach().requires_grad_()
    cos, sin = (t.float().to(device) for t in _cos_sin(1, 3, 16))

    def f(x, w, q, k, norm_fn, add_fn, rope_fn, swi_fn):
        h, s = add_fn(x, x * 0.5, w)
        qo, ko = rope_fn(q, k, cos, sin)
        return (swi_fn(norm_fn(h, w), s).sum() + (qo * 2).sum() + ko.square().sum())

    ours = (rms_norm, lambda a, b, c: rms_norm_add(a, b, c, 1e-6), rope.rope, silu_mul)
    refs = (rms_norm_reference, lambda a, b, c: rms_norm_reference(a, c, 1e-6, residual=b),
            rope_reference, silu_mul_reference)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, w, q, k, *ours)
    grads = torch.autograd.grad(out, (x, w, q, k))
    out_ref = f(x, w, q, k, *refs)
    grads_ref = torch.autograd.grad(out_ref, (x, w, q, k))
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The patch
# ----------------------------------------------------------------------------------------------


def _snapshot():
    out = []
    for p in patches.get("fused_layers").patches:
        owner = _resolve(p.target)
        out.append(owner.__dict__[p.attr])
    return out


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_patch_parity_and_revert(family):
    attn = None if family == "gemma2" else "hf_efficient"
    model = tiny_model(family, attn_implementation=attn).train(False)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    logits0, grads0 = _run(model, ids)
    before = _snapshot()
    def counting(mod, name):
        return mock.patch.object(mod, name, side_effect=getattr(mod, name), autospec=False)

    with counting(rmsnorm, "_fwd") as norm_fwd, counting(rope, "_launch") as rope_fwd, \
            counting(swiglu, "_fwd") as swi_fwd, patches.applied("fused_layers"):
        assert all(a is not b for a, b in zip(before, _snapshot()))
        logits1, grads1 = _run(model, ids)
        calls = {"norm": norm_fwd.call_count, "rope": rope_fwd.call_count, "swiglu": swi_fwd.call_count}
    assert _snapshot() == before and all(a is b for a, b in zip(before, _snapshot()))
    assert "fused_layers" not in patches.active()

    layers = model.config.num_hidden_layers
    norms_per_layer = 2 + (2 if family == "qwen3" else 0) + (2 if family == "gemma2" else 0)
    assert calls["norm"] == layers * norms_per_layer + 1
    assert calls["rope"] == layers * 2  # forward and backward
    assert calls["swiglu"] == (0 if family == "gemma2" else layers)

    torch.testing.assert_close(logits1, logits0, rtol=1e-5, atol=1e-5 * logits0.abs().max().item())
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        scale = grads0[name].abs().max().item()
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_patch_falls_back_off_supported_inputs():
    """bf16 on CPU (not fusable through the interpreter) takes transformers' own code, giving identical logits."""
    model = tiny_model("llama", dtype=torch.bfloat16, attn_implementation="sdpa")
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        with mock.patch.object(rmsnorm, "_fwd") as norm_fwd, patches.applied("fused_layers"):
            out = model(ids).logits
    assert norm_fwd.call_count == 0 and torch.equal(out, ref)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_patch_bf16_parity_cuda(family):
    model = tiny_model(family, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    ids = torch.randint(3, 256, (2, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits.float()
        with patches.applied("fused_layers"):
            out = model(ids).logits.float()
    model64 = tiny_model(family, dtype=torch.float64, attn_implementation="sdpa").cuda()
    with torch.no_grad():
        exact = model64(ids).logits
    base = (ref.double() - exact).abs().max().item()
    assert (out.double() - exact).abs().max().item() <= 2 * base + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_bf16_cuda(dtype):
    r = _gen(9)
    x64, w64 = r(64, 576, scale=2.0).double(), (1 + r(576)).double()
    x, w = x64.cuda().to(dtype), w64.cuda().to(dtype)
    _assert_accurate(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), rms_norm_reference(x64, w64, 1e-5).cuda())
    g64, u64 = r(64, 1536, scale=3.0).double(), r(64, 1536).double()
    g, u = g64.cuda().to(dtype), u64.cuda().to(dtype)
    _assert_accurate(silu_mul(g, u), silu_mul_reference(g, u), silu_mul_reference(g64, u64).cuda())
    q64 = r(2, 7, 9 * 64).double().view(2, 7, 9, 64).transpose(1, 2)
    k64 = r(2, 7, 3 * 64).double().view(2, 7, 3, 64).transpose(1, 2)
    cos64, sin64 = _cos_sin(2, 7, 64, offset=100)
    q, k, cos, sin = (t.cuda().to(dtype) for t in (q64, k64, cos64, sin64))
    for out, ref, exact in zip(rope.rope(q, k, cos, sin), rope_reference(q, k, cos, sin),
                               rope_reference(q64, k64, cos64, sin64)):
        # On the GPU the compiler may contract a product and a sum into one FMA (one rounding instead of two),
        # so the fused rotary is held to the accuracy rule here rather than to bit equality with PyTorch.
        _assert_accurate(out, ref, exact.cuda())


@pytest.mark.gpu
def test_patch_cuda_graph_capture():
    model = tiny_model("llama", dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    ids = torch.randint(3, 256, (1, 8), device="cuda")
    with torch.no_grad(), patches.applied("fused_layers"):
        ref = model(ids, use_cache=False).logits.clone()
        static_ids = ids.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm up: compiles the kernels outside the capture
                model(static_ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_ids, use_cache=False).logits
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, ref)
        new_ids = torch.randint(3, 256, (1, 8), device="cuda")
        static_ids.copy_(new_ids)
        graph.replay()
        expected = model(new_ids, use_cache=False).logits
        torch.testing.assert_close(static_out, expected)
