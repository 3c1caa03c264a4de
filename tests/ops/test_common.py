"""The helpers every op shares (hf_efficient.ops._common) and that each op uses that one copy."""
from __future__ import annotations

import torch

from hf_efficient.ops import (
    _common,
    decode_linear,
    flash_bwd,
    flash_fwd,
    paged_decode,
    paged_decode_triton,
    rmsnorm,
    rope,
    swiglu,
)


def test_new_output_is_poisoned_when_asked(tune):
    tune(poison_outputs=True)
    out = _common.new_output((3, 5), torch.float16, "cpu")
    assert out.shape == (3, 5) and out.dtype == torch.float16 and torch.isnan(out).all()
    like = torch.zeros(4, 6).t()
    out = _common.new_output(None, torch.float32, "cpu", like=like)
    assert out.stride() == like.stride() and torch.isnan(out).all()
    assert _common.new_output((2,), torch.int32, "cpu").dtype == torch.int32  # integers are not filled


def test_device_facts_off_cuda(monkeypatch):
    cpu = torch.device("cpu")
    assert _common.num_sms(cpu) == 1
    assert _common.pdl_status(cpu) == (False, "not a CUDA device") and not _common.pdl_enabled(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _common.interpreting()


def test_ops_share_one_copy():
    for module in (flash_fwd, flash_bwd, rmsnorm, rope, swiglu, paged_decode, paged_decode_triton, decode_linear):
        assert module.new_output is _common.new_output, module.__name__
    for module in (flash_fwd, flash_bwd, rmsnorm):
        assert module.interpreting is _common.interpreting, module.__name__
    for module in (paged_decode, decode_linear):
        assert module.pdl_enabled is _common.pdl_enabled and module.num_sms is _common.num_sms
    assert not hasattr(paged_decode, "alloc_output") and not hasattr(flash_fwd, "poison_outputs")
