"""Flash attention under torch.inference_mode(), no_grad and with grad enabled.

Tensors created under ``inference_mode`` keep no in-place version counter, so nothing on the flash path may read
one; and a remembered validation must never hide changed ``cu_seqlens`` contents where re-checking is cheap (CPU
tensors). Without a GPU the kernels run in Triton's interpreter (fp16, small shapes); the HF model test lets the
attention integration use the kernels there too.
"""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported (conftest does the same)
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")

import hf_efficient  # noqa: E402,F401  (registers "hf_efficient")
from hf_efficient.attention import compute, flash_api  # noqa: E402
from hf_efficient.attention.flash_api import flash_attn_func, flash_attn_varlen_func  # noqa: E402
from hf_efficient.models.tiny import tiny_model  # noqa: E402
from hf_efficient.ops.attention_ref import attention_ref, attention_varlen_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": contextlib.nullcontext}


def _close(ours, ref_hi, ref_lo, factor=2):
    assert not torch.isnan(ours).any()
    err = (ours.double() - ref_hi.double()).abs().max().item()
    base = (ref_lo.double() - ref_hi.double()).abs().max().item()
    assert err <= factor * base + 1e-5, f"error {err:.3e} > {factor} x PyTorch's {base:.3e}"


@pytest.fixture(autouse=True)
def _poison(tune):
    tune(poison_outputs=True)


def test_flash_attention_forward_in_every_grad_mode():
    """Varlen and fixed-length forward under inference_mode (every input, cu_seqlens included, an inference
    tensor), no_grad and with grad enabled (inputs requiring grad)."""
    lengths = [5, 0, 11]
    for mode, context in MODES.items():
        with context():
            cu = torch.tensor([0, 5, 5, 16], dtype=torch.int32, device=DEVICE)
            q = torch.randn(16, 4, 16, dtype=torch.float16, device=DEVICE)
            k, v = (torch.randn(16, 2, 16, dtype=torch.float16, device=DEVICE) for _ in range(2))
            if mode == "grad":
                q, k, v = (x.requires_grad_() for x in (q, k, v))
            out = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
            again = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
            qd, kd, vd = (x[:8].view(2, 4, x.shape[1], 16) for x in (q, k, v))
            dense = flash_attn_func(qd, kd, vd, causal=True)
        assert out.requires_grad == dense.requires_grad == (mode == "grad"), mode
        assert torch.equal(out, again), mode
        q, k, v, qd, kd, vd = (x.detach() for x in (q, k, v, qd, kd, vd))
        ref_hi = attention_varlen_ref(q.double(), k.double(), v.double(), cu, cu, causal=True)
        _close(out.detach(), ref_hi, attention_varlen_ref(q, k, v, cu, cu, causal=True))
        _close(dense.detach(), attention_ref(qd.double(), kd.double(), vd.double(), causal=True),
               attention_ref(qd, kd, vd, causal=True))


def test_changed_cu_seqlens_are_rechecked_under_inference_mode():
    q = torch.randn(10, 2, 16, dtype=torch.float16, device=DEVICE)
    with torch.inference_mode():
        cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
        flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)
        flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)
        cu[1] = 11  # same tensor, new contents, no version counter to tell
        with pytest.raises(ValueError, match="non-decreasing"):
            flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors run the kernels only under the interpreter")
def test_cpu_cu_seqlens_are_rechecked_even_when_the_version_counter_misses_a_write():
    q = torch.randn(10, 2, 16, dtype=torch.float16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)
    cu.data[1] = 11  # writes through .data do not bump cu's version counter
    with pytest.raises(ValueError, match="non-decreasing"):
        flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)


def test_hf_model_forward_and_generate_under_inference_mode(monkeypatch, caplog):
    """attn_implementation="hf_efficient" with a padded batch (varlen kernel) under inference_mode: forward and
    generate run on the flash kernels (no fallback) and agree with the reference path."""
    if DEVICE == "cpu":  # let the integration use the kernels through the interpreter (fp16 only)
        monkeypatch.setattr(compute, "kernel_ok", lambda q: q.dtype == torch.float16 and q.shape[-1] <= 256)
    calls = {"n": 0}
    real = flash_api.flash_attn

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(flash_api, "flash_attn", counting)
    compute._warned.discard("kernel")
    model = tiny_model("llama", attn_implementation="hf_efficient", dtype=torch.float16).to(DEVICE)
    ids = torch.randint(3, model.config.vocab_size, (2, 7), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the varlen path
    with caplog.at_level(logging.WARNING, logger="hf_efficient.attention.compute"), torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert not [r for r in caplog.records if "kernel failed" in r.message]
    assert calls["n"] >= 2 * model.config.num_hidden_layers and out.shape == (2, 10)
    monkeypatch.setattr(compute, "kernel_ok", lambda q: False)
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.isfinite(logits[keep]).all()
    assert ((logits[keep] - ref[keep]).float().norm() / ref[keep].float().norm()).item() < 1e-2
